"""Trainer callback that logs to the *active* MLflow run under a namespace (`sft/loss`).

Components never set up tracking; when no run is active nothing is logged.
"""
from __future__ import annotations

import math

from transformers import TrainerCallback


class MlflowNamespaceCallback(TrainerCallback):
    def __init__(self, namespace: str):
        self.namespace = namespace

    def on_log(self, args, state, control, logs=None, **kwargs):
        import mlflow

        if not logs or mlflow.active_run() is None:
            return
        metrics = {f"{self.namespace}/{k.removeprefix('train_')}": float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)
