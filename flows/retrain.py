"""Flow `retrain`: the pipeline, one Prefect task per stage (flows/stages.py), one MLflow child run per stage.

    prepare data (pinned snapshot) -> validate (Great Expectations) -> [demo base] -> SFT (LoRA)
    -> reward model (LoRA + head) -> PPO (LoRA, one shared base) -> evaluate vs champion -> gate
    -> register (alias candidate) -> promote (alias champion: auto, or after a person approves)

One retrain of a project at a time (service/slot.py); SFT, RM and PPO are cached across runs
(flows/caching.py). The flow returns a `RetrainSummary` (flows/contracts.py).

Full or incremental (`retrain.mode`, flows/incremental.py): when today's data only adds comparisons, thumbs or
prompts to the champion's and the config is the same, the champion's SFT model is kept and its reward model and
policy train on from its registered warm-start bundle, on the new rows (and a replay sample of the earlier ones);
the gate then asks non-inferiority to the champion and a gain on the new data (components/evaluation/gate.py).

Register and promote only under the fence (issue 38): right before each, the run checks that it still holds the
retrain slot (`RetrainSlot.fence`, its generation recorded as the version's tag `slot_generation`) and that
`champion` still points at the version the gate compared the candidate with (`registry.check_champion`; `promote`
moves it by compare-and-set). Either failing ends the run Failed with one sentence, `champion` unchanged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
from prefect import get_run_logger
from prefect.states import Completed, Failed, State

from components import tracking
from components.config import Config
from components.data.needs import missing
from components.data.versioning import DataState, DataVersionError
from components.models.fit import check_model_fits
from components.registry import registry
from components.training.direct import data_problem
from components.training.ppo import PPODivergence
from flows import incremental
from flows.approval import await_approval
from flows.caching import config_hash, log_on_parent, prune_stage_outputs, run_stage, stage_root
from flows.contracts import RetrainSummary, StageOutput
from flows.locations import prune_inputs
from flows.pool import ensure_deployed
from flows.stages import (
    base_model,
    evaluate,
    gate,
    git_commit,
    pin_guide,
    policy_stage,
    prepare_data,
    register,
    reward_model,
    sft,
    validate,
)
from service import lifecycle
from service.redaction import config_flow
from service.slot import RetrainSlot, SlotLost

AGAIN = "rlhf run"  # what to run when a registration or promotion is refused


@config_flow(
    name="retrain", validate_parameters=False
)  # no log_prints: it turns library bytecode dumps (datasets hashing) into log lines
def retrain(cfg: Config):
    """The pipeline, one run at a time. First ends what a crashed earlier run left behind, then waits for
    the project's retrain slot."""
    tracking.setup(cfg)
    log = get_run_logger()
    lifecycle.claim_run(cfg)
    lifecycle.reap_orphans(cfg, log.warning)
    with RetrainSlot(cfg, log.warning) as slot:
        return pipeline(cfg, slot)


