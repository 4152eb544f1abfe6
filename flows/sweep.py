"""Flow `sweep`: PPO variants side by side on the same data, SFT and reward model, one MLflow run each.

    rlhf sweep                                   plain PPO, roll-in (PPO++), roll-out (AggreVaTeD), D2LOLS
    rlhf sweep ppo/guide=none,rollin ppo.steps=80 seed=1
    rlhf sweep ppo.target_kl=4,6,8               any Hydra sweep: comma lists multiply out (Hydra multirun)
    rlhf sweep policy=ppo,rejection_sampling,grpo,rloo     the policy algorithms side by side
    rlhf sweep policy=ppo,grpo,rloo --promote-best         ... and the best one through the gate to the registry

Each variant runs the stages it needs (unchanged ones come from the cache, so SFT and the reward model train
once), then PPO and the evaluation, under its own MLflow run `sweep <variant>` in the project's experiment:
the same seed, the same number of sampled responses (ppo.steps x ppo.batch_size), the same metric names
(`sweep/*` on the variant's run, `ppo/*` curves on its PPO child run), so they compare in the MLflow UI. Nothing
is registered, unless `--promote-best`: then each variant is also gated (the sweep's own gate settings, against the
champion, else the SFT policy), and of those that pass, the one with the highest win rate (then reward gain) is
registered and promoted as a retrain's candidate is, with the same approval (`gate=manual` waits for a person), under
the project's retrain slot and its fence: it waits while a retrain holds the slot, and it is refused (one sentence,
`champion` unchanged) when `champion` moved since that variant was compared with it. The
sweep's run says which variant won and why (tags `sweep.best`, `sweep.best_why`). The table (held-out RM reward,
independent-judge score, KL, wall time) goes on the sweep's run.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import mlflow
from prefect import get_run_logger
from prefect.states import Completed, Failed

from components import tracking
from components.config import Config, compose
from components.evaluation.evaluate import win_rate
from components.registry import registry
from flows import incremental
from flows.caching import run_stage
from flows.contracts import GateOutcome, Registration, RetrainSummary, StageOutput, ValidationSummary
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
from service.slot import RetrainSlot

DEFAULT_SWEEP = ["ppo/guide=none,rollin,aggrevated,d2lols"]
POLICY_NAMESPACES = ("ppo", "rs", "grpo", "rloo", "dpo", "kto")  # each policy stage's metrics prefix
COLUMNS = ("variant", "eval_reward", "eval_reward_sft", "judge", "judge_sft", "win_rate_vs_sft", "kl", "ppo_seconds")


def expand(overrides: list[str]) -> list[list[str]]:
    """Hydra's multirun expansion: each sweep override (`a=1,2`, `range(...)`, `choice(...)`) takes each of
    its values, the cartesian product of all of them. -> one override list per variant. No sweep override in
    `overrides`: the default sweep (plain PPO and the three guided variants) is added."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if not any(o.is_sweep_override() for o in parsed):
        if any(o.get_key_element() == "ppo/guide" for o in parsed):  # one variant, as asked
            return [list(overrides)]
        return expand([*overrides, *DEFAULT_SWEEP])
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    return [list(combo) for combo in itertools.product(*axes)]


def variant_name(overrides: list[str], base: list[str]) -> str:
    """What tells a variant apart: its guide (`ppo/guide=rollin` -> `rollin`) and its other sweep values."""
    guide = [o.split("=", 1)[1] for o in overrides if o.startswith("ppo/guide=")]
    own = [o for o in overrides if o not in base and not o.startswith("ppo/guide=")]
    return " ".join(guide[-1:] + own) or "base"


@dataclass
class SweepRow:
    variant: str
    overrides: list[str]
    run_id: str  # the variant's MLflow run
    metrics: dict[str, float] = field(default_factory=dict)  # `sweep/*`
    error: str | None = None
    gate: GateOutcome | None = None  # with --promote-best
    outputs: tuple[StageOutput, StageOutput, StageOutput] | None = None  # sft, reward model, policy


