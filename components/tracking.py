"""The one MLflow helper: tracking URI, experiment, run names, config as params.

Flows call `setup` once; components only log to the active run (never set up tracking).
"""

from __future__ import annotations

import contextlib
import logging
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
EXPERIMENT_KIND, TRAINING, GENAI = "mlflow.experimentKind", "custom_model_development", "genai_development"
SERVING_SUFFIX = "-serving"  # the served answers' traces and the canaries live in `<experiment>-serving`
# a URL in longer text: up to whitespace or a quote, less trailing punctuation (`see http://h/x?t=1.`)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+?(?=[.,:;!)\]}]*(?:[\s'\"<>]|$))", re.I)
# userinfo: `user:password@` (the password may hold `/`: `u:pa/ss@`; the user may be empty: `:pw@`) or a
# bare `token@`. A path with `@` after a port (`http://h:5000/a@b`) reads as user:password too: redacted,
# the safe side. Without `://` nothing is touched (`user@example.com`).
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)(?:[^/?#@:]*:[^@]*|[^/?#@:]+)@", re.I)
_QUERY_PARAM = re.compile(r"([?&#])([^=&#]+)=([^&#]*)")
# query parameters that carry a secret without a secret-looking word (signed URLs, `?key=` API keys)
_SECRET_QUERY = {"sig", "signature", "x-amz-signature", "key", "pass", "pwd", "code"}


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


def serving_experiment(cfg: Config) -> str:
    """The experiment of the served answers (traces, feedback) and the canaries' runs: `<tracking.experiment>-serving`,
    apart from the training runs so that each opens on what it holds in the MLflow UI (traces there, runs here).
    Points MLflow at the store (as `setup`) without changing the active experiment. -> its id."""
    import mlflow

    setup(cfg)
    name = cfg.tracking.experiment + SERVING_SUFFIX
    exp = mlflow.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(name, artifact_location=artifact_root(cfg))
    if exp is None or exp.tags.get(EXPERIMENT_KIND) != GENAI:
        mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND, GENAI)
    return exp_id


def trace_experiments(cfg: Config) -> list[str]:
    """Where served answers are: the serving experiment, and the training one (traces from before they were apart)."""
    return [serving_experiment(cfg), setup(cfg)]


def run_name(cfg: Config, stage: str) -> str:
    return f"{cfg.tracking.run_name_prefix}{stage}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_secret_key(key: str) -> bool:
    """True when a word of `key` names a secret (`ppo.hf_token`, `apiKey`), not for `ppo.max_new_tokens`."""
    return bool(_SECRET_KEY.search(_CAMEL_BOUNDARY.sub("_", key)))


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`: userinfo (`https://***@host`)
    and secret query parameters (`?token=***`). Everything else is left as it is, so the value still
    says where things are (`s3://bucket/path`, `http://localhost:5000`)."""
    return _URL.sub(lambda m: _redact_one_url(m.group(0)), text)


def _redact_one_url(url: str) -> str:
    url = _USERINFO.sub(r"\1***@", url, count=1)

    def param(m: re.Match) -> str:
        name = m.group(2)
        secret = is_secret_key(name) or name.lower() in _SECRET_QUERY
        return f"{m.group(1)}{name}=***" if secret and m.group(3) else m.group(0)

    return _QUERY_PARAM.sub(param, url)


def redact(key: str, value: Any) -> Any:
    """What may be logged of a config value: `***` for a secret-named key, URL credentials removed."""
    if is_secret_key(key) and value not in (None, "", []):
        return "***"
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (list, tuple)):  # a list setting logs as one value: every item redacted
        return [redact(key, v) for v in value]
    return value


def redact_override(override: str) -> str:
    """A Hydra override as it may be shown or stored (a deployment's parameters): `key=***` for a
    secret-named key, URL credentials removed from the value."""
    key, eq, value = override.partition("=")
    return f"{key}{eq}{redact(key.lstrip('+~'), value)}" if eq else override


def redacted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config dict as it may be logged: `redact` on every leaf, the key dotted from the root."""
    return {k: redacted(v, f"{prefix}{k}.") if isinstance(v, dict) else redact(f"{prefix}{k}", v) for k, v in d.items()}


def redacted_yaml(cfg: Config) -> str:
    """The config as YAML for a run's `config.yaml` or `rlhf config`: the same redaction as the params."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(redacted(to_dict(cfg))))


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


def ui_page(cfg: Config, serving: bool = False) -> str:
    """The UI page of the training runs (or of the served answers' traces) as a hash route, for a local store that
    has the experiment ("" otherwise: a remote server is not contacted just to print a link). MLflow 3.17 opens an
    experiment on the tab of its global "GenAI | Model training" switch (GenAI by default: its Overview), so the
    route names the workflow and the tab."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:///") or not Path(uri.removeprefix("sqlite:///")).is_file():
        return ""
    import mlflow

    with quiet("mlflow.store.db.utils"):
        name = cfg.tracking.experiment + (SERVING_SUFFIX if serving else "")
        exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if exp is None:
        return ""
    if serving:
        return f"#/experiments/{exp.experiment_id}/traces?workflowType=genai"
    return f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


def ui_command(cfg: Config, serving: bool = False) -> str:
    """Where to see the runs, said once: the command that serves a local store and the page it opens, or the
    tracking server's address. Printed, so credentials in the tracking URI are redacted."""
    uri = redact_url(tracking_uri(cfg))
    if uri.startswith("sqlite"):
        try:
            page = ui_page(cfg, serving)
        except Exception:  # the store cannot be read now: the address alone still says where to look
            page = ""
        return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000" + (f"/{page}" if page else "")
    return f"open {uri}"


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
        "dvc_remote": redact_url(remote) if remote else "none",
        **{f"rows_{k}": str(v) for k, v in rows.items()},
    }
    mlflow.log_input(dataset, context="training", tags=tags)


@contextlib.contextmanager
def quiet(logger: str):
    """A block in which `logger` says nothing below ERROR (MLflow's warning beside our own one sentence)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
