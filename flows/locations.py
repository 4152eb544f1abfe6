"""Where a stage's output lives: a directory on this machine (a stage that ran here), or an MLflow artifact URI
(`runs:/<run_id>/output/...`) when it ran on a worker of the training pool (flows/dispatch.py). The stages, the
cache and dispatch read locations through these functions alone."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
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


def local_path(cfg: Config, location: str) -> str:
    """A stage output on this machine: downloaded once into `<state>/inputs/` (a URI), else the path itself."""
    if not is_uri(location):
        return location
    import fcntl

    import mlflow

    dest = cfg.state_path / "inputs" / location.replace(":/", "/").strip("/").replace("/", "__")
    done = dest.parent / f"{dest.name}.complete"  # beside it, not in it (it may be bundled into a model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two stages of this machine fetching the same input: one downloads
        if not done.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
            try:
                got = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp)))
                shutil.rmtree(dest, ignore_errors=True)  # a partial copy of a killed download
                os.replace(got, dest)
                done.write_text(location)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
