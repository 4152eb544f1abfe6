"""The model registry: log a policy as a self-contained pyfunc, register it, move aliases.

Lifecycle (docs/architecture.md): a candidate that passes the gate becomes a registered version with
alias `challenger`; approval moves `champion` to it (recording the previous champion on the
version, so `rollback` can move `champion` back). Uses the active tracking URI; no setup here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POLICY_MODEL_FILE = Path(__file__).with_name("policy_model.py")
CHALLENGER, CHAMPION = "challenger", "champion"
EXAMPLE_PROMPTS = ["The film was", "After a week with these headphones, I think"]


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>


def log_and_register(
    registered_name: str,
    base_dir: str,
    adapter_dir: str | None,
    tags: dict[str, str],
    limits: dict | None = None,
    reward_dir: str | None = None,
) -> Registered:
    """Log the pyfunc (base + adapter + tokenizer) to the active run, register it, alias `challenger`.

    `limits`: overrides of the serving caps (policy_model.Limits); all caps, defaults included, are written
    into the logged model's `model_config`, so the served model states the caps it enforces.
    `reward_dir`: the reward stage's output (adapter/, head.safetensors, head.json), bundled so the served
    model answers best-of-n (`params.n`) and returns each response's `score`.
    """
    with policy_artifacts(base_dir, adapter_dir, reward_dir) as artifacts:
        info = _log_model(registered_name, artifacts, model_signature(reward_dir is not None), limits)
    return finish_registration(registered_name, str(info.registered_model_version), tags)


def model_signature(with_score: bool):
    """The served policy's signature: one string column of prompts in, `response` (and `score`) out, with the
    request params (policy_model.DEFAULT_PARAMS) declared, so that MLflow passes them on."""
    import pandas as pd
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    from components.registry.policy_model import DEFAULT_PARAMS

    # One string column matched by position, not by name: a DataFrame with a `prompt` column and a plain
    # list of strings (`inputs`) both pass schema enforcement.
    params = infer_signature(pd.DataFrame({"prompt": EXAMPLE_PROMPTS}), params=DEFAULT_PARAMS).params
    outputs: list[ColSpec | TensorSpec] = [ColSpec(DataType.string, "response")]
    if with_score:
        outputs.append(ColSpec(DataType.double, "score"))
    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]), outputs=Schema(outputs), params=params)


@contextmanager
def policy_artifacts(base_dir: str, adapter_dir: str | None, reward_dir: str | None) -> Iterator[dict[str, str]]:
    """The pyfunc's artifacts: base, adapter and, from a reward stage's output, the reward adapter and its head
    (head.safetensors + head.json only, not the stage's checkpoints, staged in a temporary dir; of an ensemble, its
    first member)."""
    import json
    import shutil
    import tempfile

    from components.models.roles import ENSEMBLE, HEAD_FILE, HEAD_META

    artifacts = {"base": base_dir, **({"adapter": adapter_dir} if adapter_dir else {})}
    staging = Path(tempfile.mkdtemp(prefix="rlhf-register-"))
    try:
        if reward_dir:
            head = staging / "reward_head"
            head.mkdir()
            shutil.copy2(Path(reward_dir) / HEAD_FILE, head / HEAD_FILE)
            # an ensemble's first member alone (reward.ensemble > 1): best-of-n ranks with it, as its own model
            meta = json.loads((Path(reward_dir) / HEAD_META).read_text())
            meta.pop(ENSEMBLE, None)
            (head / HEAD_META).write_text(json.dumps(meta, indent=2))
            artifacts |= {"reward_adapter": str(Path(reward_dir) / "adapter"), "reward_head": str(head)}
        yield artifacts
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _log_model(registered_name: str, artifacts: dict[str, str], signature, limits: dict | None):
    import mlflow
    import pandas as pd
    import peft
    import torch
    import transformers

    from components.registry.policy_model import Limits

    return mlflow.pyfunc.log_model(
        name="policy",
        python_model=str(POLICY_MODEL_FILE),
        artifacts=artifacts,
        signature=signature,
        input_example=pd.DataFrame({"prompt": EXAMPLE_PROMPTS}),
        registered_model_name=registered_name,
        model_config=Limits.from_config(limits).as_config(),  # the serving caps, read back at load
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
            f"peft=={peft.__version__}",
            f"pandas=={pd.__version__}",
            f"mlflow=={mlflow.__version__}",
            f"safetensors=={_version('safetensors')}",
        ],
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def finish_registration(registered_name: str, version: str, tags: dict[str, str]) -> Registered:
    """Tag a registered version and alias it `challenger` (idempotent: a retry may run it again)."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    client.set_registered_model_alias(registered_name, CHALLENGER, version)
    return Registered(registered_name, version, f"models:/{registered_name}/{version}")


