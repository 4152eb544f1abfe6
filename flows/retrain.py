"""Flow `retrain`: the pipeline, one Prefect task per stage, one MLflow child run per stage.

    prepare data (dvc pull or demo) -> validate (Great Expectations) -> [demo base] -> SFT (LoRA)
    -> reward model (LoRA + head) -> PPO (LoRA, one shared base) -> evaluate vs champion -> gate
    -> register (alias challenger) -> promote (alias champion, gate.approval=auto)

Flows wire components; they hold no tensor code. A stage's child run is nested under
one parent run per pipeline run; params are the flattened resolved config.

SFT, reward model and PPO are cached by Prefect (`cache_key_fn`): the key hashes the data version,
the stage's config sections, the upstream stages' outputs, the seed and the components' code, so an
unchanged stage is skipped on the next run (state Cached, no new child run: the parent run's tag
`cached.<stage>` names the run that computed it) and any change upstream recomputes everything
downstream. The key also names the stage's output dir `<state>/stages/<key>`: a killed run restarted
with the same inputs resumes the stage from its last checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed, Failed

from components import tracking
from components.config import Config, to_dict, to_yaml
from components.data.validation import validate_dataset
from components.data.versioning import DataState, DataVersionError, pinned_data
from components.evaluation.evaluate import PolicySpec, evaluate_policies, generations_table, win_rate
from components.evaluation.gate import decide
from components.registry import registry
from components.registry.model_card import model_card
from components.models.demo_base import build_demo_base
from components.training.ppo import PPODivergence, prompts_of, train_ppo
from components.training.checkpoint import is_complete
from components.training.reward import train_reward
from components.training.sft import train_sft
from flows import lifecycle


@dataclass
class ValidationSummary:
    ok: bool
    rows: dict[str, int]
    problems: int
    report: str
    docs_index: str | None
    run_id: str


def git_commit(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def transient(task, task_run, state) -> bool:
    """Retry only what may succeed on a second try (I/O, network, a busy database) - never bad data,
    a bad config or a diverged PPO run."""
    try:
        state.result()
    except (ConnectionError, TimeoutError) as e:
        return not isinstance(e, FlowPauseTimeout)
    except OSError as e:
        return e.errno is not None  # real I/O errors carry an errno; library errors subclassing OSError do not
    except Exception:
        return False
    return False


RETRY = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": transient}


@task(name="prepare-data", **RETRY)
def prepare_data(cfg: Config) -> DataState:
    state = pinned_data(cfg, cfg.infra.keep_stage_outputs)  # later ingests do not change what this run reads
    get_run_logger().info("data version %s (%s): %s; this run reads its snapshot %s", state.version, state.origin,
                          state.rows, state.path)
    return state


@task(name="validate", **RETRY)
def validate(cfg: Config, data: DataState, parent_run_id: str) -> ValidationSummary:
    log = get_run_logger()
    with mlflow.start_run(run_name="validate", nested=True, parent_run_id=parent_run_id,
                          tags=lifecycle.mlflow_owner_tags()) as run:
        mlflow.set_tags({"stage": "validate", "data_version": data.version})
        report = validate_dataset(Path(data.path), cfg.data, cfg.state_path / "gx")
        mlflow.log_metrics({"data/rows_" + k: v for k, v in report.rows.items()}
                           | {"data/problems": len(report.findings), "data/valid": float(report.ok)})
        text = report.format(f"data {data.version}", cfg.data.report_max_examples)
        mlflow.log_text(text, "validation_report.txt")
        for page in report.docs_pages.values():  # this run's result pages, not the whole site's history
            mlflow.log_artifact(str(page), artifact_path="data_docs")
        (log.info if report.ok else log.error)("%s", text)
        return ValidationSummary(report.ok, report.rows, len(report.findings), text,
                                 str(report.docs_index) if report.docs_index else None, run.info.run_id)


@functools.cache  # the loaded code cannot change within a process
def code_version() -> str:
    """Hash of the components' source: changed training code invalidates every stage's outputs."""
    import components

    h = hashlib.sha256()
    for path in sorted(Path(components.__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


# The config sections each cached stage reads (the key and output dir: see the module docstring).
STAGE_CONFIG = {"sft": ("sft", "model"), "reward-model": ("reward", "model"), "ppo": ("ppo", "model")}


def stage_key(stage: str, cfg: Config, data: DataState, **upstream: Any) -> str:
    blob = {"stage": stage, "data": data.version, "seed": cfg.seed, "code": code_version(),
            "project": str(cfg.state_path), **{s: asdict(getattr(cfg, s)) for s in STAGE_CONFIG[stage]}, **upstream}
    return f"{stage}-{hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]}"


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: a task whose key has a stored result is not run again (state Cached)."""
    upstream = {k: v for k, v in parameters.items() if k not in ("cfg", "data", "parent_run_id")}
    return stage_key(context.task.name, parameters["cfg"], parameters["data"], **upstream)


