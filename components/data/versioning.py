"""DVC versioning of data/: the data version is the directory md5 recorded in <root>/data.dvc.

`ensure_data` materialises data/ on any machine (dvc pull when the remote has the
recorded version, else the deterministic demo generator) and refuses to go on when
data/ and data.dvc disagree. `commit_shard` adds a shard all-or-nothing: a journal
records what is about to change, so a crash at any point (between writing the shard
and `dvc add`, during `dvc push`) is rolled back by the next command - a half-ingested
state is never trusted. DVC is driven through its CLI (`python -m dvc`), its stable interface.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.config import Config
from components.data.demo import write_demo
from components.data.schemas import KINDS, shard_files

DVC_FILE = "data.dvc"
JOURNAL = "ingest-journal.json"


class DataVersionError(Exception):
    """data/, data.dvc and the DVC remote cannot be reconciled; the message says what to do."""


@dataclass
class DataState:
    version: str  # md5 of data/ recorded in data.dvc
    origin: str  # present | pulled | generated
    rows: dict[str, int]
    remote: str


class Dvc:
    def __init__(self, root: Path):
        self.root = root

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.root, env=env,
                              capture_output=True, text=True)
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise DataVersionError(f"`dvc {' '.join(args)}` failed in {self.root}: {msg[-1] if msg else proc.returncode}")
        return proc

    def ensure_init(self) -> None:
        if (self.root / ".dvc").is_dir():
            return
        self("init", "-q") if (self.root / ".git").exists() else self("init", "-q", "--no-scm")
        self("config", "core.analytics", "false")
        self("config", "core.autostage", "false")

    def set_remote(self, name: str, url: str) -> None:
        self("remote", "add", "--local", "-d", "-f", name, url)

    def status(self) -> dict:
        out = self("status", "--json", DVC_FILE).stdout.strip()
        return json.loads(out) if out else {}

    def add(self, target: str) -> None:
        self("add", "-q", target)

    def push(self, remote: str) -> None:
        self("push", "-q", "-r", remote)

    def pull(self, remote: str) -> bool:
        return self("pull", "-q", "-r", remote, DVC_FILE, check=False).returncode == 0


def remote_url(cfg: Config) -> str:
    url = cfg.infra.dvc_remote_url
    if url and "://" in url:
        return url
    p = Path(url).expanduser() if url else cfg.state_path / "dvc-remote"
    return str(p if p.is_absolute() else cfg.root_path / p)


def data_version(root: Path) -> str | None:
    f = root / DVC_FILE
    if not f.exists():
        return None
    outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def count_rows(data_dir: Path) -> dict[str, int]:
    def n(p: Path) -> int:
        with p.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    return {k: sum(n(p) for p in shard_files(data_dir / k)) for k in KINDS}


def _has_shards(data_dir: Path) -> bool:
    return any(shard_files(data_dir / k) for k in KINDS)


def _dvc_target(cfg: Config) -> str:
    """`dvc add` target: data/ relative to root (data.dvc must sit at the root)."""
    try:
        return str(cfg.data_path.relative_to(cfg.root_path))
    except ValueError:
        raise DataVersionError(f"data.dir ({cfg.data_path}) must be inside the project root ({cfg.root_path}) "
                               "so that data.dvc can track it") from None


def open_repo(cfg: Config) -> Dvc:
    dvc = Dvc(cfg.root_path)
    dvc.ensure_init()
    dvc.set_remote(cfg.infra.dvc_remote_name, remote_url(cfg))
    recover(cfg)
    return dvc


def ensure_data(cfg: Config) -> DataState:
    """Make data/ match data.dvc (pull or regenerate), or create the demo data set and version it."""
    dvc = open_repo(cfg)
    remote, target = cfg.infra.dvc_remote_name, _dvc_target(cfg)
    recorded = data_version(cfg.root_path)
    if recorded is not None:
        if not dvc.status():
            return DataState(recorded, "present", count_rows(cfg.data_path), remote_url(cfg))
        if _has_shards(cfg.data_path):
            raise DataVersionError(
                f"{cfg.data_path} differs from {DVC_FILE} ({json.dumps(dvc.status())}).\n"
                f"  To keep the changes: add new examples with `rlhf ingest FILE --kind K` (validated), "
                f"or version them as they are with `dvc add {target}`.\n"
                f"  To discard them: `dvc checkout --force {DVC_FILE}`.")
        if dvc.pull(remote) and not dvc.status():
            return DataState(recorded, "pulled", count_rows(cfg.data_path), remote_url(cfg))
    backup = (cfg.root_path / DVC_FILE).read_text() if recorded else None
    write_demo(cfg.data, cfg.data_path)
    dvc.add(target)
    version = data_version(cfg.root_path)
    if recorded is not None and version != recorded:
        (cfg.root_path / DVC_FILE).write_text(backup or "")
        shutil.rmtree(cfg.data_path, ignore_errors=True)
        raise DataVersionError(
            f"{DVC_FILE} records data version {recorded}, which the DVC remote ({remote_url(cfg)}) does not have, "
            f"and the demo generator with this config gives {version}.\n"
            f"  Get the data from the remote that has it (`infra.dvc_remote_url=...`, then `dvc pull`), "
            f"or start over from the demo: `git checkout {DVC_FILE}` (or delete it) and run again.")
    if cfg.infra.dvc_push:
        dvc.push(remote)
    return DataState(version or "", "generated", count_rows(cfg.data_path), remote_url(cfg))


def require_clean(cfg: Config, dvc: Dvc) -> str:
    status = dvc.status()
    if status:
        raise DataVersionError(f"{cfg.data_path} does not match {DVC_FILE}: {json.dumps(status)}. "
                               f"Run `rlhf validate` for details, `dvc checkout --force {DVC_FILE}` to discard local changes.")
    return data_version(cfg.root_path) or ""


# ----------------------------------------------------------------------------------------
# All-or-nothing shard commits
# ----------------------------------------------------------------------------------------
def _journal(cfg: Config) -> Path:
    return cfg.state_path / JOURNAL


def commit_shard(cfg: Config, dvc: Dvc, staged: Path, dest: Path, on_step=lambda step: None) -> str:
    """Move `staged` to `dest` under data/, `dvc add` and push. Returns the new data version.

    On any failure the shard is removed and data.dvc restored; a kill is rolled back by `recover`.
    """
    dvc_file = cfg.root_path / DVC_FILE
    journal = _journal(cfg)
    journal.parent.mkdir(parents=True, exist_ok=True)
    entry = {"shard": str(dest), "data_dvc": dvc_file.read_text() if dvc_file.exists() else None, "started": time.time()}
    tmp = journal.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, journal)  # the journal exists before anything under data/ changes
    try:
        on_step("write shard")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        on_step("dvc add")
        dvc.add(_dvc_target(cfg))
        if cfg.infra.dvc_push:
            on_step("dvc push")
            dvc.push(cfg.infra.dvc_remote_name)
    except BaseException:
        _rollback(cfg, entry)
        raise
    journal.unlink()
    return data_version(cfg.root_path) or ""


def _rollback(cfg: Config, entry: dict) -> None:
    Path(entry["shard"]).unlink(missing_ok=True)
    dvc_file = cfg.root_path / DVC_FILE
    if entry["data_dvc"] is None:
        dvc_file.unlink(missing_ok=True)
    else:
        dvc_file.write_text(entry["data_dvc"])
    _journal(cfg).unlink(missing_ok=True)


def recover(cfg: Config) -> str | None:
    """Roll back an ingest that was interrupted (killed) half-way. Returns a message if it did."""
    journal = _journal(cfg)
    if not journal.exists():
        return None
    entry = json.loads(journal.read_text())
    _rollback(cfg, entry)
    msg = (f"recovered from an interrupted ingest: rolled back {entry['shard']} and {DVC_FILE}; "
           "that batch was NOT ingested - run the ingest again")
    print(f"⚠ {msg}", file=sys.stderr)
    return msg