def alias_version(registered_name: str, alias: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(registered_name, alias).version)
    except MlflowException:
        return None


def promote(registered_name: str, version: str, approver: str) -> str | None:
    """Move `champion` to `version`; returns the previous champion (recorded on the version for rollback)."""
    import mlflow

    client = mlflow.MlflowClient()
    previous = alias_version(registered_name, CHAMPION)
    if previous and previous != version:
        client.set_model_version_tag(registered_name, version, "previous_champion", previous)
    client.set_model_version_tag(registered_name, version, "approver", approver)
    client.set_registered_model_alias(registered_name, CHAMPION, version)
    if ROLLED_BACK in client.get_model_version(registered_name, version).tags:  # promoted again on purpose
        client.delete_model_version_tag(registered_name, version, ROLLED_BACK)
    return previous


def rollback(registered_name: str, by: str = "unknown", reason: str = "") -> tuple[str, str]:
    """Move `champion` back to the version it replaced: -> (from, to). ValueError when there is none.

    The version rolled back is tagged `rolled_back` (when, by whom, why) and its model card says so: a
    retrain on the same data version and config will not promote it again (`rolled_back_like`)."""
    import time

    import mlflow

    client = mlflow.MlflowClient()
    current = alias_version(registered_name, CHAMPION)
    if current is None:
        raise ValueError(f"registered model {registered_name!r} has no champion to roll back")
    version = client.get_model_version(registered_name, current)
    previous = version.tags.get("previous_champion")
    if not previous:
        raise ValueError(
            f"champion v{current} of {registered_name!r} replaced no earlier champion: nothing to roll back to"
        )
    note = f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by {by}" + (f": {reason}" if reason else "")
    client.set_registered_model_alias(registered_name, CHAMPION, previous)
    client.set_model_version_tag(registered_name, current, ROLLED_BACK, note)
    client.update_model_version(
        registered_name,
        current,
        description=(version.description or "")
        + (
            f"\n\n## Rolled back\n\n{note}. `{CHAMPION}` went back to v{previous}. A retrain on the same data "
            f"version and config does not promote this model again; new data or a changed config does."
        ),
    )
    return current, previous


ROLLED_BACK = "rolled_back"


def rolled_back_like(registered_name: str, data_version: str, config_hash: str):
    """A rolled-back version trained on this data version with this config (its ModelVersion), or None."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{registered_name}' and tags.data_version = '{data_version}' and tags.config_hash = '{config_hash}'"
    )
    return next((v for v in versions if ROLLED_BACK in v.tags), None)


def registered_by(registered_name: str, register_run_ids: list[str]) -> str | None:
    """The version a register run already created (a retried register must not create a second one)."""
    import mlflow

    if not register_run_ids:
        return None
    ids = ", ".join(f"'{r}'" for r in register_run_ids)
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{registered_name}' and run_id IN ({ids})")
    return str(min(int(v.version) for v in versions)) if versions else None


def version_tags(registered_name: str, version: str) -> dict[str, str]:
    import mlflow

    return dict(mlflow.MlflowClient().get_model_version(registered_name, version).tags)


def describe(registered_name: str, version: str, text: str) -> None:
    """Set a version's description (its model card, shown in the MLflow UI)."""
    import mlflow

    mlflow.MlflowClient().update_model_version(registered_name, version, description=text)


def download_version(registered_name: str, version: str) -> dict[str, str]:
    """A registered version's artifacts on local disk: {"base": ..., "adapter": ...}."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{registered_name}/{version}"))
    return artifact_paths(local)


def artifact_paths(model_dir: Path) -> dict[str, str]:
    """Where a downloaded policy model keeps its artifacts: {"base": ..., "adapter": ...} (from its MLmodel)."""
    from mlflow.models import Model

    conf = Model.load(str(model_dir)).flavors["python_function"]["artifacts"]
    return {key: str(Path(model_dir) / entry["path"]) for key, entry in conf.items()}
