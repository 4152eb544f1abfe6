"""Process environment for the service: where Prefect, GX, DVC and MLflow keep state.

Must run before prefect is imported (Prefect reads its settings at import time).
"""
from __future__ import annotations

import os
import warnings

from components.config import Config


def configure_environment(cfg: Config) -> None:
    # TRL and peft still read transformers' deprecated `is_gradient_checkpointing`: not ours to fix, and
    # the warning repeats on every stage
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    state = cfg.state_path
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    if cfg.infra.prefect_api_url:
        os.environ["PREFECT_API_URL"] = cfg.infra.prefect_api_url
    for key, value in {
        "GX_ANALYTICS_ENABLED": "False",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
