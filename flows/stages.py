"""The retrain flow's steps as Prefect tasks, one MLflow child run each. They wire components (which hold
the work) to tracking and caching; `flows/retrain.py` orders them.

Retries are for transient errors only (I/O, network, a busy database): never bad data, a bad config or a
diverged PPO run. SFT, the reward model and PPO are cached across runs (`flows/caching.py`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlflow
from prefect import get_run_logger, task

from components import tracking
from components.config import Config
from components.data.readers import read_prompts
from components.data.validation import validate_dataset
from components.data.versioning import DataState, pinned_data
from components.evaluation.evaluate import PolicySpec, evaluate_policies, generations_table, paired_se, win_rate
from components.evaluation.gate import decide
from components.models.demo_base import build_demo_base
from components.registry import registry
from components.registry.model_card import model_card
from components.training.checkpoint import write_json_durable
from components.training.direct import train_direct
from components.training.group_rl import train_group_rl
from components.training.plots import direct_curves, group_rl_curves, ppo_curves, rs_curves
from components.training.ppo import PPODivergence
from components.training.rejection_sampling import train_rejection_sampling
from flows import dispatch
from flows.caching import (
    CACHED,
    config_hash,
    prune_stage_outputs,
    reuse_key_of,
    stage_dir,
    stage_dir_lock,
    validation_key,
)
from flows.contracts import Evaluation, GateOutcome, Registration, StageOutput, ValidationSummary
from flows.locations import inputs_in_use
from service import launch, lifecycle


def git_commit(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try (I/O, network, a busy database) - never bad data,
    a bad config or a diverged PPO run."""
    from prefect.exceptions import FlowPauseTimeout

    try:
        state.result()
    except FlowPauseTimeout:
        return False
    except Exception as e:
        return dispatch.is_transient(e)
    return False


RETRY = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": transient}


def on_pool(stage: str):
    """A training stage that runs in this process, or - with `infra.training_pool` set - as a flow run on
    that pool's workers (flows/dispatch.py), its upstream locations passed as URIs."""

    def wrap(body):
        # cfg, data, <upstream locations...>, parent_run_id[, warm_from]
        params = [p for p in inspect.signature(body).parameters if p not in ("parent_run_id", "warm_from")]

        @functools.wraps(body)
        def run(*args, **kwargs):
            bound = inspect.signature(body).bind(*args, **kwargs).arguments
            cfg = bound["cfg"]
            if not cfg.infra.training_pool:
                return body(**bound)
            if bound.get("warm_from"):  # lineage.decide never picks incremental with a pool
                raise ValueError(f"{stage}: a warm start runs in this process only, not on infra.training_pool")
            inputs = {k: bound[k] for k in params[2:]}
            reuse = reuse_key_of(stage, cfg, bound["data"]) if stage == "base" else None  # the others: Prefect cache
            return dispatch.dispatch(stage, cfg, bound["data"], bound["parent_run_id"], inputs, reuse)

        return run

    return wrap


def log_curves(fig, name: str) -> None:
    """A stage's curves on its MLflow run, then the figure closed (pyplot keeps every open figure: a sweep's stages
    in one process would pile them up)."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, name)
    plt.close(fig)


def start_stage_run(stage: str, parent_run_id: str, data: DataState, params: dict[str, Any]):
    """A child run of the pipeline's parent run, owned by this process (lifecycle), with its params."""
    # named by its retrain, so that a compare view of six PPO runs tells them apart (renamed with the version the
    # retrain registered when it finishes: flows/retrain.summarise)
    retrain = mlflow.get_run(parent_run_id).info.run_name  # "retrain-tiny-20261207-211500", or "sweep policy=grpo"
    run = mlflow.start_run(
        run_name=f"{stage} · {retrain}", nested=True, parent_run_id=parent_run_id, tags=lifecycle.mlflow_owner_tags()
    )
    mlflow.set_tags({"stage": stage, "data_version": data.version})
    tracking.log_params(tracking.flatten(params, prefix=f"{stage}."))
    return run


@task(name="prepare-data", **RETRY)
def prepare_data(cfg: Config) -> DataState:
    state = pinned_data(cfg, cfg.infra.keep_stage_outputs)  # later ingests do not change what this run reads
    get_run_logger().info(
        "data version %s (%s): %s; this run reads its snapshot %s", state.version, state.origin, state.rows, state.path
    )
    return state