@dataclass
class SweepSummary:
    run_id: str
    data_version: str
    rows: list[SweepRow]
    best: str | None = None  # --promote-best: the variant taken to the registry
    best_why: str = ""
    registered: Registration | None = None

    def table(self) -> str:
        """A markdown table of the variants."""
        head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        lines = []
        for r in self.rows:
            if r.error:
                lines.append(f"| {r.variant} | failed: {r.error[:80]} |" + " |" * (len(COLUMNS) - 2))
                continue
            cells = [r.variant] + [f"{r.metrics.get('sweep/' + c, float('nan')):.3f}" for c in COLUMNS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        return head + "\n".join(lines) + "\n"


def pick_best(rows: list[SweepRow]) -> tuple[SweepRow | None, str]:
    """Of the variants that passed the gate, the one with the highest win rate, then reward gain -> it and why."""
    gated = [r for r in rows if r.gate is not None]
    passed = [r for r in gated if r.gate.passed]
    if not passed:
        fails = "; ".join(f"{r.variant}: {', '.join(r.gate.reasons)}" for r in gated) or "no variant was evaluated"
        return None, f"no variant passed the gate ({fails})"

    def key(r: SweepRow) -> tuple[float, float]:
        return r.gate.gate_metrics.get("gate/win_rate", 0.0), r.gate.gate_metrics.get("gate/reward_gain", 0.0)

    best = max(passed, key=key)
    baseline = f"champion v{best.gate.champion_version}" if best.gate.champion_version else "the SFT policy"
    others = ", ".join(f"{r.variant} {key(r)[0]:.2f}" for r in passed if r is not best) or "none"
    return best, (
        f"{len(passed)} of {len(gated)} variants passed the gate; {best.variant} has the highest win rate against "
        f"{baseline}, {key(best)[0]:.2f} (reward gain {key(best)[1]:+.3f}; the others that passed: {others})"
    )


@config_flow(name="sweep", validate_parameters=False)
def sweep(cfg: Config, variants: list[list[str]], promote_best: bool = False):
    """The variants (override lists composed over `cfg`'s) one after another; `sweep/*` per variant. With
    `promote_best` the best variant that passes `cfg`'s gate is registered and promoted (retrain's approval)."""
    tracking.setup(cfg)
    log = get_run_logger()
    with mlflow.start_run(run_name=tracking.run_name(cfg, "sweep"), tags=lifecycle.mlflow_owner_tags()) as parent:
        mlflow.set_tags({"pipeline": "sweep", "git_commit": git_commit(cfg.root_path)})
        mlflow.log_text(tracking.redacted_yaml(cfg), "config.yaml")
        data = prepare_data(cfg)
        mlflow.set_tag("data_version", data.version)
        checked = validate(cfg, data, parent.info.run_id)
        if not checked.ok:
            return Failed(message=f"data validation failed; no training ran.\n{checked.report}")
        summary = SweepSummary(parent.info.run_id, data.version, [])
        for overrides in variants:
            vcfg = compose(overrides)
            if vcfg.infra.training_pool:  # the stage flows its stages dispatch to
                ensure_deployed(vcfg.infra.training_pool)
            row = run_variant(
                vcfg, data, parent.info.run_id, variant_name(overrides, cfg.overrides), cfg if promote_best else None
            )
            summary.rows.append(row)
            log.info("sweep %s: %s", row.variant, row.error or {k: round(v, 3) for k, v in row.metrics.items()})
        mlflow.log_table(
            {c: [r.variant if c == "variant" else r.metrics.get(f"sweep/{c}") for r in summary.rows] for c in COLUMNS},
            "sweep_results.json",
        )
        mlflow.log_text(summary.table(), "sweep_results.md")
        if promote_best:
            promoted = promote_the_best(cfg, data, checked, summary)
            if promoted is not None:
                return promoted
        failed = [r.variant for r in summary.rows if r.error]
        if failed:
            return Failed(message=f"variant(s) failed: {', '.join(failed)}", data=summary)
        return Completed(data=summary, message=f"{len(summary.rows)} variants")


def promote_the_best(cfg: Config, data, checked: ValidationSummary, summary: SweepSummary):
    """Register the best variant that passed the gate (flows/stages.register) and promote it as a retrain does
    (flows/retrain.promote: at once, or after a person approves), holding the retrain slot as a retrain does, under
    its fence and by compare-and-set against the champion that variant was compared with. -> a final state when it
    was registered or refused, else None (the sweep ends as without --promote-best)."""
    best, why = pick_best(summary.rows)
    summary.best, summary.best_why = (best.variant if best else None), why
    mlflow.set_tags({"sweep.best": summary.best or "none", "sweep.best_why": why[:5000]})
    get_run_logger().info("promote best: %s", why)
    if best is None or best.gate is None or best.outputs is None:
        return None
    with RetrainSlot(cfg, get_run_logger().warning) as slot:
        state = register_and_promote(cfg, data, checked, summary, best, slot)
    state.data = summary
    return state


def register_and_promote(cfg: Config, data, checked: ValidationSummary, summary: SweepSummary, best, slot):
    """The best variant registered and promoted under `slot` (flows/retrain.before_register, promote)."""
    from flows.retrain import before_register, promote

    again = "rlhf sweep --promote-best"
    s = RetrainSummary(summary.run_id, data, checked, changed=f"sweep best: {best.variant}", gate=best.gate)
    if stop := before_register(cfg, s, slot, again):
        return stop
    sft_out, rm_out, policy_out = best.outputs
    vcfg = compose(best.overrides)
    lineage = incremental.full_lineage(vcfg, data)  # a later retrain may continue from it
    reg = register(vcfg, data, sft_out.dir, policy_out.dir, rm_out.dir, best.gate, summary.run_id, lineage=lineage)
    registry.tag_version(reg.name, reg.version, {registry.SLOT_GENERATION: s.slot_generation})
    summary.registered = s.registered = reg
    state = promote(cfg, s, slot, again)
    summary.registered = s.registered
    return state


def run_variant(cfg: Config, data, parent_run_id: str, name: str, gated_by: Config | None = None) -> SweepRow:
    """One variant: its stages (cached when unchanged), PPO, the evaluation; `sweep/*` on its own run. With
    `gated_by` (--promote-best: the sweep's own config) the evaluation also goes through that config's gate."""
    with mlflow.start_run(
        run_name=f"sweep {name}", nested=True, parent_run_id=parent_run_id, tags=lifecycle.mlflow_owner_tags()
    ) as run:
        mlflow.set_tags({"sweep.variant": name, "data_version": data.version})
        tracking.log_params(tracking.flatten(asdict(cfg.ppo), prefix="ppo."))
        tracking.log_params(tracking.flatten(asdict(cfg.policy), prefix="policy."))
        mlflow.log_param("sweep.overrides", " ".join(tracking.redact_override(o) for o in cfg.overrides)[:6000])
        row = SweepRow(name, list(cfg.overrides), run.info.run_id)
        try:
            base = base_model(cfg, data, run.info.run_id)
            sft_out = run_stage(sft, cfg, data, base, run.info.run_id)
            rm_out = run_stage(reward_model, cfg, data, sft_out.dir, run.info.run_id)
            policy = run_stage(policy_stage(cfg), pin_guide(cfg), data, sft_out.dir, rm_out.dir, run.info.run_id)
            ev = evaluate(cfg, data, sft_out.dir, rm_out.dir, policy.dir, run.info.run_id)
            if gated_by is not None:
                row.gate, row.outputs = gate(gated_by, ev), (sft_out, rm_out, policy)
        except Exception as e:  # one variant's failure (a diverged PPO) is a row of the table, not the sweep's end
            mlflow.set_tag("outcome", f"failed: {type(e).__name__}")
            row.error = f"{type(e).__name__}: {e}"
        else:
            cand, ref = ev.eval["candidate"], ev.eval["sft"]
            row.metrics = tracking.finite(
                {
                    "sweep/eval_reward": cand["reward_mean"],
                    "sweep/eval_reward_sft": ref["reward_mean"],
                    "sweep/judge": cand.get("judge_mean", float("nan")),
                    "sweep/judge_sft": ref.get("judge_mean", float("nan")),
                    "sweep/win_rate_vs_sft": win_rate(ev.rewards["candidate"], ev.rewards["sft"]),
                    "sweep/kl": cand["kl"],
                    # the policy stage's own time (generation, guide calls, scoring, updates), kept when its output
                    # is cached: PPO's, rejection sampling's, GRPO's or RLOO's (`rlhf sweep policy=ppo,grpo,...`)
                    "sweep/ppo_seconds": next(
                        (
                            policy.metrics[f"{ns}/train_seconds"]
                            for ns in POLICY_NAMESPACES
                            if f"{ns}/train_seconds" in policy.metrics
                        ),
                        float("nan"),
                    ),
                    "sweep/guide_tokens": policy.metrics.get("ppo/guide_tokens_mean", 0.0),
                }
            )
            mlflow.log_metrics(row.metrics)
            mlflow.set_tag("outcome", "done")
    if row.error:  # the run ended FINISHED with the block: FAILED, so the UI shows which variant failed
        mlflow.MlflowClient().set_terminated(row.run_id, "FAILED")
    return row
