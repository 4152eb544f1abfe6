"""The model registry: log a policy as a self-contained pyfunc, register it, move aliases.

Lifecycle (docs/architecture.md): a candidate that passes the gate becomes a registered version with
alias `candidate`; approval moves `champion` to it (recording the previous champion on the
version, so `rollback` can move `champion` back). Uses the active tracking URI; no setup here.

Moving `champion` is a compare-and-set under a fence (issue 38): `promote` moves it only while it still points at
the version the candidate was compared with, and only after the caller's fence (the retrain slot's, service/slot.py)
confirmed that the caller still holds the slot, which everything that moves `champion` takes. MLflow has no
compare-and-set on an alias: the slot makes the read and the move one step, as no one else moves it meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

POLICY_MODEL_FILE = Path(__file__).with_name("policy_model.py")
# candidate: the newest registered version; challenger: the version in a canary against the champion (issue 41)
CANDIDATE, CHALLENGER, CHAMPION = "candidate", "challenger", "champion"
COMPARED, SLOT_GENERATION = "champion_compared", "slot_generation"  # version tags: the baseline, the fence
_FROM_TAG = object()  # `promote`'s default baseline: the version's own `champion_compared` tag
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
    lineage: dict | None = None,
    warm_reward_dir: str | None = None,
) -> Registered:
    """Log the pyfunc (base + adapter + tokenizer) to the active run, register it, alias `candidate`.

    `limits`: overrides of the serving caps (policy_model.Limits); all caps, defaults included, are written
    into the logged model's `model_config`, so the served model states the caps it enforces.
    `reward_dir`: the reward stage's output (adapter/, head.safetensors, head.json), bundled so the served
    model answers best-of-n (`params.n`) and returns each response's `score`.
    `lineage`: what the candidate was trained on (components/data/lineage.py); with it and an adapter, the version
    carries the warm-start bundle an incremental retrain continues from (components/models/warm_start.py), with the
    reward model of `warm_reward_dir` (default: `reward_dir`; the bundle has it even when serving does not).
    """
    with policy_artifacts(base_dir, adapter_dir, reward_dir, lineage, warm_reward_dir or reward_dir) as artifacts:
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
def policy_artifacts(
    base_dir: str,
    adapter_dir: str | None,
    reward_dir: str | None,
    lineage: dict | None = None,
    warm_reward_dir: str | None = None,
) -> Iterator[dict[str, str]]:
    """The pyfunc's artifacts: base, adapter and, from a reward stage's output, the reward adapter and its head
    (head.safetensors + head.json only, not the stage's checkpoints, staged in a temporary dir; of an ensemble, its
    first member); with `lineage`, the warm-start bundle (every member, the value function, the lineage)."""
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
        if lineage is not None and adapter_dir:
            from components.models import warm_start

            bundle = warm_start.stage(staging / "warm_start", warm_reward_dir, adapter_dir, lineage)
            artifacts["warm_start"] = str(bundle)
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
    """Tag a registered version and alias it `candidate` (idempotent: a retry may run it again)."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    client.set_registered_model_alias(registered_name, CANDIDATE, version)
    return Registered(registered_name, version, f"models:/{registered_name}/{version}")


def alias_version(registered_name: str, alias: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(registered_name, alias).version)
    except MlflowException:
        return None


class ChampionMoved(Exception):
    """`champion` no longer points at the version a candidate was compared with: promoting the candidate would
    replace a model its gate never saw. The message says what happened; `against` names the new baseline."""

    def __init__(self, registered_name: str, compared: str | None, current: str | None, since: str):
        self.compared, self.current = compared, current
        self.against = f"v{current}" if current else "the SFT policy (there is no champion now)"
        was = f"v{compared}" if compared else "none"
        super().__init__(
            f"{registered_name}'s {CHAMPION} moved from {was} to {f'v{current}' if current else 'none'} {since}"
        )


def check_champion(
    registered_name: str, compared: str | None, since: str = "since this candidate was compared"
) -> str | None:
    """-> the champion now, when it is still `compared` (None: there was none); ChampionMoved otherwise."""
    current = alias_version(registered_name, CHAMPION)
    if current != compared:
        raise ChampionMoved(registered_name, compared, current, since)
    return current


def promote(
    registered_name: str,
    version: str,
    approver: str,
    compared=_FROM_TAG,
    fence: Callable[[], int] | None = None,
) -> str | None:
    """Move `champion` to `version` only if it still points at `compared`, the version the candidate's gate compared it
    with (None: there was no champion; by default the version's own `champion_compared` tag, and a version registered
    without one, by hand, is not checked): else ChampionMoved, and `champion` stays where it is. `fence` runs right
    before the check and the move (the retrain slot's: it raises when the caller no longer holds the slot); the
    generation it returns is recorded as the tag `slot_generation`. -> the previous champion (recorded on the version
    for rollback)."""
    import mlflow

    client = mlflow.MlflowClient()
    if compared is _FROM_TAG:
        tag = client.get_model_version(registered_name, version).tags.get(COMPARED)
        compared = _FROM_TAG if tag is None else (None if tag == "none" else tag)
    generation = fence() if fence is not None else None
    if compared is _FROM_TAG:
        previous = alias_version(registered_name, CHAMPION)
    else:
        previous = check_champion(registered_name, compared, f"since v{version} was compared")
    if previous and previous != version:
        client.set_model_version_tag(registered_name, version, "previous_champion", previous)
    client.set_model_version_tag(registered_name, version, "approver", approver)
    if generation is not None:
        client.set_model_version_tag(registered_name, version, SLOT_GENERATION, str(generation))
    client.set_registered_model_alias(registered_name, CHAMPION, version)
    if ROLLED_BACK in client.get_model_version(registered_name, version).tags:  # promoted again on purpose
        client.delete_model_version_tag(registered_name, version, ROLLED_BACK)
    return previous


def tag_version(registered_name: str, version: str, tags: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))


def rollback(
    registered_name: str, by: str = "unknown", reason: str = "", fence: Callable[[], int] | None = None
) -> tuple[str, str]:
    """Move `champion` back to the version it replaced: -> (from, to). ValueError when there is none. `fence` (the
    retrain slot's) runs right before the move, as for `promote`.

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
    if fence is not None:
        generation = fence()
        check_champion(registered_name, current, "while the rollback looked")
        note += f" (slot generation {generation})"
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


def fetch_version(registered_name: str, version: str, root: Path) -> dict[str, str]:
    """A registered version's artifacts in `root/<name>-v<version>/` (downloaded once: a later call reads them there;
    a download cut short is never taken for one), with `registered.json` naming the version in its warm-start
    bundle, if it has one."""
    import json
    import shutil

    import mlflow

    dest = root / f"{registered_name}-v{version}"
    if not dest.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        mlflow.artifacts.download_artifacts(f"models:/{registered_name}/{version}", dst_path=str(tmp))
        try:
            tmp.rename(dest)
        except OSError:  # another process fetched it meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    os.utime(dest)  # recently used: kept by the pruning of `<state>/champions` (flows/retrain.prune)
    paths = artifact_paths(dest)
    if "warm_start" in paths:
        (Path(paths["warm_start"]) / "registered.json").write_text(
            json.dumps({"name": registered_name, "version": version})
        )
    return paths


def artifact_paths(model_dir: Path) -> dict[str, str]:
    """Where a downloaded policy model keeps its artifacts: {"base": ..., "adapter": ...} (from its MLmodel)."""
    from mlflow.models import Model

    conf = Model.load(str(model_dir)).flavors["python_function"]["artifacts"]
    return {key: str(Path(model_dir) / entry["path"]) for key, entry in conf.items()}