def stage_dir(cfg: Config, stage: str, data: DataState, **upstream: Any) -> Path:
    return cfg.state_path / "stages" / stage_key(stage, cfg, data, **upstream)


# Results are small JSON dicts (output dir, child run id, metrics) in Prefect's local result storage,
# <PREFECT_HOME>/storage, i.e. <state>/prefect/storage for a project.
CACHED = {"cache_key_fn": stage_cache_key, "persist_result": True, "result_serializer": "json"}


def run_stage(stage_task, cfg: Config, *args: Any) -> dict[str, Any]:
    """Run a cached stage task. A cache hit adds no child run: the parent run gets the tag
    `cached.<stage>` = the run that computed it. A hit whose output is gone (pruned) or incomplete (a killed
    recompute into the same dir) is recomputed there, resuming from its checkpoints."""
    args = (cfg, *args)
    state = stage_task(*args, return_state=True)
    out = state.result()  # raises the task's exception (e.g. PPODivergence) on failure
    cached = state.name == "Cached"
    if cached and not (Path(out["dir"]).exists() and is_complete(stage_root(cfg, out["dir"]))):
        get_run_logger().warning("%s: cached output %s is gone or incomplete; recomputing (resumes from its "
                                 "checkpoints)", stage_task.name, out["dir"])
        out, cached = stage_task.with_options(refresh_cache=True)(*args), False
    if cached:
        get_run_logger().info("%s: unchanged inputs, reusing run %s (%s)", stage_task.name, out["run_id"], out["dir"])
        mlflow.set_tag(f"cached.{stage_task.name}", out["run_id"])
    log_on_parent(out["metrics"])
    return out | {"cached": cached}


def stage_root(cfg: Config, path: str) -> Path:
    """The `<state>/stages/<stage>-<key>` dir that holds a stage output path."""
    stages = cfg.state_path / "stages"
    return stages / Path(path).resolve().relative_to(stages.resolve()).parts[0]