@task(name="validate", **RETRY)
def validate(cfg: Config, data: DataState, parent_run_id: str) -> ValidationSummary:
    """The data suite on the pinned version; a version that passed before under the same rules (data config,
    validation code, GX) is not read again: its report is reused and the run says whose it was (issue 40)."""
    log = get_run_logger()
    record = cfg.state_path / "validations" / f"{validation_key(cfg, data)}.json"
    with start_stage_run("validate", parent_run_id, data, {}) as run:
        if (passed := _passed_before(record)) is not None:
            mlflow.log_metrics(
                {"data/rows_" + k: v for k, v in passed["rows"].items()} | {"data/problems": 0, "data/valid": 1.0}
            )
            mlflow.set_tag("validation_reused_from", passed["run_id"])
            text = f"{passed['report']}\n  (validated by run {passed['run_id']}: same data version and rules, reused)"
            mlflow.log_text(text, "validation_report.txt")
            log.info("%s", text)
            return ValidationSummary(True, passed["rows"], 0, text, passed.get("docs_index"), run.info.run_id)
        report = validate_dataset(Path(data.path), cfg.data, cfg.state_path / "gx")
        mlflow.log_metrics(
            {"data/rows_" + k: v for k, v in report.rows.items()}
            | {"data/problems": len(report.findings), "data/valid": float(report.ok)}
        )
        text = report.format(f"data {data.version}", cfg.data.report_max_examples)
        mlflow.log_text(text, "validation_report.txt")
        for page in report.docs_pages.values():  # this run's result pages, not the whole site's history
            mlflow.log_artifact(str(page), artifact_path="data_docs")
        (log.info if report.ok else log.error)("%s", text)
        docs = str(report.docs_index) if report.docs_index else None
        if report.ok:  # a refused version is checked afresh each time: its report is what the user reads
            record.parent.mkdir(parents=True, exist_ok=True)
            body = {"rows": report.rows, "report": text, "docs_index": docs, "run_id": run.info.run_id}
            write_json_durable(record, body)
        return ValidationSummary(report.ok, report.rows, len(report.findings), text, docs, run.info.run_id)


def _passed_before(record: Path) -> dict | None:
    """The record of a validation that passed, or None (none, or one this code cannot read: validated afresh)."""
    try:
        doc = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        return None
    fields = {"rows": dict, "report": str, "run_id": str}
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k), t) for k, t in fields.items()):
        return None
    return doc


@task(name="base-model", **RETRY)
def base_model(cfg: Config, data: DataState, parent_run_id: str) -> str:
    """The base weights: a hub id / local path as configured, or the demo base built (cached) on the corpus."""
    if not cfg.model.build_demo_base:
        return cfg.model.name_or_path
    return demo_base(cfg, data, parent_run_id)


@on_pool("base")
def demo_base(cfg: Config, data: DataState, parent_run_id: str) -> str:
    with start_stage_run("base", parent_run_id, data, asdict(cfg.model)):
        result = build_demo_base(cfg.model, Path(data.path), data.version, cfg.state_path / "models", seed=cfg.seed)
        mlflow.log_metrics({"base/params": result.params, "base/built": float(result.built), **result.metrics})
        mlflow.set_tag("base_path", result.path)
        if result.built:  # the first run that builds it keeps a copy in MLflow; later runs point at the cache
            mlflow.log_artifacts(result.path, artifact_path="base_model")
        get_run_logger().info(
            "base model %s (%s): %s", cfg.model.name, "built" if result.built else "cached", result.path
        )
        os.utime(result.path)  # one demo base per data version: keep the most recently used, as for stage outputs
        prune_stage_outputs(cfg.state_path / "models", cfg.infra.keep_stage_outputs, {Path(result.path).resolve()})
        return result.path


@task(name="sft", **RETRY, **CACHED)
@on_pool("sft")
def sft(cfg: Config, data: DataState, base_path: str, parent_run_id: str) -> StageOutput:
    out = stage_dir(cfg, "sft", data, base_path=base_path)
    with stage_dir_lock(out), start_stage_run("sft", parent_run_id, data, asdict(cfg.sft)) as run:
        result = launch.run("sft", cfg, base_path=base_path, data_dir=data.path, out_dir=str(out))
        mlflow.set_tags({"adapter_dir": result.adapter_dir, "merged_dir": result.merged_dir})
        get_run_logger().info(
            "SFT: held-out loss %.3f -> %.3f; adapter %s",
            result.metrics["sft/eval_loss_base"],
            result.metrics["sft/eval_loss"],
            result.adapter_dir,
        )
        return StageOutput(result.merged_dir, run.info.run_id, result.metrics)