def pipeline(cfg: Config, slot: RetrainSlot | None = None) -> State:
    """The stages, under `slot` (the retrain slot this run holds: without it nothing is registered or promoted)."""
    if cfg.infra.training_pool:  # the stage flows its stages dispatch to, deployed before the first one
        ensure_deployed(cfg.infra.training_pool)
    with mlflow.start_run(run_name=tracking.run_name(cfg, "retrain"), tags=lifecycle.mlflow_owner_tags()) as parent:
        run_id = parent.info.run_id
        # 1. the run's record: config, code, data version
        tracking.log_config(cfg)
        mlflow.log_text(tracking.redacted_yaml(cfg), "config.yaml")
        mlflow.set_tags({"pipeline": "retrain", "git_commit": git_commit(cfg.root_path), "base_model": cfg.model.name})
        try:
            data = prepare_data(cfg)
        except DataVersionError as e:
            return finish(None, "data unavailable", Failed(message=f"data unavailable: {e}"))
        mlflow.set_tag("data_version", data.version)
        tracking.log_data_input(cfg.data_path, data.version, data.rows, data.remote)
        if lacking := missing(cfg.policy.algorithm, data.rows):  # before any model loads
            return finish(None, "data incomplete", Failed(message=f"data {data.version}: " + "; ".join(lacking)))
        # the model against the configured lengths (config and tokenizer only); with a pool the weights are the workers'
        if not cfg.infra.training_pool and (misfit := check_model_fits(cfg)):
            return finish(None, "model does not fit", Failed(message="; ".join(misfit) + "; no training ran"))

        # 2. validate; stop when there is nothing to do
        s = RetrainSummary(run_id, data, validate(cfg, data, run_id), changed=what_changed(cfg, data))
        if not s.validation.ok:
            return finish(
                s,
                "invalid data",
                Failed(
                    message=f"data validation failed ({s.validation.problems} problem(s)); no training ran.\n{s.validation.report}",
                    data=s,
                ),
            )
        if problem := data_problem(cfg.policy.algorithm, s.validation.rows):  # before any model loads
            return finish(s, "wrong data for the policy", Failed(message=f"{problem}; no training ran.", data=s))
        if stop := nothing_to_do(cfg, data, s):
            return stop

        # 3. full or incremental (retrain.mode): does today's data only add to the champion's?
        try:
            plan = incremental.plan(cfg, data)
        except incremental.IncrementalRefused as e:
            return finish(s, "incremental refused", Failed(message=f"{e}; no training ran", data=s))
        s.mode, s.mode_reason, s.parent = plan.mode, plan.decision.reason, (plan.parent if plan.incremental else None)
        mlflow.set_tags({"retrain_mode": plan.mode, "retrain_mode_reason": plan.decision.reason[:500]})
        if plan.incremental:
            mlflow.set_tag("incremental_parent", f"v{plan.parent}")
        get_run_logger().info("%s retrain: %s", plan.mode, plan.decision.reason)

        # 4. train: base -> SFT -> reward model -> policy (unchanged stages: cached). Incremental: the champion's SFT
        # model, its reward model and policy trained on with the new data
        try:
            if plan.incremental:
                assert plan.sft_dir is not None and plan.warm_from is not None
                s.sft = StageOutput(plan.sft_dir, "", {}, cached=True)
                train_cfg = incremental.incremental_config(cfg)
                s.reward = run_stage(reward_model, train_cfg, data, s.sft.dir, run_id, warm_from=plan.warm_from)
                policy_args = (pin_guide(train_cfg), data, s.sft.dir, s.reward.dir, run_id)
                s.policy = run_stage(policy_stage(cfg), *policy_args, warm_from=plan.warm_from)
            else:
                s.base = base_model(cfg, data, run_id)
                s.sft = run_stage(sft, cfg, data, s.base, run_id)
                s.reward = run_stage(reward_model, cfg, data, s.sft.dir, run_id)
                s.policy = run_stage(policy_stage(cfg), pin_guide(cfg), data, s.sft.dir, s.reward.dir, run_id)
        except PPODivergence as e:
            return finish(s, "PPO diverged", Failed(message=str(e), data=s))
        trained = (("sft", s.sft), ("reward-model", s.reward), (policy_stage(cfg).name, s.policy))
        s.cached = [name for name, out in trained if out.cached and not (plan.incremental and name == "sft")]
        if plan.incremental:  # the champion continued from stays fetched: its SFT model is this run's
            prune(cfg, [s.reward, s.policy], Path(s.sft.dir).parent.parent)
        else:
            prune(cfg, [s.sft, s.reward, s.policy])

        # 5. evaluate against the champion and gate (an incremental candidate: non-inferior, and better on what is new)
        ev = evaluate(cfg, data, s.sft.dir, s.reward.dir, s.policy.dir, run_id)
        continued = plan.incremental and ev.champion_version == plan.parent  # not if champion moved since the plan
        s.gate = gate(cfg, ev, incremental.new_data_measures(s.reward.metrics) if continued else None)
        log_on_parent(
            s.gate.gate_metrics | {f"eval/{who}/{k}": v for who, m in s.gate.eval.items() for k, v in m.items()}
        )
        mlflow.set_tag("champion_compared", s.gate.champion_version or "none")
        if not s.gate.passed:
            return finish(
                s, "not promoted", Completed(data=s, message="not promoted because " + "; ".join(s.gate.reasons))
            )

        # 6. register (alias candidate), then promote: at once, or after a person approves; each under the fence
        if stop := before_register(cfg, s, slot):
            return stop
        lineage = incremental.lineage_of(plan, cfg, data)
        s.registered = register(cfg, data, s.sft.dir, s.policy.dir, s.reward.dir, s.gate, run_id, lineage)
        registry.tag_version(s.registered.name, s.registered.version, {registry.SLOT_GENERATION: s.slot_generation})
        if cfg.registry.promotion == "canary" and s.gate.champion_version is not None:
            return enter_canary(cfg, s, slot)  # the users decide (flows/canary.py); a first model has no one to face
        return promote(cfg, s, slot)