def prune_stage_outputs(stages: Path, keep: int | None, in_use: set[Path]) -> list[Path]:
    """Delete all but the `keep` most recently used output dirs of each stage (never one in `in_use`).
    Registered models are self-contained in MLflow, so stage dirs only serve caching and resume; a cached
    result whose dir was pruned is recomputed when next needed. Returns the deleted dirs."""
    import shutil

    if keep is None or not stages.is_dir():
        return []
    by_stage: dict[str, list[Path]] = {}
    for d in stages.iterdir():
        if d.is_dir():
            by_stage.setdefault(d.name.rsplit("-", 1)[0], []).append(d)
    removed = []
    for dirs in by_stage.values():
        dirs.sort(key=lambda d: (d.resolve() in in_use, d.stat().st_mtime), reverse=True)  # in use, then newest
        n_in_use = sum(d.resolve() in in_use for d in dirs)
        for d in dirs[max(keep, 0, n_in_use):]:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def log_on_parent(metrics: dict[str, float]) -> None:
    """The stages' final metrics also go on the parent run (cached or not), so that retrains of different
    data versions and configs compare side by side in the MLflow UI's run table."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v})


def start_stage_run(stage: str, parent_run_id: str, data: DataState, params: dict[str, Any]):
    run = mlflow.start_run(run_name=stage, nested=True, parent_run_id=parent_run_id, tags=lifecycle.mlflow_owner_tags())
    mlflow.set_tags({"stage": stage, "data_version": data.version})
    flat = tracking.flatten(params, prefix=f"{stage}.")
    for i in range(0, len(flat), 100):
        mlflow.log_params(dict(list(flat.items())[i: i + 100]))
    return run


@task(name="base-model", **RETRY)
def base_model(cfg: Config, data: DataState, parent_run_id: str) -> str:
    """The base weights: a hub id / local path as configured, or the demo base built (cached) on the corpus."""
    if not cfg.model.build_demo_base:
        return cfg.model.name_or_path
    with start_stage_run("base", parent_run_id, data, asdict(cfg.model)):
        result = build_demo_base(cfg.model, Path(data.path), data.version, cfg.state_path / "models", seed=cfg.seed)
        mlflow.log_metrics({"base/params": result.params, "base/built": float(result.built), **result.metrics})
        mlflow.set_tag("base_path", result.path)
        if result.built:  # the first run that builds it keeps a copy in MLflow; later runs point at the cache
            mlflow.log_artifacts(result.path, artifact_path="base_model")
        get_run_logger().info("base model %s (%s): %s", cfg.model.name, "built" if result.built else "cached", result.path)
        os.utime(result.path)  # one demo base per data version: keep the most recently used, as for stage outputs
        prune_stage_outputs(cfg.state_path / "models", cfg.infra.keep_stage_outputs, {Path(result.path).resolve()})
        return result.path


@task(name="sft", **RETRY, **CACHED)
def sft(cfg: Config, data: DataState, base_path: str, parent_run_id: str) -> dict[str, Any]:
    out = stage_dir(cfg, "sft", data, base_path=base_path)
    with start_stage_run("sft", parent_run_id, data, asdict(cfg.sft)) as run:
        result = train_sft(cfg.sft, cfg.model, base_path, Path(data.path), out, seed=cfg.seed)
        mlflow.set_tags({"adapter_dir": result.adapter_dir, "merged_dir": result.merged_dir})
        get_run_logger().info("SFT: held-out loss %.3f -> %.3f; adapter %s",
                              result.metrics["sft/eval_loss_base"], result.metrics["sft/eval_loss"], result.adapter_dir)
        return {"dir": result.merged_dir, "run_id": run.info.run_id, "metrics": result.metrics}


@task(name="reward-model", **RETRY, **CACHED)
def reward_model(cfg: Config, data: DataState, sft_dir: str, parent_run_id: str) -> dict[str, Any]:
    out = stage_dir(cfg, "reward-model", data, sft_dir=sft_dir)
    with start_stage_run("reward", parent_run_id, data, asdict(cfg.reward)) as run:
        result = train_reward(cfg.reward, cfg.model, sft_dir, Path(data.path), out, seed=cfg.seed)
        mlflow.set_tags({"adapter_dir": result.adapter_dir, "head_dir": result.head_dir})
        get_run_logger().info("reward model: held-out pairwise accuracy %.3f, margin %.2f",
                              result.metrics["rm/eval_accuracy"], result.metrics["rm/eval_margin"])
        return {"dir": result.head_dir, "run_id": run.info.run_id, "metrics": result.metrics}


@task(name="ppo", **RETRY, **CACHED)
def ppo(cfg: Config, data: DataState, sft_dir: str, reward_dir: str, parent_run_id: str) -> dict[str, Any]:
    out = stage_dir(cfg, "ppo", data, sft_dir=sft_dir, reward_dir=reward_dir)
    with start_stage_run("ppo", parent_run_id, data, asdict(cfg.ppo)) as run:
        try:
            result = train_ppo(cfg.ppo, cfg.model, sft_dir, reward_dir if cfg.ppo.use_reward_model else None,
                               Path(data.path), out, seed=cfg.seed)
        except PPODivergence:
            mlflow.set_tag("outcome", "diverged")
            raise
        mlflow.log_figure(curves(result.history), "ppo_curves.png")
        mlflow.set_tags({"policy_dir": result.policy_dir, "value_dir": result.value_dir})
        m = result.metrics
        get_run_logger().info("PPO: eval reward %.2f (SFT %.2f), KL %.2f; policy %s", m.get("ppo/eval_reward", float("nan")),
                              m.get("ppo/eval_reward_ref", float("nan")), m.get("ppo/eval_kl", float("nan")), result.policy_dir)
        return {"dir": result.policy_dir, "run_id": run.info.run_id, "metrics": result.metrics}


def config_hash(cfg: Config) -> str:
    """What the pipeline trains from, besides the data: the resolved config minus where results go."""
    body = {k: v for k, v in to_dict(cfg).items() if k not in ("tracking", "infra", "root")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def nothing_new(cfg: Config, data: DataState) -> str | None:
    """The champion's version when it was trained on this data version with this config, else None."""
    name = cfg.tracking.registered_model_name
    version = registry.alias_version(name, registry.CHAMPION)
    if version is None:
        return None
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    return version if tags.get("data_version") == data.version and tags.get("config_hash") == config_hash(cfg) else None


