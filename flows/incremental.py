"""Full or incremental retraining (`retrain.mode`, issue 40): the plan a retrain follows, against the champion.

    plan(cfg, data)             fetch the champion's warm-start bundle, decide (components/data/lineage.py)
    incremental_config(cfg)     the stages' steps and rates for continuing: reward.incremental_steps, ppo.incremental_steps, ...
    lineage_of(plan, cfg, data) what the new version's bundle records: today's shards, its parents
    new_data_measures(metrics)  the reward model's accuracy on the new held-out rows, now and the champion's

An incremental retrain keeps the champion's SFT model (its registered `base`: no demo base, no SFT stage, and the KL
anchor unchanged); its reward model and policy continue from the champion's on the data new since the champion's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from components.config import Config
from components.data.lineage import MODES, Decision, Parent, decide, manifest
from components.data.versioning import DataState
from components.models.warm_start import lineage
from components.registry import registry
from flows.caching import config_hash, training_hash


class IncrementalRefused(ValueError):
    """`retrain.mode=incremental` where the champion cannot be continued from (the Decision says why)."""


@dataclass
class Plan:
    decision: Decision
    manifest: dict[str, str]  # today's shards (components/data/lineage.manifest)
    parent: str | None = None  # the champion version (incremental: the one continued from)
    warm_from: str | None = None  # incremental: the champion's warm-start bundle, fetched
    sft_dir: str | None = None  # incremental: the champion's SFT model (its registered `base`)
    parent_lineage: dict | None = None

    @property
    def incremental(self) -> bool:
        return self.decision.incremental

    @property
    def mode(self) -> str:
        return "incremental" if self.incremental else "full"


def plan(cfg: Config, data: DataState) -> Plan:
    """Decide full or incremental; `retrain.mode=incremental` that cannot be, or a mode that is not one, is refused
    (IncrementalRefused)."""
    if cfg.retrain.mode not in MODES:
        raise IncrementalRefused(f"retrain.mode={cfg.retrain.mode!r}: expected {' | '.join(MODES)}")
    today = manifest(Path(data.path))
    name = cfg.tracking.registered_model_name
    champion = registry.alias_version(name, registry.CHAMPION)
    paths: dict[str, str] = {}
    if champion is not None and cfg.retrain.mode != "full" and not cfg.infra.training_pool:
        paths = registry.fetch_version(name, champion, cfg.state_path / "champions")
    parent = (
        None if champion is None else Parent(champion, lineage(paths["warm_start"]) if "warm_start" in paths else None)
    )
    d = decide(cfg.retrain.mode, parent, today, training_hash(cfg), pool=bool(cfg.infra.training_pool))
    if cfg.retrain.mode == "incremental" and not d.incremental:
        raise IncrementalRefused(
            f"retrain.mode=incremental: {d.reason}; run `rlhf run retrain.mode=full` (or retrain.mode=auto, which "
            "decides per run)"
        )
    if not d.incremental:
        return Plan(d, today, champion)
    return Plan(d, today, champion, paths["warm_start"], paths["base"], parent.lineage if parent else None)


def incremental_config(cfg: Config) -> Config:
    """`cfg` with the trained stages' step counts for continuing from the champion (never more than a full run's) and
    the reward model's and PPO's learning rates for it, also as overrides: a multi-process stage composes the same
    config from them."""
    alg, p = cfg.policy.algorithm, cfg.policy
    values: dict[str, int | float] = {
        "reward.max_steps": min(cfg.reward.incremental_steps, cfg.reward.max_steps),
        "reward.learning_rate": cfg.reward.incremental_learning_rate,
    }
    if alg == "ppo":
        values["ppo.steps"] = min(cfg.ppo.incremental_steps, cfg.ppo.steps)
        values["ppo.learning_rate"] = cfg.ppo.incremental_learning_rate
    elif alg == "rejection_sampling":
        values["policy.rejection_sampling.rounds"] = min(
            p.rejection_sampling.incremental_rounds, p.rejection_sampling.rounds
        )
    else:  # grpo, rloo, dpo, kto
        method = getattr(p, alg)
        values[f"policy.{alg}.steps"] = min(method.incremental_steps, method.steps)
    out = cfg
    for key, value in values.items():
        out = _set(out, key.split("."), value)
    return replace(out, overrides=[*cfg.overrides, *(f"{k}={v}" for k, v in values.items())])


def _set(node: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    return replace(node, **{head: _set(getattr(node, head), rest, value) if rest else value})


def lineage_of(p: Plan, cfg: Config, data: DataState) -> dict:
    """What the new version's warm-start bundle records: today's shards, the config, how it was trained and, for an
    incremental one, its chain of parents (oldest first)."""
    chain = []
    if p.incremental and p.parent_lineage is not None:
        chain = [*p.parent_lineage.get("chain", []), {"version": p.parent, "mode": p.parent_lineage.get("mode", "full"),
                                                       "data_version": p.parent_lineage.get("data_version")}]  # fmt: skip
    return {
        "manifest": p.manifest,
        "data_version": data.version,
        "config_hash": config_hash(cfg),
        "training_hash": training_hash(cfg),
        "mode": p.mode,
        "parent": p.parent if p.incremental else None,
        "chain": chain,
    }


def full_lineage(cfg: Config, data: DataState) -> dict:
    """The lineage of a version trained from scratch (a full retrain, a sweep's best variant)."""
    return lineage_of(Plan(Decision(False, "full"), manifest(Path(data.path))), cfg, data)


def new_data_measures(metrics: dict[str, float]) -> dict[str, float]:
    """The incremental gate's evidence that the new data was learned: the reward model's held-out accuracy on the new
    comparisons (on the new thumbs when no comparison is new) after and before (the champion's) -> {"new_accuracy",
    "new_accuracy_parent"}, or {} when nothing new was held out."""
    for kind in ("eval_accuracy", "feedback_accuracy"):
        after, before = metrics.get(f"rm/{kind}_new"), metrics.get(f"rm/{kind}_new_parent")
        if after is not None and before is not None and after == after and before == before:
            return {"new_accuracy": after, "new_accuracy_parent": before}
    return {}