def nothing_to_do(cfg: Config, data: DataState, s: RetrainSummary) -> State | None:
    """A final state when this data and config were trained before: the champion has them ("nothing
    new"), or a rolled-back version has them (a rollback holds until the data or config change). A champion trained
    incrementally does not make `retrain.mode=full` on its data "nothing new": a full retrain is what was asked."""
    name = cfg.tracking.registered_model_name
    if (held := registry.rolled_back_like(name, data.version, config_hash(cfg))) is not None:
        s.held_by_rollback = str(held.version)
        return finish(
            s,
            f"held by the rollback of v{held.version}",
            Completed(
                data=s,
                message=(
                    f"not retrained: v{held.version}, trained on data {data.version} with this config, was rolled back "
                    f"({held.tags[registry.ROLLED_BACK]}); a rollback holds until the data or the config change"
                ),
            ),
        )
    champion = registry.alias_version(name, registry.CHAMPION)
    tags = registry.version_tags(name, champion) if champion else {}
    if tags.get("retrain_mode") == "incremental" and cfg.retrain.mode == "full":
        return None  # the weekly full retrain beside nightly incremental ones: the same data, trained from scratch
    if tags.get("data_version") == data.version and tags.get("config_hash") == config_hash(cfg):
        s.nothing_new = champion
        return finish(
            s,
            "nothing new",
            Completed(
                data=s, message=f"nothing new: champion v{champion} was trained on data {data.version} with this config"
            ),
        )
    return None


def prune(cfg: Config, outputs: list[StageOutput], champion: Path | None = None) -> None:
    """Mark this run's stage dirs recently used, and prune the others beyond `infra.keep_stage_outputs`; the same
    for the inputs downloaded from other machines (flows/locations.prune_inputs) and the fetched champions."""
    if removed := prune_inputs(cfg):
        get_run_logger().info("pruned %d downloaded input(s) beyond the most recently used", len(removed))
    # the champions fetched for evaluation and warm starts (<state>/champions/<name>-v<N>): the most recently used
    in_use = {champion.resolve()} if champion else set()
    prune_stage_outputs(cfg.state_path / "champions", cfg.infra.keep_stage_outputs, in_use)
    if cfg.infra.training_pool:  # the outputs are on the workers (each prunes its own)
        return
    in_use = {stage_root(cfg, out.dir).resolve() for out in outputs}
    for d in in_use:
        os.utime(d)
    if pruned := prune_stage_outputs(cfg.state_path / "stages", cfg.infra.keep_stage_outputs, in_use):
        get_run_logger().info(
            "pruned %d stage output dir(s) beyond the %d most recently used per stage (infra.keep_stage_outputs): %s",
            len(pruned),
            cfg.infra.keep_stage_outputs,
            ", ".join(d.name for d in pruned),
        )


def fence(slot: RetrainSlot | None) -> int:
    """The slot's generation when this run still holds it (`RetrainSlot.fence`); SlotLost otherwise."""
    if slot is None:
        raise SlotLost("this run does not hold the retrain slot")
    return slot.fence()


