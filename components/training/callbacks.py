"""Metric logging from components to the *active* MLflow run, under a namespace (`sft/loss`).

Components never set up tracking; when no run is active nothing is logged.
"""
from __future__ import annotations

import math

from transformers import TrainerCallback


def log_to_active_run(metrics: dict[str, float], step: int) -> None:
    """Log finite metrics to the active MLflow run, if there is one."""
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_table_to_active_run(columns: dict[str, list], artifact_file: str) -> None:
    """Log a table (column -> values) as an MLflow table artifact of the active run, if there is one."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_table(data=columns, artifact_file=artifact_file)


class MlflowNamespaceCallback(TrainerCallback):
    def __init__(self, namespace: str):
        self.namespace = namespace

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            log_to_active_run({f"{self.namespace}/{k.removeprefix('train_')}": v for k, v in logs.items()}, state.global_step)
