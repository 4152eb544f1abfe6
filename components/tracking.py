"""The one MLflow helper: tracking URI, experiment, run names, config as params.

Flows call `setup` once; components only log to the active run (never set up tracking).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from components.config import Config, to_dict

MAX_PARAM_KEY = 250  # MLflow limits
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
# A secret-looking *word* of a key: `hf_token`, `PREFECT_API_KEY`, `db_passwd`, `client_secret`, `auth_string`
# (words are split on `.`, `_`, `-`, digits and camelCase), never a word that merely contains one:
# `max_new_tokens`, `tokenizer`, `tokens_per_second` are settings, not secrets.
_SECRET_KEY = re.compile(
    r"(?<![a-z])(passwords?|passwd|passphrase|secrets?|token|credentials?|o?auth|authorization|bearer"
    r"|(api|access|private|secret)[_-]?key)(?![a-z])",
    re.I,
)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"
_URL_CREDENTIALS = re.compile(r"(://)[^/@:\s]+:[^/@\s]+@")


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or f"sqlite:///{cfg.state_path / 'mlflow.db'}"


def artifact_root(cfg: Config) -> str:
    return cfg.tracking.artifact_root or (cfg.state_path / "mlartifacts").as_uri()


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    import mlflow

    cfg.state_path.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_root(cfg))
    )
    if exp is None or exp.tags.get(EXPERIMENT_KIND) != TRAINING:  # the UI opens on the runs table, not GenAI traces
        mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND, TRAINING)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def run_name(cfg: Config, stage: str) -> str:
    return f"{cfg.tracking.run_name_prefix}{stage}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_secret_key(key: str) -> bool:
    """True when a word of `key` names a secret (`ppo.hf_token`, `apiKey`), not for `ppo.max_new_tokens`."""
    return bool(_SECRET_KEY.search(_CAMEL_BOUNDARY.sub("_", key)))


def redact(key: str, value: Any) -> Any:
    if is_secret_key(key) and value not in (None, ""):
        return "***"
    return _URL_CREDENTIALS.sub(r"\1***@", value) if isinstance(value, str) else value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"ppo.lora.r": "8", ...}, secrets redacted, within MLflow's key/value limits."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
            continue
        text = str(redact(key, v))
        out[key[:MAX_PARAM_KEY]] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


def log_params(params: dict[str, str]) -> None:
    """Params to the active run, in batches within MLflow's limit."""
    import mlflow

    items = sorted(params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_PER_BATCH]))


def log_config(cfg: Config) -> dict[str, str]:
    params = flatten(to_dict(cfg))
    log_params(params)
    return params


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries (MLflow rejects NaN/inf and strings): NaN is how a stage says "not measured"."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def child_run_ids(parent_run_id: str, stage: str) -> list[str]:
    """The child runs of a pipeline run for one stage (all tries, e.g. of a retried task)."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}'",
        search_all_experiments=True,
        output_format="list",
    )
    return [r.info.run_id for r in runs]


def ui_command(cfg: Config) -> str:
    uri = tracking_uri(cfg)
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"


def log_data_input(data_path: Path, version: str, rows: dict[str, int], remote: str | None) -> None:
    """Record the DVC-versioned training data as the active run's input (MLflow datasets):
    source = the data dir, digest = the DVC md5 of data/ (what `data.dvc` pins)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    dataset = MetaDataset(resolve_dataset_source(str(data_path)), name=f"data@{version}", digest=version[:36])
    tags = {
        "dvc_path": "data",
        "dvc_md5": version,
        "dvc_remote": remote or "none",
        **{f"rows_{k}": str(v) for k, v in rows.items()},
    }
    mlflow.log_input(dataset, context="training", tags=tags)