def champion_spec(cfg: Config) -> tuple[PolicySpec | None, str | None]:
    """The current champion's own base + adapter, from its registered (self-contained) model."""
    version = registry.alias_version(cfg.tracking.registered_model_name, registry.CHAMPION)
    if version is None:
        return None, None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.tracking.registered_model_name}/{version}"))
    paths = registry.artifact_paths(local)
    return PolicySpec("champion", paths["base"], paths.get("adapter")), version


@task(name="evaluate", **RETRY)
def evaluate(cfg: Config, data: DataState, sft_dir: str, reward_dir: str, policy_dir: str, parent_run_id: str) -> dict[str, Any]:
    """Candidate vs champion (vs the SFT policy when there is none) on the frozen eval prompts, then the gate."""
    with start_stage_run("evaluate", parent_run_id, data, asdict(cfg.gate)):
        champion, champion_version = champion_spec(cfg)
        specs = [PolicySpec("sft", sft_dir), PolicySpec("candidate", sft_dir, policy_dir)] + ([champion] if champion else [])
        evals = evaluate_policies(specs, sft_dir, reward_dir, prompts_of(Path(data.path), "eval"), cfg.gate, cfg.model)
        baseline = "champion" if champion else "sft"
        verdict = decide(evals["candidate"].metrics, evals[baseline].metrics,
                         win_rate(evals["candidate"].rewards, evals[baseline].rewards),
                         f"champion v{champion_version}" if champion else "the SFT policy", cfg.gate)
        mlflow.log_metrics({f"eval/{name}/{k}": v for name, e in evals.items() for k, v in e.metrics.items()
                            if v == v} | verdict.metrics())
        mlflow.log_table(generations_table(evals), "eval_generations.json")
        mlflow.log_text(verdict.summary(), "gate_verdict.txt")
        mlflow.set_tags({"gate": "passed" if verdict.passed else "failed", "champion_compared": champion_version or "none"})
        get_run_logger().info("%s", verdict.summary())
        return {"passed": verdict.passed, "summary": verdict.summary(), "reasons": verdict.reasons,
                "gate_metrics": verdict.metrics(), "champion_version": champion_version,
                "eval": {name: e.metrics for name, e in evals.items()}}


@task(name="register", **RETRY)
def register(cfg: Config, data: DataState, sft_dir: str, policy_dir: str, gate: dict[str, Any], parent_run_id: str) -> dict[str, str]:
    """Log and register the candidate once: a retry (transient error) finishes the version an earlier try
    of this pipeline run created instead of registering a second one."""
    name = cfg.tracking.registered_model_name
    tags = {"data_version": data.version, "config_hash": config_hash(cfg), "git_commit": git_commit(cfg.root_path),
            "base_model": cfg.model.name, "champion_compared": gate["champion_version"] or "none",
            "pipeline_run_id": parent_run_id, **{k: f"{v:.4f}" for k, v in gate["gate_metrics"].items()}}
    earlier = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'register'",
                                 search_all_experiments=True, output_format="list")
    with start_stage_run("register", parent_run_id, data, {}):
        if (version := registry.registered_by(name, [r.info.run_id for r in earlier])) is not None:
            get_run_logger().warning("%s v%s was already registered by an earlier try of this run: finishing it", name, version)
            reg = registry.finish_registration(name, version, tags)
        else:
            reg = registry.log_and_register(name, sft_dir, policy_dir, tags)
        card = model_card(reg.name, cfg.model.name, data.version, git_commit(cfg.root_path), gate)
        mlflow.log_text(card, "model_card.md")
        mlflow.MlflowClient().update_model_version(reg.name, reg.version, description=card)
        get_run_logger().info("registered %s version %s (alias %s)", reg.name, reg.version, registry.CHALLENGER)
        return {"name": reg.name, "version": reg.version}


