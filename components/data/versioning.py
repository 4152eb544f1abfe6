"""DVC versioning of data/: the data version is the directory md5 recorded in <root>/data.dvc.

`ensure_data` materialises data/ on any machine (dvc pull when the remote has the
recorded version, else, for a demo config only, the deterministic demo generator) and refuses to go on when
data/ and data.dvc disagree. The demo never writes beside anything: it fills an empty data/, or replaces a
version that is the demo and nothing else (data.dvc's `meta.rlhf.demo` says which demo it is; the first
ingest or forget into it removes that mark). A project's own data (`data=own`) is never generated: the first
`rlhf ingest` starts it. `commit_shard` adds a shard all-or-nothing: a journal
records what is about to change, so a crash at any point (between writing the shard
and `dvc add`, during `dvc push`) is rolled back by the next command - a half-ingested
state is never trusted. DVC is driven through its CLI (`python -m dvc`), its stable interface.

Concurrency: every writer of data/ and data.dvc (ingest, demo generation, pull, recovery) holds
`data_lock` (an flock on <state>/data.lock: the kernel frees it when its process dies, so a crash
never leaves it held). Under the lock a journal can only belong to a dead ingest, so recovery
never rolls back a live one. A retrain reads one pinned version from start to end: `pinned_data`
copies data/ at its version to <state>/snapshots/<md5> under the lock, and the stages read that.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.config import Config
from components.data.demo import DEMO_SHARD, write_demo
from components.data.schemas import KINDS, shard_files
from components.owner import Owner
from components.tracking import redact_url

DVC_FILE = "data.dvc"
JOURNAL = "ingest-journal.json"
LOCK = "data.lock"
SNAPSHOT_DONE = ".snapshot-complete"
LOCK_SAY_EVERY_S = 30.0
DEMO_FILES = (DEMO_SHARD, f"{DEMO_SHARD}.tmp")  # what the demo generator leaves in data/, whole or killed mid-write


class DataVersionError(Exception):
    """data/, data.dvc and the DVC remote cannot be reconciled; the message says what to do."""


@dataclass
class DataState:
    version: str  # md5 of data/ recorded in data.dvc
    origin: str  # present | pulled | generated | switched (another demo set generated in place of the pure demo)
    rows: dict[str, int]
    remote: str  # where it is pushed, for display: credentials redacted (the DVC config has the real one)
    path: str = ""  # where to read this version: data/ itself, or a retrain's pinned snapshot of it


# ----------------------------------------------------------------------------------------
# One writer at a time
# ----------------------------------------------------------------------------------------
_held = threading.local()  # lock files this thread holds (nested use is a no-op)


@contextmanager
def data_lock(
    cfg: Config, what: str, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
) -> Iterator[None]:
    """Hold the project's data lock for `what` (e.g. "ingest batch.jsonl"). Waits for another holder,
    saying who every 30 s, for at most `infra.data_lock_timeout_s`; then a DataVersionError says who holds it."""
    path = cfg.state_path / LOCK
    held: set = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started, said = time.time(), 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.time()
                holder = path.read_text(errors="replace").strip() or "another process"
                if now - started > cfg.infra.data_lock_timeout_s:
                    raise DataVersionError(
                        f"{what}: data/ has been locked by {holder} for over {cfg.infra.data_lock_timeout_s:g} s "
                        f"(infra.data_lock_timeout_s). Wait for it to finish, or raise the timeout."
                    ) from None
                if now - said >= LOCK_SAY_EVERY_S:
                    said = now
                    say(f"{what}: waiting for data/ ({now - started:.0f} s so far): in use by {holder}")
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} ({Owner.me().describe()}, since {time.strftime('%H:%M:%S')})".encode(), 0)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Dvc:
    def __init__(self, root: Path):
        self.root = root

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=self.root, env=env, capture_output=True, text=True
        )
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise DataVersionError(  # the arguments or DVC's message may hold the remote's URL
                redact_url(f"`dvc {' '.join(args)}` failed in {self.root}: {msg[-1] if msg else proc.returncode}")
            )
        return proc

    def ensure_init(self) -> None:
        if (self.root / ".dvc").is_dir():
            return
        self("init", "-q") if (self.root / ".git").exists() else self("init", "-q", "--no-scm")
        self("config", "core.analytics", "false")
        self("config", "core.autostage", "false")

    def set_remote(self, name: str, url: str) -> None:
        """`name` at `url` as the default remote, in .dvc/config.local; read first (DVC's own config reader), so that
        a repo already set up costs no `dvc` process (every ingest and retrain opens the repo)."""
        from configobj import ConfigObj

        local = self.root / ".dvc" / "config.local"
        if local.exists():
            try:
                conf = ConfigObj(str(local))
                if conf.get("core", {}).get("remote") == name and conf.get(f'remote "{name}"', {}).get("url") == url:
                    return
            except Exception:  # unreadable: let DVC write it anew
                pass
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


def shown_remote(cfg: Config) -> str:
    """The remote as it may be shown and recorded (DataState, messages, run tags): no credentials."""
    return redact_url(remote_url(cfg))


def data_version(root: Path) -> str | None:
    f = root / DVC_FILE
    return _recorded(yaml.safe_load(f.read_text()) or {}) if f.exists() else None


def _recorded(doc: dict) -> str | None:
    """The version a parsed data.dvc records: its output's md5."""
    return ((doc.get("outs") or [{}])[0] or {}).get("md5")


def count_rows(data_dir: Path) -> dict[str, int]:
    def n(p: Path) -> int:
        with p.open("rb") as fh:
            return sum(1 for line in fh if line.strip())

    return {k: sum(n(p) for p in shard_files(data_dir / k)) for k in KINDS}


def _has_shards(data_dir: Path) -> bool:
    return any(shard_files(data_dir / k) for k in KINDS)


def _dvc_target(cfg: Config) -> str:
    """`dvc add` target: data/ relative to root (data.dvc must sit at the root). Judged on the resolved paths, `..`
    and symlinks followed: `data/../../tmp/x`, or a data/ that links out of the project, would version (and
    snapshot) content from outside it."""
    root, data = cfg.root_path.resolve(), cfg.data_path.resolve()
    try:
        target = data.relative_to(root)
    except ValueError:
        raise DataVersionError(
            f"data.dir ({cfg.data.dir}) resolves to {data}, outside the project root ({root}): set data.dir to a "
            "folder inside the project (no '..' out of it, no symlink out of it) so that data.dvc can track it"
        ) from None
    if target == Path("."):
        raise DataVersionError(f"data.dir ({cfg.data.dir}) is the project root itself: set it to a folder inside it")
    return str(target)


def open_repo(cfg: Config) -> Dvc:
    dvc = Dvc(cfg.root_path)
    dvc.ensure_init()
    dvc.set_remote(cfg.infra.dvc_remote_name, remote_url(cfg))
    recover(cfg)
    return dvc


def ensure_data(cfg: Config) -> DataState:
    """Make data/ match data.dvc (pull or regenerate), or create the demo data set and version it."""
    with data_lock(cfg, "prepare data"):
        return _ensure_data(cfg)


def pinned_data(cfg: Config, keep: int | None = 3) -> DataState:
    """`ensure_data`, then a snapshot of that version that later changes to data/ cannot touch: a
    retrain reads only this from start to end, so its stages train on the version in their cache keys
    and registry tags. Keeps the `keep` most recently used snapshots (None: all)."""
    with data_lock(cfg, "pin data for a retrain"):
        state = _ensure_data(cfg)
        root = cfg.state_path / "snapshots"
        dest = root / state.version
        if not (dest / SNAPSHOT_DONE).exists():
            tmp = root / f".{state.version}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(cfg.data_path, tmp, ignore=shutil.ignore_patterns(".*"))
            (tmp / SNAPSHOT_DONE).write_text(state.version)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        os.utime(dest)
        _prune_snapshots(root, dest, keep)
        return DataState(state.version, state.origin, state.rows, state.remote, str(dest))


def fetch_version(cfg: Config, version: str, keep: int | None = 3) -> DataState:
    """Data version `version` from the DVC remote into `<state>/snapshots/<version>`, on a machine with no data/
    of its own (a worker of another machine). A throwaway DVC repo whose `data.dvc` pins that version is
    pulled from the configured remote, so only DVC's own protocol touches the object store. Keeps the `keep` most
    recently used snapshots (None: all), as `pinned_data` does on the orchestrator."""
    if not re.fullmatch(r"[0-9a-f]{32}(\.dir)?", version):
        raise DataVersionError(f"{version!r} is not a data version (the md5 in data.dvc, e.g. 0123...cdef.dir)")
    root = cfg.state_path / "snapshots"
    dest = root / version
    with data_lock(cfg, f"fetch data {version}"):
        if not (dest / SNAPSHOT_DONE).exists():
            repo = root / f".{version}.fetch-{os.getpid()}"
            shutil.rmtree(repo, ignore_errors=True)
            repo.mkdir(parents=True)
            try:
                dvc = Dvc(repo)
                dvc.ensure_init()
                dvc.set_remote(cfg.infra.dvc_remote_name, remote_url(cfg))
                (repo / DVC_FILE).write_text(
                    yaml.safe_dump({"outs": [{"md5": version, "hash": "md5", "path": "data"}]})
                )
                if not dvc.pull(cfg.infra.dvc_remote_name):
                    raise DataVersionError(
                        f"data version {version} is not on the DVC remote {shown_remote(cfg)}: push it from the "
                        "orchestrator (`rlhf data`), or point RLHF_DVC_REMOTE / infra.dvc_remote_url at the remote "
                        "that has it"
                    )
                (repo / "data" / SNAPSHOT_DONE).write_text(version)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(repo / "data", dest)
            finally:
                shutil.rmtree(repo, ignore_errors=True)
        os.utime(dest)
        _prune_snapshots(root, dest, keep)
    return DataState(version, "fetched", count_rows(dest), shown_remote(cfg), str(dest))


def _prune_snapshots(root: Path, dest: Path, keep: int | None) -> None:
    """All but the `keep` most recently used snapshots under `root` (`dest` always kept), and the tmp copies of
    dead processes. Under the data lock."""
    others = sorted((d for d in root.iterdir() if d != dest), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in others[max(0, (keep if keep is not None else 10**9) - 1) :]:
        shutil.rmtree(old, ignore_errors=True)


def demo_mark(root: Path) -> dict | None:
    """Which demo data set data.dvc's version is, when it is one and nothing else (its generator settings); None.
    The mark names the version it was written for: after a `dvc add` by hand (DVC keeps `meta` as it is), or a kill
    between `dvc add` and the mark, the version differs and the mark counts for nothing."""
    f = root / DVC_FILE
    if not f.exists():
        return None
    doc = yaml.safe_load(f.read_text()) or {}
    mark = ((doc.get("meta") or {}).get("rlhf") or {}).get("demo")
    if not isinstance(mark, dict) or mark.get("version") != _recorded(doc):
        return None
    return {k: v for k, v in mark.items() if k != "version"}


def demo_settings(cfg: Config) -> dict:
    """What the demo generator's output depends on: the demo mark of the version it writes."""
    d = cfg.data
    keys = (
        "seed",
        "n_demonstrations",
        "n_preferences",
        "ranked_fraction",
        "max_rank_k",
        "n_prompts",
        "n_eval",
        "n_feedback",
        "feedback_rating_fraction",
        "annotator_temperature",
    )
    return {k: getattr(d, k) for k in keys}


def _set_demo_mark(root: Path, mark: dict | None) -> None:
    """Write (or, with None, remove) data.dvc's demo mark; DVC keeps `meta` as it is across `dvc add`."""
    f = root / DVC_FILE
    doc = yaml.safe_load(f.read_text()) or {}
    meta = doc.pop("meta", None) or {}
    rlhf = {k: v for k, v in (meta.pop("rlhf", None) or {}).items() if k != "demo"}
    if mark is not None:
        rlhf["demo"] = {"version": _recorded(doc), **mark}
    if rlhf:
        meta["rlhf"] = rlhf
    if meta:
        doc = {"meta": meta, **doc}
    _write_durably(f, yaml.safe_dump(doc, sort_keys=False))


def user_files(data_dir: Path) -> list[Path]:
    """Every file under data/ but hidden ones (DVC's, ours): what a demo would be written beside."""
    if not data_dir.is_dir():
        return []
    return sorted(
        p for p in data_dir.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data_dir).parts)
    )