def refused(s: RetrainSummary, not_done: str, e: Exception, again: str) -> State:
    """A registration or promotion refused (the slot lost, or `champion` moved since the gate compared): Failed, with
    one sentence saying what happened and what to do; the registry's `champion` is unchanged."""
    moved = isinstance(e, registry.ChampionMoved)
    todo = f"run `{again}` again" + (f" to compare against {e.against}" if moved else "")
    why = "champion moved" if moved else "retrain slot lost"
    return finish(s, f"{not_done} ({why})", Failed(message=f"{not_done}: {e}; {todo}", data=s))


def before_register(cfg: Config, s: RetrainSummary, slot: RetrainSlot | None, again: str = AGAIN) -> State | None:
    """Register only while this run holds the slot and `champion` is still the gate's baseline: a candidate compared
    with an older champion is not registered at all. -> a final state when not; records the slot's generation."""
    try:
        s.slot_generation = fence(slot)
        registry.check_champion(cfg.tracking.registered_model_name, s.gate.champion_version)
    except (SlotLost, registry.ChampionMoved) as e:
        return refused(s, "nothing registered", e, again)
    return None


def promote(cfg: Config, s: RetrainSummary, slot: RetrainSlot | None = None, again: str = AGAIN) -> State:
    """Move `champion` to the registered candidate (at once, or once a person approves) by compare-and-set under the
    slot's fence (`registry.promote`): refused when the run lost the slot or `champion` moved since the gate."""
    reg = s.registered
    if cfg.gate.approval == "auto":
        approver = "auto (gate passed)"
    else:
        decision = await_approval(cfg, reg)
        if decision is None or not decision.approve:
            why = (
                f"no approval within {cfg.gate.approval_timeout_s}s"
                if decision is None
                else f"rejected by {decision.approver}" + (f": {decision.comment}" if decision.comment else "")
            )
            return finish(
                s,
                f"v{reg.version} not promoted ({why})",
                Completed(
                    data=s, message=f"not promoted because {why}; {reg.name} v{reg.version} stays {registry.CANDIDATE}"
                ),
            )
        approver = decision.approver
    try:
        reg.previous_champion = registry.promote(
            reg.name, reg.version, approver=approver, compared=s.gate.champion_version, fence=lambda: fence(slot)
        )
    except (SlotLost, registry.ChampionMoved) as e:
        return refused(s, f"v{reg.version} not promoted", e, again)
    reg.alias = registry.CHAMPION
    by = "" if cfg.gate.approval == "auto" else f" (approved by {approver})"
    reg.approver = None if cfg.gate.approval == "auto" else approver
    return finish(
        s,
        f"promoted v{reg.version}{by}",
        Completed(data=s, message=f"promoted {reg.name} v{reg.version} to {registry.CHAMPION}{by}"),
    )


def enter_canary(cfg: Config, s: RetrainSummary, slot: RetrainSlot | None = None, again: str = AGAIN) -> State:
    """registry.promotion=canary: the candidate becomes the `challenger` of the running server under the slot's fence,
    while `champion` is still its gate's baseline; while another canary runs it is queued (on_new_candidate=queue:
    started when that canary ends) or replaces it (replace: the running one is retired)."""
    from components.registry import canary

    reg, c = s.registered, cfg.registry.canary
    assert reg is not None
    try:
        fence(slot)
        registry.check_champion(reg.name, s.gate.champion_version, f"since v{reg.version} was compared")
        running = registry.alias_version(reg.name, registry.CHALLENGER)
        if running is not None and running != s.gate.champion_version:
            if c.on_new_candidate == "queue":
                registry.tag_version(reg.name, reg.version, {canary.QUEUED: str(int(time.time() * 1000))})
                return finish(
                    s,
                    f"v{reg.version} queued for a canary",
                    Completed(
                        data=s,
                        message=f"v{reg.version} passed the gate and waits for the canary of v{running} to end "
                        "(registry.canary.on_new_candidate=queue); `rlhf canary status` shows it",
                    ),
                )
            registry.tag_version(
                reg.name, running, {canary.VERDICT: "superseded", "canary_reason": f"replaced by v{reg.version}"}
            )
        canary.start(reg.name, reg.version, shadow_first=c.shadow_answers > 0)
    except (SlotLost, registry.ChampionMoved) as e:
        return refused(s, f"v{reg.version} not made the challenger", e, again)
    reg.alias = registry.CHALLENGER
    how = f"in shadow for {c.shadow_answers} answers, then for" if c.shadow_answers > 0 else "for"
    return finish(
        s,
        f"v{reg.version} in canary",
        Completed(
            data=s,
            message=f"v{reg.version} passed the gate and is the challenger of champion v{s.gate.champion_version}: a "
            f"running `rlhf model serve` answers {how} {c.share:.0%} of users with it; `rlhf canary status` shows how "
            "it goes",
        ),
    )