class Approval(RunInput):
    """What a person answers to a paused retrain (Prefect UI form, or `rlhf approve`). `approve` defaults to
    False: pressing Resume in the UI without reading the form must not promote a model."""
    approve: bool = False
    approver: str = "unknown"
    comment: str = ""


def await_approval(cfg: Config, reg: dict[str, str]) -> Approval | None:
    """Pause this flow run until an Approval arrives; None when the timeout passes first."""
    from prefect.runtime import flow_run

    get_run_logger().warning(
        "%s v%s passed the gate and waits for approval (timeout %ss): resume flow run %s in the Prefect UI, or run "
        "`rlhf approve %s [--reject] --approver NAME`", reg["name"], reg["version"], cfg.gate.approval_timeout_s,
        flow_run.id, flow_run.id)
    try:
        return pause_flow_run(wait_for_input=Approval, timeout=cfg.gate.approval_timeout_s,
                              poll_interval=min(5, cfg.gate.approval_timeout_s), key=f"approve-v{reg['version']}")
    except FlowPauseTimeout:
        # Prefect leaves the run Paused after a timeout, and a Paused run cannot complete; take it back
        # to Running so the flow ends with its own "not promoted because ..." message.
        from prefect.client.orchestration import get_client
        from prefect.states import Running

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Running(), force=True)
        return None