def _is_this_demo(cfg: Config, found: list[Path]) -> bool:
    """Whether `found` (the files in data/) are all part of what the demo generator with this config writes, byte for
    byte (a demo written by `write_demo` but not versioned yet, or one whose writing was killed half-way, with its
    leftover temporary files): then generating it again loses nothing."""
    import tempfile

    if any(p.name not in DEMO_FILES for p in found):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(cfg.data, Path(tmp))
        fresh = {p.relative_to(tmp): p.read_bytes() for p in user_files(Path(tmp))}
    shards = [p for p in found if p.name == DEMO_SHARD]
    return all(fresh.get(p.relative_to(cfg.data_path)) == p.read_bytes() for p in shards)


def _named(files: list[Path], root: Path, most: int = 5) -> str:
    shown = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in files[:most]]
    return ", ".join(shown) + (f" and {len(files) - most} more" if len(files) > most else "")


def _unversioned(cfg: Config) -> DataVersionError | None:
    """Why data/ cannot be prepared when no data version exists yet and data/ holds files (None when it can): they
    are never versioned as they are (unvalidated) and never written beside."""
    found = user_files(cfg.data_path)
    if not found or (cfg.data.demo and _is_this_demo(cfg, found)):
        return None
    named = _named(found, cfg.root_path)
    if not cfg.data.demo:
        return DataVersionError(
            f"{cfg.data_path} holds files no data version has ({named}): nothing was read or written; add each with "
            "`rlhf ingest FILE --kind K` (validated, then versioned) from outside data/"
        )
    return DataVersionError(
        f"{cfg.data_path} holds files no data version has ({named}): the demo is never written beside other data, "
        "and nothing was written; start a project of your own with `rlhf init DIR` and add them with "
        "`rlhf ingest FILE --kind K`, or move them out of data/ to run the demo"
    )