def finish(s: RetrainSummary | None, outcome: str, state: State) -> State:
    """Record the outcome on the parent run and name the run so the MLflow run table tells runs apart:
    data version (short), what changed since the champion, and the outcome."""
    mlflow.set_tag("outcome", outcome)
    if s is not None:
        mlflow.set_tag(
            "mlflow.runName",
            f"{mlflow.active_run().info.run_name.split(' ')[0]} {s.data.version[:8]} ({s.changed}): {outcome}",
        )
        try:
            summarise(s, outcome, state.message or "")
        except Exception as e:  # the summary is for people: a failure to write it never changes the outcome
            get_run_logger().warning("the run's summary.md could not be written (%s: %s)", type(e).__name__, e)
    return state


def summarise(s: RetrainSummary, outcome: str, message: str) -> None:
    """The parent run's one page (`summary.md`) and its stages' curves (`curves/<stage>_<figure>.png`), and each stage
    run named and tagged with the version this retrain registered: what a person reads in the MLflow UI."""
    import tempfile

    client = mlflow.MlflowClient()
    parent = mlflow.active_run().info
    retrain = parent.run_name.split(" ")[0]
    version = s.registered.version if s.registered else None
    children = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    lines = [
        f"# {retrain}: {outcome}",
        "",
        message,
        "",
        f"- data version `{s.data.version}` ({s.changed or 'first run'}); {s.mode or 'full'} retrain"
        + (f": {s.mode_reason}" if s.mode_reason else ""),
    ]
    if s.registered:
        lines.append(f"- registered `{s.registered.name}` v{s.registered.version}, alias `{s.registered.alias}`")
    if s.gate:
        lines += ["", "## Gate", "", "```", s.gate.summary, "```"]
    lines += ["", "## Stages", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for child in sorted(children, key=lambda r: r.info.start_time or 0):
            stage = child.data.tags.get("stage", child.info.run_name.split(" ")[0])
            if version:
                client.set_tag(child.info.run_id, "registered_version", version)
                client.set_tag(child.info.run_id, "mlflow.runName", f"{stage} · {retrain} → v{version}")
            lines.append(f"- [{stage}](#/experiments/{parent.experiment_id}/runs/{child.info.run_id})")
            for art in client.list_artifacts(child.info.run_id):
                if art.path.endswith(".png"):
                    local = client.download_artifacts(child.info.run_id, art.path, tmp)
                    target = Path(tmp) / f"{stage}_{Path(art.path).name}"
                    Path(local).rename(target)
                    mlflow.log_artifact(str(target), "curves")
                    lines.append(f"  - curves: `curves/{target.name}`")
    mlflow.log_text("\n".join(lines) + "\n", "summary.md")


def what_changed(cfg: Config, data: DataState) -> str:
    """Against the champion's tags: 'first run', 'new data', 'new config', 'new data + config' or 'same inputs'."""
    name = cfg.tracking.registered_model_name
    champion = registry.alias_version(name, registry.CHAMPION)
    if champion is None:
        return "first run"
    tags = registry.version_tags(name, champion)
    changed = [
        what
        for what, same in (
            ("data", tags.get("data_version") == data.version),
            ("config", tags.get("config_hash") == config_hash(cfg)),
        )
        if not same
    ]
    return "new " + " + ".join(changed) if changed else "same inputs"