def curves(history: list[dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = range(1, len(history) + 1)
    for ax, keys, title in ((axes[0], ("ppo/score_mean",), "reward-model score"),
                            (axes[1], ("ppo/kl", "ppo/kl_k3"), "KL to the reference (per response)"),
                            (axes[2], ("ppo/beta",), "KL coefficient beta")):
        for k in keys:
            ax.plot(steps, [h[k] for h in history], label=k.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    return fig


@flow(name="retrain", validate_parameters=False)  # no log_prints: it turns library bytecode dumps (datasets hashing) into log lines
def retrain(cfg: Config):
    """The pipeline, one run at a time. Returns a summary dict; a Failed state (with the reason) on bad data.
    First ends what a crashed earlier run left behind (flows/lifecycle.py), then waits for the slot."""
    tracking.setup(cfg)
    log = get_run_logger()
    lifecycle.claim_run(cfg)
    lifecycle.reap_orphans(cfg, log.warning)
    with lifecycle.RetrainSlot(cfg, log.warning):
        return pipeline(cfg)


def pipeline(cfg: Config):
    with mlflow.start_run(run_name=tracking.run_name(cfg, "retrain"), tags=lifecycle.mlflow_owner_tags()) as parent:
        tracking.log_config(cfg)
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.set_tags({"pipeline": "retrain", "git_commit": git_commit(cfg.root_path), "base_model": cfg.model.name})
        try:
            data = prepare_data(cfg)
        except DataVersionError as e:
            mlflow.set_tag("outcome", "data unavailable")
            return Failed(message=f"data unavailable: {e}")
        mlflow.set_tag("data_version", data.version)
        tracking.log_data_input(cfg.data_path, data.version, data.rows, data.remote)
        validation = validate(cfg, data, parent.info.run_id)
        summary = {"run_id": parent.info.run_id, "data": asdict(data), "validation": asdict(validation)}
        if not validation.ok:
            mlflow.set_tag("outcome", "invalid data")
            return Failed(message=f"data validation failed ({validation.problems} problem(s)); no training ran.\n"
                                  f"{validation.report}", data=summary)
        if (held := registry.rolled_back_like(cfg.tracking.registered_model_name, data.version, config_hash(cfg))) is not None:
            mlflow.set_tag("outcome", f"held by the rollback of v{held.version}")
            return Completed(data=summary | {"held_by_rollback": str(held.version)},
                             message=f"not retrained: v{held.version}, trained on data {data.version} with this config, was "
                                     f"rolled back ({held.tags[registry.ROLLED_BACK]}); a rollback holds until the data "
                                     "or the config change")
        if (champion := nothing_new(cfg, data)) is not None:
            mlflow.set_tag("outcome", "nothing new")
            return Completed(data=summary | {"nothing_new": champion},
                             message=f"nothing new: champion v{champion} was trained on data {data.version} with this config")
        base_path = base_model(cfg, data, parent.info.run_id)
        sft_out = run_stage(sft, cfg, data, base_path, parent.info.run_id)
        sft_dir = sft_out["dir"]
        reward_out = run_stage(reward_model, cfg, data, sft_dir, parent.info.run_id)
        reward_dir = reward_out["dir"]
        try:
            policy = run_stage(ppo, cfg, data, sft_dir, reward_dir, parent.info.run_id)
        except PPODivergence as e:
            mlflow.set_tag("outcome", "PPO diverged")
            return Failed(message=str(e), data=summary)
        outs = ((sft, sft_out), (reward_model, reward_out), (ppo, policy))
        in_use = {stage_root(cfg, out["dir"]).resolve() for _, out in outs}
        for d in in_use:
            os.utime(d)  # "recently used" is what pruning keeps
        if pruned := prune_stage_outputs(cfg.state_path / "stages", cfg.infra.keep_stage_outputs, in_use):
            get_run_logger().info("pruned %d stage output dir(s) beyond the %d most recently used per stage "
                                  "(infra.keep_stage_outputs): %s", len(pruned), cfg.infra.keep_stage_outputs,
                                  ", ".join(d.name for d in pruned))
        summary.update(base=base_path, sft=sft_dir, reward=reward_dir, policy=policy["dir"],
                       ppo_metrics=policy["metrics"],
                       cached=[stage.name for stage, out in outs if out["cached"]])
        gate = evaluate(cfg, data, sft_dir, reward_dir, policy["dir"], parent.info.run_id)
        summary["gate"] = gate
        log_on_parent(gate["gate_metrics"] | {f"eval/{name}/{k}": v for name, m in gate["eval"].items() for k, v in m.items()})
        mlflow.set_tag("champion_compared", gate["champion_version"] or "none")
        if not gate["passed"]:
            mlflow.set_tag("outcome", "not promoted")
            return Completed(data=summary, message="not promoted because " + "; ".join(gate["reasons"]))
        reg = register(cfg, data, sft_dir, policy["dir"], gate, parent.info.run_id)
        summary["registered"] = reg
        if cfg.gate.approval == "auto":
            previous = registry.promote(reg["name"], reg["version"], approver="auto (gate passed)")
            summary["registered"]["previous_champion"] = previous
            summary["registered"]["alias"] = registry.CHAMPION
            mlflow.set_tag("outcome", f"promoted v{reg['version']}")
            return Completed(data=summary, message=f"promoted {reg['name']} v{reg['version']} to {registry.CHAMPION}")
        summary["registered"]["alias"] = registry.CHALLENGER
        decision = await_approval(cfg, reg)
        if decision is None or not decision.approve:
            why = (f"no approval within {cfg.gate.approval_timeout_s}s" if decision is None
                   else f"rejected by {decision.approver}" + (f": {decision.comment}" if decision.comment else ""))
            mlflow.set_tag("outcome", f"v{reg['version']} not promoted ({why})")
            return Completed(data=summary, message=f"not promoted because {why}; {reg['name']} v{reg['version']} "
                                                   f"stays {registry.CHALLENGER}")
        previous = registry.promote(reg["name"], reg["version"], approver=decision.approver)
        summary["registered"].update(alias=registry.CHAMPION, previous_champion=previous, approver=decision.approver)
        mlflow.set_tag("outcome", f"promoted v{reg['version']} (approved by {decision.approver})")
        return Completed(data=summary, message=f"promoted {reg['name']} v{reg['version']} to {registry.CHAMPION} "
                                               f"(approved by {decision.approver})")
