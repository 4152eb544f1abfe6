"""Metric logging from components to the *active* MLflow run, under a namespace (`sft/loss`), and the
completion marker of HF Trainer checkpoints.

Components never set up tracking; when no run is active nothing is logged, and in a stage that runs as several
processes only rank 0 logs (components/training/distributed.py). A process that never imported MLflow has no active
run, so a component called outside any run (a benchmark, a GPU machine without MLflow) does not need MLflow at all:
`active_mlflow()` looks in `sys.modules` and imports nothing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from components.training.checkpoint import mark_checkpoint_complete
from components.training.distributed import is_main


def active_mlflow():
    """The mlflow module when this process has an active run on rank 0, else None. MLflow is not imported: a run
    can only be active if something in this process imported it already."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or not hasattr(mlflow, "active_run") or mlflow.active_run() is None or not is_main():
        return None
    return mlflow


def log_to_active_run(metrics: dict[str, float], step: int) -> None:
    """Log finite metrics to the active MLflow run, if there is one (rank 0 only)."""
    if (mlflow := active_mlflow()) is None:
        return
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_table_to_active_run(columns: dict[str, list], artifact_file: str) -> None:
    """Log a table (column -> values) as an MLflow table artifact of the active run, if there is one (rank 0 only)."""
    if (mlflow := active_mlflow()) is not None:
        mlflow.log_table(data=columns, artifact_file=artifact_file)


class MlflowNamespaceCallback(TrainerCallback):
    def __init__(self, namespace: str):
        self.namespace = namespace

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            log_to_active_run(
                {f"{self.namespace}/{k.removeprefix('train_')}": v for k, v in logs.items()}, state.global_step
            )


class CheckpointCompleteCallback(TrainerCallback):
    """Marks each HF checkpoint complete once saved, so a resume (`checkpoint.last_complete_checkpoint`)
    never picks one a kill left half written. `Trainer._maybe_log_save_evaluate` (transformers 5.23)
    calls `on_save` right after `_save_checkpoint` returns (model, optimizer, scheduler, RNG and
    trainer_state.json written, old checkpoints rotated), so the marker is the last thing in the dir."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        d = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if d.is_dir():
            mark_checkpoint_complete(d, state.global_step)
