"""Where a stage's output lives: a directory on this machine (a stage that ran here), or an MLflow artifact URI
(`runs:/<run_id>/output/...`) when it ran on a worker of the training pool (flows/dispatch.py). The stages, the
cache and dispatch read locations through these functions alone."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from components.config import Config

OUTPUT = "output"  # artifact path of a stage's outputs in its MLflow run
# the only URI a stage output has: an artifact under `output` of a run of the tracking server this process uses
# (`mlflow-artifacts://<host>/...` would send this process's MLflow credentials to <host>)
RUN_OUTPUT = re.compile(rf"runs:/(?P<run>[0-9a-f]{{32}})/{OUTPUT}(/[A-Za-z0-9_.\-]+)*")


class UntrustedInput(ValueError):
    """A stage request named an input a worker does not read."""


def is_uri(location: str) -> bool:
    return location.startswith("runs:/")


def check_input(name: str, location: object, cfg: Config, experiment_id: str) -> None:
    """A worker's check of one input of a stage request (anyone who reaches the Prefect API can send one):
    `runs:/<run id>/output/...` of a finished run in the experiment of the retrain that asks, or - the base model
    only - the configured model itself (`model.name_or_path`). Anything else, a worker-local path, another host's
    artifact URI, a registry URI, `..`, raises UntrustedInput in one sentence."""
    import mlflow

    shown = repr(location) if len(repr(location)) <= 120 else repr(location)[:117] + "..."
    if name == "base_path" and location == cfg.model.name_or_path:
        return
    match = RUN_OUTPUT.fullmatch(location) if isinstance(location, str) else None
    if match is None or ".." in location.split("/"):
        raise UntrustedInput(
            f"stage input {name}={shown} refused: a worker reads only runs:/<run id>/{OUTPUT}/... of this "
            f"project's runs (or, as base_path, the configured model {cfg.model.name_or_path!r}); redeploy the "
            "orchestrator at this version if it sent it"
        )
    try:
        run = mlflow.MlflowClient().get_run(match["run"])
    except Exception as e:
        raise UntrustedInput(f"stage input {name}={shown} refused: no such run on this tracking server") from e
    if run.info.experiment_id != experiment_id or run.info.status != "FINISHED":
        raise UntrustedInput(
            f"stage input {name}={shown} refused: its run is not a finished run of the requesting retrain's "
            f"experiment (experiment {run.info.experiment_id}, {run.info.status})"
        )


def available(location: str) -> bool:
    """A stage output that can still be read: a finished MLflow run's artifact (URIs)."""
    import mlflow

    run_id = location.split("/")[1] if location.startswith("runs:/") else None
    if run_id is None:
        return False
    try:
        return mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    except Exception:
        return False


INPUTS = "inputs"  # <state>/inputs/: stage outputs of other machines, downloaded once
INPUTS_PER_STAGE_OUTPUT = 4  # inputs kept: this many per kept stage output (base, SFT, reward model, policy)


def _input_dest(cfg: Config, location: str) -> Path:
    return cfg.state_path / INPUTS / location.replace(":/", "/").strip("/").replace("/", "__")


@contextmanager
def inputs_in_use(cfg: Config, locations: dict[str, str]) -> Iterator[dict[str, str]]:
    """Each location on this machine: a URI downloaded once into `<state>/inputs/`, a path as it is; marked in use
    until the block ends (a shared lock on `<input>.inuse`, which `prune_inputs` respects). -> {name: local path}."""
    with ExitStack() as stack:
        paths = {}
        for name, location in locations.items():
            if not is_uri(location):
                paths[name] = location
                continue
            dest = _input_dest(cfg, location)
            dest.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_held(dest.parent / f"{dest.name}.inuse", fcntl.LOCK_SH))
            with _held(dest.parent / f"{dest.name}.lock", fcntl.LOCK_EX):  # one download per machine
                done = dest.parent / f"{dest.name}.complete"  # beside it, not in it (it may be bundled into a model)
                if not done.exists():
                    _download(location, dest)
                    done.write_text(location)
            os.utime(done)  # recently used: kept by prune_inputs
            paths[name] = str(dest)
        yield paths


@contextmanager
def _held(path: Path, how: int, blocking: bool = True) -> Iterator[bool]:
    """flock `path` (`how`: LOCK_SH or LOCK_EX) for the block; -> False at once when not `blocking` and it is held.
    A lock on a file that a prune unlinked in between is taken again on the file now at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, how | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)


def _download(location: str, dest: Path) -> None:
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix=f".download-{dest.name}-", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp)))
        shutil.rmtree(dest, ignore_errors=True)  # a partial copy of a killed download
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune_inputs(cfg: Config) -> list[str]:
    """Delete downloaded inputs beyond the most recently used `INPUTS_PER_STAGE_OUTPUT x infra.keep_stage_outputs`
    (None: keep all), never one in use, and downloads a killed process left half-done. -> the deleted names."""
    root, keep = cfg.state_path / INPUTS, cfg.infra.keep_stage_outputs
    if keep is None or not root.is_dir():
        return []
    for tmp in root.glob(".download-*"):  # a killed download's leftovers (a live one holds its input's .lock)
        lock = root / f"{tmp.name.removeprefix('.download-').rsplit('-', 1)[0]}.lock"
        with _held(lock, fcntl.LOCK_EX, blocking=False) as free:
            if free:
                shutil.rmtree(tmp, ignore_errors=True)
    done = sorted(root.glob("*.complete"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for marker in done[keep * INPUTS_PER_STAGE_OUTPUT :]:
        dest = marker.with_suffix("")
        with _held(root / f"{dest.name}.inuse", fcntl.LOCK_EX, blocking=False) as free:
            if not free:
                continue
            marker.unlink(missing_ok=True)  # first: a half-deleted input is never taken for a complete one
            shutil.rmtree(dest, ignore_errors=True)
            for suffix in (".lock", ".inuse"):
                (root / f"{dest.name}{suffix}").unlink(missing_ok=True)
        removed.append(dest.name)
    return removed