def _write_demo_over(cfg: Config, old: list[Path]) -> None:
    """The demo into data/ in place of `old` (demo shards only): written beside data/ first, then each shard renamed
    into place, so a kill leaves data/ holding whole shards of the old demo or of this one (the next run writes it
    again: `_is_this_demo`), never a half-written file."""
    staged = cfg.state_path / "demo-staging"
    shutil.rmtree(staged, ignore_errors=True)
    write_demo(cfg.data, staged)
    for p in old:
        p.unlink(missing_ok=True)
    for p in user_files(staged):
        dest = cfg.data_path / p.relative_to(staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _move_into(p, dest)
    shutil.rmtree(staged, ignore_errors=True)


def _ensure_data(cfg: Config) -> DataState:
    remote, target = cfg.infra.dvc_remote_name, _dvc_target(cfg)  # refused before DVC touches anything
    if not (cfg.root_path / DVC_FILE).exists() and not _journal(cfg).exists() and (e := _unversioned(cfg)):
        raise e  # before `dvc init`: a directory of the user's own is left as it was
    dvc = open_repo(cfg)
    root = cfg.root_path
    recorded, mark = data_version(root), demo_mark(root)
    want = demo_settings(cfg) if cfg.data.demo else None
    switch = want is not None and mark is not None and mark != want  # data.dvc pins another demo set, pure
    if recorded is not None:
        if not dvc.status():
            if not switch:
                return DataState(recorded, "present", count_rows(cfg.data_path), shown_remote(cfg), str(cfg.data_path))
        elif _has_shards(cfg.data_path) and not (
            want is not None and mark is not None and _is_this_demo(cfg, user_files(cfg.data_path))
        ):  # (a demo's writing or switch that was killed half-way is written again, below)
            raise DataVersionError(
                f"{cfg.data_path} differs from {DVC_FILE} ({json.dumps(dvc.status())}).\n"
                f"  To keep the changes: add new examples with `rlhf ingest FILE --kind K` (validated), "
                f"or version them as they are with `dvc add {target}`.\n"
                f"  To discard them: `dvc checkout --force {DVC_FILE}`."
            )
        elif not switch and dvc.pull(remote) and not dvc.status():
            return DataState(recorded, "pulled", count_rows(cfg.data_path), shown_remote(cfg), str(cfg.data_path))
    if want is None:  # the project's own data: never generated
        if recorded is not None:
            raise DataVersionError(
                f"{DVC_FILE} records data version {recorded}, which neither {cfg.data_path} nor the DVC remote "
                f"({shown_remote(cfg)}) has: point infra.dvc_remote_url (or RLHF_DVC_REMOTE) at the remote that has "
                "it, then run again"
            )
        if e := _unversioned(cfg):
            raise e
        raise DataVersionError(
            f"no data yet in {cfg.data_path}: start it with `rlhf ingest FILE --kind demonstrations` (then "
            "preferences, prompts, eval; docs/quickstart.md); the demo has projects of its own: `rlhf init DIR --demo`"
        )
    if recorded is not None and mark is None:
        raise DataVersionError(
            f"{DVC_FILE} records data version {recorded}, which is not the demo alone (ingested or your own data) and "
            f"which neither {cfg.data_path} nor the DVC remote ({shown_remote(cfg)}) has: get it from the remote "
            "that has it (infra.dvc_remote_url=...), or start a demo elsewhere (`rlhf init DIR --demo`)"
        )
    found = user_files(cfg.data_path)
    if switch or (recorded is not None and mark is not None):  # data/ holds the pinned demo, or part of this one
        others = [p for p in found if p.name not in DEMO_FILES]
        if others:  # only the generator's shards may be replaced
            raise DataVersionError(
                f"{cfg.data_path} holds files besides the demo's ({_named(others, root)}): nothing was replaced; "
                "move them out of data/ and add them with `rlhf ingest FILE --kind K`"
            )
    elif e := _unversioned(cfg):
        raise e
    backup = (root / DVC_FILE).read_text() if recorded else None
    _write_demo_over(cfg, found)
    dvc.add(target)
    _set_demo_mark(root, want)
    version = data_version(root)
    if recorded is not None and not switch and version != recorded:
        (root / DVC_FILE).write_text(backup or "")
        shutil.rmtree(cfg.data_path, ignore_errors=True)
        raise DataVersionError(
            f"{DVC_FILE} records data version {recorded}, which the DVC remote ({shown_remote(cfg)}) does not have, "
            f"and the demo generator with this config gives {version}.\n"
            f"  Get the data from the remote that has it (`infra.dvc_remote_url=...`, then `dvc pull`), "
            f"or start over from the demo: `git checkout {DVC_FILE}` (or delete it) and run again."
        )
    if cfg.infra.dvc_push:
        dvc.push(remote)
    origin = "switched" if switch else "generated"
    return DataState(version or "", origin, count_rows(cfg.data_path), shown_remote(cfg), str(cfg.data_path))


def require_clean(cfg: Config, dvc: Dvc) -> str:
    """data/'s version when it matches data.dvc; "" when there is no data.dvc yet and data/ holds nothing (the first
    ingest starts the data set). DataVersionError otherwise."""
    if not (cfg.root_path / DVC_FILE).exists():
        if found := user_files(cfg.data_path):
            raise DataVersionError(
                f"{cfg.data_path} holds files no data version has ({_named(found, cfg.root_path)}): nothing was "
                "ingested; move them out of data/ and add each with `rlhf ingest FILE --kind K`"
            )
        return ""
    status = dvc.status()
    if status:
        raise DataVersionError(
            f"{cfg.data_path} does not match {DVC_FILE}: {json.dumps(status)}. "
            f"Run `rlhf validate` for details, `dvc checkout --force {DVC_FILE}` to discard local changes."
        )
    return data_version(cfg.root_path) or ""


# ----------------------------------------------------------------------------------------
# All-or-nothing shard commits
# ----------------------------------------------------------------------------------------
def _journal(cfg: Config) -> Path:
    return cfg.state_path / JOURNAL


def _write_durably(path: Path, text: str) -> None:
    """tmp + fsync + rename + fsync of the dir: after a power loss the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _move_into(staged: Path, dest: Path) -> None:
    """Rename `staged` to `dest`; across filesystems (state dir and data/ on different mounts), copy to a
    hidden partial file beside `dest`, fsync, then rename."""
    try:
        os.replace(staged, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        partial = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(staged, partial)
        with partial.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, dest)
        staged.unlink()


def commit_shard(cfg: Config, dvc: Dvc, staged: Path, dest: Path, on_step=lambda step: None) -> str:
    """Move `staged` to `dest` under data/, `dvc add` and push. Returns the new data version.
    The caller holds `data_lock`. On any failure the shard is removed and data.dvc restored; a kill is
    rolled back by `recover`."""
    dvc_file = cfg.root_path / DVC_FILE
    journal = _journal(cfg)
    journal.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "shard": str(dest),
        "data_dvc": dvc_file.read_text() if dvc_file.exists() else None,
        "started": time.time(),
        "owner": str(Owner.me()),
    }
    _write_durably(journal, json.dumps(entry))  # the journal exists before anything under data/ changes
    try:
        on_step("write shard")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _move_into(staged, dest)
        add_and_push(cfg, dvc, on_step)
    except BaseException:
        _rollback(cfg, entry)
        raise
    journal.unlink()
    return data_version(cfg.root_path) or ""


def add_and_push(cfg: Config, dvc: Dvc, on_step=lambda step: None) -> None:
    """Version data/ as it now is (`dvc add`) and push it to the remote (unless infra.dvc_push is off)."""
    on_step("dvc add")
    dvc.add(_dvc_target(cfg))
    if demo_mark(cfg.root_path) is not None:
        _set_demo_mark(cfg.root_path, None)  # no longer the demo alone: never replaced by another demo set
    if cfg.infra.dvc_push:
        on_step("dvc push")
        dvc.push(cfg.infra.dvc_remote_name)


def _rollback(cfg: Config, entry: dict) -> None:
    shard = Path(entry["shard"])
    shard.unlink(missing_ok=True)
    shard.with_name(f".{shard.name}.partial").unlink(missing_ok=True)
    dvc_file = cfg.root_path / DVC_FILE
    if entry["data_dvc"] is None:
        dvc_file.unlink(missing_ok=True)
    else:
        _write_durably(dvc_file, entry["data_dvc"])
    _journal(cfg).unlink(missing_ok=True)


def recover(cfg: Config) -> str | None:
    """Roll back an ingest that was interrupted (killed) half-way. Returns a message if it did.
    Under the data lock, so a journal here belongs to a dead process (a live ingest holds the lock)."""
    with data_lock(cfg, "recover"):
        journal = _journal(cfg)
        if not journal.exists():
            return None
        try:
            entry = json.loads(journal.read_text())
        except ValueError:  # written before the fsync'd journal, or damaged: it cannot say what to undo
            journal.unlink()
            msg = (
                f"an unreadable ingest journal ({journal}) was removed; if `dvc status` now reports changes, "
                f"`dvc checkout --force {DVC_FILE}` restores data/ to the recorded version"
            )
            print(f"⚠ {msg}", file=sys.stderr)
            return msg
        _rollback(cfg, entry)
        owner = Owner.parse(entry.get("owner"))
        msg = (
            f"recovered from an interrupted ingest{f' ({owner.describe()})' if owner else ''}: rolled back "
            f"{entry['shard']} and {DVC_FILE}; that batch was NOT ingested - run the ingest again"
        )
        print(f"⚠ {msg}", file=sys.stderr)
        return msg