@task(name="reward-model", **RETRY, **CACHED)
@on_pool("reward-model")
def reward_model(
    cfg: Config, data: DataState, sft_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    """The reward model: from scratch, or (`warm_from`: the champion's warm-start bundle) the champion's trained on
    with the new rows and a replay sample of the earlier ones."""
    out = stage_dir(cfg, "reward-model", data, sft_dir=sft_dir, **warm(warm_from))
    with stage_dir_lock(out), start_stage_run("reward", parent_run_id, data, asdict(cfg.reward)) as run:
        tag_lineage(warm_from, data)
        result = launch.run("reward", cfg, sft_dir=sft_dir, data_dir=data.path, out_dir=str(out), warm_from=warm_from)
        mlflow.set_tags({"adapter_dir": result.adapter_dir, "head_dir": result.head_dir})
        get_run_logger().info(
            "reward model: held-out pairwise accuracy %.3f, margin %.2f",
            result.metrics["rm/eval_accuracy"],
            result.metrics["rm/eval_margin"],
        )
        if warm_from:
            m = result.metrics
            held = [
                f"{what} {m[f'rm/{key}_{part}']:.3f}" + (f" (the champion's: {m[before]:.3f})" if before in m else "")
                for key, kind in (("eval_accuracy", "comparisons"), ("feedback_accuracy", "thumbs"))
                for part, what in (("new", f"new {kind}"), ("old", f"earlier {kind}"))
                if f"rm/{key}_{part}" in m
                for before in [f"rm/{key}_{part}_parent"]
            ]
            get_run_logger().info(
                "reward model (incremental): %d new rows + %d replayed; held-out accuracy: %s",
                m.get("rm/new_rows", 0),
                m.get("rm/replayed_rows", 0),
                ", ".join(held) or "none held out",
            )
        return StageOutput(result.head_dir, run.info.run_id, result.metrics)


def warm(warm_from: str | None) -> dict[str, str]:
    """A stage's upstream input `warm_from`, when there is one (a full retrain's keys stay what they were)."""
    return {"warm_from": warm_from} if warm_from else {}


def tag_lineage(warm_from: str | None, data: DataState) -> None:
    """An incremental stage's lineage on its MLflow run: the champion it continues from, the data versions before
    (the champion's) and after (this run's); the reward model's replay sample is its metrics rm/new_rows and
    rm/replayed_rows (reward.replay_ratio among its params)."""
    if not warm_from:
        mlflow.set_tag("retrain_mode", "full")
        return
    from components.models.warm_start import lineage

    parent = lineage(warm_from)
    mlflow.set_tags(
        {
            "retrain_mode": "incremental",
            "incremental_parent": f"v{parent['version']}",
            "data_version_before": parent["data_version"],
            "data_version_after": data.version,
        }
    )


def pin_guide(cfg: Config) -> Config:
    """A guide named by a registered model's alias (`models:/rlhf-policy@champion`) pinned to the version the
    alias points at now, so that PPO's cache key and checkpoints name the guide that trained the policy: when
    the alias moves, PPO trains again instead of reusing a policy another guide trained."""
    spec = cfg.ppo.guide.model
    if not (spec and spec.startswith("models:/") and "@" in spec):
        return cfg
    name, alias = spec.removeprefix("models:/").split("@", 1)
    version = registry.alias_version(name, alias)
    if version is None:
        raise ValueError(f"ppo.guide.model={spec}: model {name!r} has no alias {alias!r} (`rlhf status`)")
    get_run_logger().info("guide %s is version %s", spec, version)
    pinned = f"models:/{name}/{version}"
    guide = replace(cfg.ppo.guide, model=pinned)  # and as an override: a worker composes the same config
    return replace(cfg, ppo=replace(cfg.ppo, guide=guide), overrides=[*cfg.overrides, f"ppo.guide.model={pinned}"])


@task(name="ppo", **RETRY, **CACHED)
@on_pool("ppo")
def ppo(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    out = stage_dir(cfg, "ppo", data, sft_dir=sft_dir, reward_dir=reward_dir, **warm(warm_from))
    with stage_dir_lock(out), start_stage_run("ppo", parent_run_id, data, asdict(cfg.ppo)) as run:
        tag_lineage(warm_from, data)
        try:
            result = launch.run(
                "ppo",
                cfg,
                sft_dir=sft_dir,
                reward_dir=reward_dir if cfg.ppo.use_reward_model else None,
                data_dir=data.path,
                out_dir=str(out),
                warm_from=warm_from,
            )
        except PPODivergence:
            mlflow.set_tag("outcome", "diverged")
            raise
        log_curves(ppo_curves(result.history), "ppo_curves.png")
        mlflow.set_tags({"policy_dir": result.policy_dir, "value_dir": result.value_dir})
        log_policy_result("PPO", "ppo", result.metrics, result.policy_dir)
        return StageOutput(result.policy_dir, run.info.run_id, result.metrics)


def log_policy_result(name: str, namespace: str, m: dict[str, float], policy_dir: str) -> None:
    """One line for the person watching: the policy's held-out reward against the SFT policy's, its KL, where."""
    get_run_logger().info(
        "%s: eval reward %.2f (SFT %.2f), KL %.2f; policy %s",
        name,
        m.get(f"{namespace}/eval_reward", float("nan")),
        m.get(f"{namespace}/eval_reward_ref", float("nan")),
        m.get(f"{namespace}/eval_kl", float("nan")),
        policy_dir,
    )


def critic_free_stage(
    stage: str, label: str, ns: str, cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str,
    params: dict[str, Any], train, curves, warm_from: str | None = None,
) -> StageOutput:  # fmt: skip
    """A critic-free policy stage (rejection sampling, GRPO, RLOO, DPO, KTO) in PPO's place in the pipeline: its
    stage dir, its MLflow run with `params`, `train(out_dir, reward_dir, warm_from)` (the reward model unless
    ppo.use_reward_model=false; the champion's warm-start bundle or None), the curves plot `<ns>_curves.png` from
    `curves(history)`, the policy's line."""
    out = stage_dir(cfg, stage, data, sft_dir=sft_dir, reward_dir=reward_dir, **warm(warm_from))
    with stage_dir_lock(out), start_stage_run(stage, parent_run_id, data, params) as run:
        tag_lineage(warm_from, data)
        result = train(out, reward_dir if cfg.ppo.use_reward_model else None, warm_from)
        log_curves(curves(result.history), f"{ns}_curves.png")
        mlflow.set_tags({"policy_dir": result.policy_dir})
        log_policy_result(label, ns, result.metrics, result.policy_dir)
        return StageOutput(result.policy_dir, run.info.run_id, result.metrics)


@task(name="rejection-sampling", **RETRY, **CACHED)
@on_pool("rejection-sampling")
def rejection_sampling(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    """The policy stage by rejection-sampling fine-tuning (`policy=rejection_sampling`)."""
    settings = cfg.policy.rejection_sampling

    def train(out: Path, rm: str | None, warm_from: str | None):
        args = (settings, cfg.ppo, cfg.model, sft_dir, rm, Path(data.path), out)
        return train_rejection_sampling(*args, seed=cfg.seed, warm_from=warm_from)

    params = {"rejection_sampling": asdict(settings), "ppo": asdict(cfg.ppo)}
    return critic_free_stage(
        "rejection-sampling", "rejection sampling", "rs", cfg, data, sft_dir, reward_dir, parent_run_id, params, train,
        rs_curves, warm_from,
    )  # fmt: skip


def _group_rl(
    algorithm: str, cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str,
    warm_from: str | None,
):  # fmt: skip
    """GRPO or RLOO (`policy=grpo`, `policy=rloo`)."""
    settings = getattr(cfg.policy, algorithm)

    def train(out: Path, rm: str | None, warm_from: str | None):
        args = (cfg.ppo, cfg.model, sft_dir, rm, Path(data.path), out)
        return train_group_rl(algorithm, settings, *args, seed=cfg.seed, warm_from=warm_from)

    params = {algorithm: asdict(settings), "ppo": asdict(cfg.ppo)}
    return critic_free_stage(
        algorithm, algorithm.upper(), algorithm, cfg, data, sft_dir, reward_dir, parent_run_id, params, train,
        lambda history: group_rl_curves(history, algorithm), warm_from,
    )  # fmt: skip


@task(name="grpo", **RETRY, **CACHED)
@on_pool("grpo")
def grpo(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    """The policy stage by GRPO (components/training/group_rl.py)."""
    return _group_rl("grpo", cfg, data, sft_dir, reward_dir, parent_run_id, warm_from)


@task(name="rloo", **RETRY, **CACHED)
@on_pool("rloo")
def rloo(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    """The policy stage by RLOO (components/training/group_rl.py)."""
    return _group_rl("rloo", cfg, data, sft_dir, reward_dir, parent_run_id, warm_from)


def _direct(
    method: str, cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str,
    warm_from: str | None,
):  # fmt: skip
    """DPO or KTO (`policy=dpo`, `policy=kto`); the reward model only for the held-out evaluation."""
    settings = getattr(cfg.policy, method)

    def train(out: Path, rm: str | None, warm_from: str | None):
        args = (cfg.ppo, cfg.model, sft_dir, rm, Path(data.path), out, cfg.reward.eval_fraction)
        return train_direct(method, settings, *args, seed=cfg.seed, warm_from=warm_from, data_cfg=cfg.data)

    params = {method: asdict(settings), "ppo": asdict(cfg.ppo)}
    return critic_free_stage(
        method, method.upper(), method, cfg, data, sft_dir, reward_dir, parent_run_id, params, train,
        lambda history: direct_curves(history, method), warm_from,
    )  # fmt: skip


@task(name="dpo", **RETRY, **CACHED)
@on_pool("dpo")
def dpo(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    """The policy stage by DPO on the comparisons (components/training/direct.py)."""
    return _direct("dpo", cfg, data, sft_dir, reward_dir, parent_run_id, warm_from)


@task(name="kto", **RETRY, **CACHED)
@on_pool("kto")
def kto(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str, warm_from: str | None = None
) -> StageOutput:
    """The policy stage by KTO on the thumbs (components/training/direct.py)."""
    return _direct("kto", cfg, data, sft_dir, reward_dir, parent_run_id, warm_from)


POLICY_STAGES = {
    "ppo": ppo,
    "rejection_sampling": rejection_sampling,
    "grpo": grpo,
    "rloo": rloo,
    "dpo": dpo,
    "kto": kto,
}


def policy_stage(cfg: Config):
    """The task that trains the policy: `policy.algorithm` = ppo | rejection_sampling | grpo | rloo | dpo | kto."""
    stage = POLICY_STAGES.get(cfg.policy.algorithm)
    if stage is None:
        raise ValueError(f"policy.algorithm={cfg.policy.algorithm!r}: expected {' | '.join(POLICY_STAGES)}")
    return stage


@task(name="evaluate", **RETRY)
@on_pool("evaluate")
def evaluate(
    cfg: Config, data: DataState, sft_dir: str, reward_dir: str, policy_dir: str, parent_run_id: str
) -> Evaluation:
    """Candidate, SFT policy and champion (if any) on the frozen eval prompts: metrics and per-prompt rewards."""
    name = cfg.tracking.registered_model_name
    with start_stage_run("evaluate", parent_run_id, data, asdict(cfg.gate)) as run:
        champion_version = registry.alias_version(name, registry.CHAMPION)
        specs = [PolicySpec("sft", sft_dir), PolicySpec("candidate", sft_dir, policy_dir)]
        if champion_version is not None:  # the champion's own base + adapter, from its self-contained model
            paths = registry.fetch_version(name, champion_version, cfg.state_path / "champions")  # once per version
            specs.append(PolicySpec("champion", paths["base"], paths.get("adapter")))
        evals = evaluate_policies(
            specs, sft_dir, reward_dir, read_prompts(Path(data.path), "eval"), cfg.gate, cfg.model
        )
        mlflow.log_metrics(
            tracking.finite({f"eval/{p}/{k}": v for p, e in evals.items() for k, v in e.metrics.items()})
        )
        mlflow.log_table(generations_table(evals), "eval_generations.json")
        return Evaluation(
            run.info.run_id,
            champion_version,
            {p: e.metrics for p, e in evals.items()},
            {p: list(e.rewards) for p, e in evals.items()},
        )


@task(name="gate", **RETRY)
def gate(cfg: Config, ev: Evaluation, new_data: dict[str, float] | None = None) -> GateOutcome:
    """The gate, always on the orchestrator: candidate vs the champion (vs the SFT policy when there is none).
    `new_data`: an incremental candidate's evidence on the new rows (flows/incremental.new_data_measures), which
    makes it the incremental gate. The verdict goes on the evaluation's MLflow run (wherever that ran)."""
    baseline = "champion" if ev.champion_version else "sft"
    if new_data is not None and baseline == "champion":  # the noise of the mean reward gain, per prompt
        new_data = new_data | {"reward_gain_se": paired_se(ev.rewards["candidate"], ev.rewards["champion"])}
    verdict = decide(
        ev.eval["candidate"],
        ev.eval[baseline],
        win_rate(ev.rewards["candidate"], ev.rewards[baseline]),
        (f"champion v{ev.champion_version}" if ev.champion_version else "the SFT policy")
        + (" (incremental gate: non-inferior, holds the new rows)" if new_data is not None else ""),
        cfg.gate,
        sft=ev.eval.get("sft"),
        champion=ev.eval.get("champion"),
        ensemble=cfg.reward.ensemble,
        new_data=new_data,
    )
    client = mlflow.MlflowClient()
    for key, value in tracking.finite(verdict.metrics()).items():
        client.log_metric(ev.run_id, key, value)
    client.log_text(ev.run_id, verdict.summary(), "gate_verdict.txt")
    client.set_tag(ev.run_id, "gate", "passed" if verdict.passed else "failed")
    client.set_tag(ev.run_id, "champion_compared", ev.champion_version or "none")
    get_run_logger().info("%s", verdict.summary())
    return GateOutcome(
        verdict.passed, verdict.summary(), verdict.reasons, verdict.metrics(), ev.champion_version, ev.eval
    )


@task(name="register", **RETRY)
def register(
    cfg: Config,
    data: DataState,
    sft_dir: str,
    policy_dir: str,
    reward_dir: str,
    gate: GateOutcome,
    parent_run_id: str,
    lineage: dict | None = None,
) -> Registration:
    """Log and register the candidate once: a retry (transient error) finishes the version an earlier try
    of this pipeline run created instead of registering a second one. With `registry.include_reward_model`
    the reward model goes with it: the served model can answer best-of-n."""
    name = cfg.tracking.registered_model_name
    tags = {
        "data_version": data.version,
        "config_hash": config_hash(cfg),
        "git_commit": git_commit(cfg.root_path),
        "base_model": cfg.model.name,
        "champion_compared": gate.champion_version or "none",
        "pipeline_run_id": parent_run_id,
        **{k: f"{v:.4f}" for k, v in gate.gate_metrics.items()},
        **(
            {
                "retrain_mode": lineage["mode"],
                "incremental_parent": f"v{lineage['parent']}" if lineage["parent"] else "none",
            }
            if lineage is not None
            else {}
        ),
    }
    earlier = tracking.child_run_ids(parent_run_id, stage="register")
    with start_stage_run("register", parent_run_id, data, {}):
        if (version := registry.registered_by(name, earlier)) is not None:
            get_run_logger().warning(
                "%s v%s was already registered by an earlier try of this run: finishing it", name, version
            )
            reg = registry.finish_registration(name, version, tags)
        else:
            wanted = {"sft": sft_dir, "policy": policy_dir, "reward": reward_dir}  # the bundle has it in any case
            with inputs_in_use(cfg, wanted) as local:
                reg = registry.log_and_register(  # serving's prompt cap is the data contract's (issue 38)
                    name,
                    local["sft"],
                    local["policy"],
                    tags,
                    limits={"max_prompt_chars": cfg.data.max_prompt_chars},
                    reward_dir=local["reward"] if cfg.registry.include_reward_model else None,
                    lineage=lineage,
                    warm_reward_dir=local["reward"],
                )
        card = model_card(
            reg.name, cfg.model.name, data.version, git_commit(cfg.root_path), asdict(gate), lineage=lineage
        )
        mlflow.log_text(card, "model_card.md")
        # the version page's "Source Run" is this register run: its description links the retrain that made it
        parent = mlflow.get_run(parent_run_id)
        link = (
            f"Trained by the retrain run [{parent.info.run_name}](#/experiments/{parent.info.experiment_id}/runs/"
            f"{parent_run_id}) (its summary.md: gate table, curves).\n\n"
        )
        registry.describe(reg.name, reg.version, link + card)
        get_run_logger().info("registered %s version %s (alias %s)", reg.name, reg.version, registry.CANDIDATE)
        return Registration(reg.name, reg.version)
