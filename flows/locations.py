"""Where a stage's output lives: a directory on this machine (a stage that ran here), or an MLflow artifact URI
(`runs:/<run_id>/output/...`) when it ran on a worker of the training pool (flows/dispatch.py). The stages, the
cache and dispatch read locations through these functions alone."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from components.config import Config


def is_uri(location: str) -> bool:
    return location.startswith(("runs:/", "mlflow-artifacts:/", "models:/"))


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
