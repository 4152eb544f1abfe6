"""The canary's decision (issue 41): read both arms' trusted votes and served answers, run the sequential test and
the guardrails, and act on a verdict.

    status(cfg)            what `rlhf canary status` prints: per arm the answers, judged answers and thumbs-up rate
                           with its anytime-valid interval; the test's decision so far; the guardrails' windows
    canary_check(cfg)      the same, then acts: `rlhf canary check`, and `rlhf serve` on registry.canary's schedule

The outcomes:
    a guardrail tripped    (max_failed_windows failed windows) the challenger is retired at once, the reason named
    promote                `champion` moves to the challenger through the registry's compare-and-set under the retrain
                           slot's fence, after a person's approval when gate.approval=manual
    retire                 (worse, not min_improvement better, or the deadline) the challenger alias is removed: the
                           champion keeps all traffic at the serving process's next poll
Each outcome is tagged on the challenger's version, recorded as an MLflow run `canary v<N>` with the per-arm curves as
a plot, announced as a Prefect event (`rlhf.canary.promoted`, `rlhf.canary.retired`, `rlhf.canary.guardrail`) and,
with registry.canary.webhook, POSTed there as JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from prefect import flow, get_run_logger

from components import tracking
from components.config import Config
from components.evaluation import guardrails, sequential
from components.registry import canary as observed
from components.registry import registry
from components.registry.feedback import Limits

EVENTS = {"promote": "rlhf.canary.promoted", "retire": "rlhf.canary.retired", "guardrail": "rlhf.canary.guardrail"}


@dataclass
class Status:
    name: str
    champion: str
    challenger: str
    started_ms: int
    decision: sequential.Decision
    guard: guardrails.Guard
    served: dict[str, int]
    intervals: dict[str, tuple[float, float]]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # arm -> (judged answers, rate)
    deadline_passed: bool = False
    outcome: str = ""  # what the check did
    phase: str = "traffic"  # shadow | traffic
    judged: dict[str, int] = field(default_factory=dict)  # every trusted judged answer per arm (the decision's counts
    ups: dict[str, int] = field(default_factory=dict)  # stop at its verdict: decision.judged)
    queued: list[str] = field(default_factory=list)  # versions waiting for a canary
    skipped: dict[str, int] = field(default_factory=dict)  # answers and votes left out, by reason (trust, limits)

    def rate(self, arm: str) -> float:
        return self.ups[arm] / self.judged[arm] if self.judged.get(arm) else 0.0

    @property
    def verdict(self) -> str:
        """guardrail | promote | retire | continue."""
        return "guardrail" if self.guard.tripped else self.decision.verdict

    @property
    def reason(self) -> str:
        return self.guard.reason() if self.guard.tripped else self.decision.reason

    def table(self) -> str:
        lines = [
            f"canary of {self.name}: challenger v{self.challenger} against champion v{self.champion}, started "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.started_ms / 1000))}",
            f"  {'arm':<11} {'version':>7} {'answers':>8} {'judged':>7} {'thumbs-up':>10}  interval (anytime-valid)",
        ]
        for arm, version in (("champion", self.champion), ("challenger", self.challenger)):
            lo, hi = self.intervals[arm]
            lines.append(
                f"  {arm:<11} {'v' + version:>7} {self.served[arm]:>8} {self.judged[arm]:>7} {self.rate(arm):>10.3f}  "
                f"[{lo:.3f}, {hi:.3f}]"
            )
        lines.append(f"  guardrails: {self.guard.reason()} ({self.guard.windows} windows checked)")
        if self.phase == "shadow":
            lines.append("  phase: shadow (the challenger answers every prompt unseen; no votes can decide yet)")
        for why, n in sorted(self.skipped.items()):
            lines.append(f"  left out: {n} ({why})")
        if self.queued:
            lines.append(f"  queued for a canary next: {', '.join('v' + v for v in self.queued)}")
        lines.append(f"  decision: {self.verdict}: {self.reason}")
        return "\n".join(lines)


def status(cfg: Config) -> Status | None:
    """The canary now, or None when no version has the alias `challenger` (or it is the champion)."""
    from service import keys as keyring
    from service import raters

    name = cfg.tracking.registered_model_name
    experiment_id = tracking.serving_experiment(cfg)
    champion = registry.alias_version(name, registry.CHAMPION)
    challenger = registry.alias_version(name, registry.CHALLENGER)
    if champion is None or challenger is None or challenger == champion:
        return None
    c = cfg.registry.canary
    arms = observed.Arms(champion, challenger, observed.started_ms(name, challenger))
    keys = keyring.load(cfg).verifying()
    revoked = {r.name for r in raters.read(raters.raters_path(cfg)).values() if r.revoked is not None}
    fb = cfg.registry.feedback
    limits = Limits(fb.votes_per_rater_per_day, fb.max_rater_share, fb.min_raters)
    seen = observed.votes(arms, experiment_id, keys, revoked, limits)
    answers = observed.served(arms, experiment_id, keys)
    rule = sequential.Rule(c.false_promotion_rate, c.futility_rate, c.min_improvement, c.min_judged)
    test = sequential.Canary(rule)
    curves: dict[str, list[tuple[int, float]]] = {"champion": [], "challenger": []}
    judged = {"champion": 0, "challenger": 0}  # every trusted vote (the test stops counting at its verdict)
    ups = {"champion": 0, "challenger": 0}
    for arm, up, _ in seen.votes:
        test.add(arm, up)
        judged[arm] += 1
        ups[arm] += up
        curves[arm].append((judged[arm], ups[arm] / judged[arm]))
    deadline_passed = time.time() * 1000 - arms.started_ms > c.deadline_h * 3_600_000
    decision = test.decision(deadline_passed)
    guard = guardrails.Guard(c.max_failed_windows)
    challenger_answers = answers["challenger"]
    # the champion's reward model scores both arms (a fixed yardstick): only with registry.canary.max_reward_drop
    scorer = observed.champion_scorer(name, champion) if c.max_reward_drop is not None else None
    for mine, theirs in guardrails.windows(
        [a for _, a in challenger_answers], answers["champion"], [t for t, _ in challenger_answers], c.window
    ):
        if theirs:
            if scorer is not None:
                mine, theirs = observed.scored(scorer, mine), observed.scored(scorer, theirs)
            guard.add(guardrails.check(mine, theirs, guardrails.Limits.of(c)))
    intervals = {
        arm: sequential.rate_interval(ups[arm], judged[arm], c.false_promotion_rate)
        for arm in ("champion", "challenger")
    }
    return Status(
        name,
        champion,
        challenger,
        arms.started_ms,
        decision,
        guard,
        {arm: len(a) for arm, a in answers.items()},
        intervals,
        curves,
        deadline_passed,
        phase=registry.version_tags(name, challenger).get(observed.PHASE, "traffic"),
        judged=judged,
        ups=ups,
        queued=observed.queued(name),
        skipped=dict(seen.skipped),
    )


@flow(name="canary-check", validate_parameters=False)
def canary_check(cfg: Config) -> Status | None:
    """Decide the canary and act on a verdict (module docstring); None when there is no canary."""
    logger = get_run_logger()
    if done := finish_interrupted(cfg.tracking.registered_model_name):
        logger.warning("canary: %s", done)
    s = status(cfg)
    if s is None:
        logger.info("no canary: no version of %s has the alias %s", cfg.tracking.registered_model_name, "challenger")
        return None
    logger.info("%s", s.table())
    c = cfg.registry.canary
    if s.phase == "shadow" and not s.guard.tripped:
        if s.served["challenger"] >= c.shadow_answers and not s.guard.failures:
            registry.tag_version(s.name, s.challenger, {observed.PHASE: "traffic"})
            s.outcome = f"v{s.challenger} passed {s.served['challenger']} answers in shadow: it now answers {c.share:.0%} of users"
        else:
            s.outcome = f"in shadow: {s.served['challenger']} of {c.shadow_answers} answers so far"
        logger.info("canary: %s", s.outcome)
        return s
    if s.verdict == "continue":
        s.outcome = "no verdict yet: the canary goes on"
        return s
    if s.verdict == "promote":
        s.outcome = promote(cfg, s)
    else:
        retire(s)
        s.outcome = f"v{s.challenger} retired: the champion v{s.champion} keeps all traffic"
    logger.warning("canary %s: %s; %s", s.verdict, s.reason, s.outcome)
    record(cfg, s)
    announce(cfg, s)
    if registry.alias_version(s.name, registry.CHALLENGER) is None and (nxt := next_in_queue(cfg, s.name)):
        s.outcome += f"; {nxt}"
        logger.warning("canary: %s", nxt)
    return s


def finish_interrupted(name: str) -> str | None:
    """A check stopped between moving `champion` to the challenger and its last step (the verdict tag, the alias
    removed) left `challenger` on the champion: finish it -> what was done, or None when nothing was left."""
    challenger = registry.alias_version(name, registry.CHALLENGER)
    if challenger is None or challenger != registry.alias_version(name, registry.CHAMPION):
        return None
    recorded = observed.VERDICT in registry.version_tags(name, challenger)
    end_canary(name, challenger, {} if recorded else {
        observed.VERDICT: "promote",
        "canary_reason": "promoted; the check that promoted it stopped before it recorded its verdict (no run or "
        "event was made for it)",
    })  # fmt: skip
    return f"v{challenger} is the champion and still had the alias challenger (a check stopped mid-promotion): removed"


def next_in_queue(cfg: Config, name: str) -> str | None:
    """Start the canary of the newest queued candidate (older ones are superseded by it): -> what happened."""
    waiting = observed.queued(name)
    if not waiting:
        return None
    newest, older = waiting[-1], waiting[:-1]
    for v in older:
        registry.tag_version(name, v, {observed.VERDICT: "superseded", "canary_reason": f"v{newest} was queued later"})
    if newest == registry.alias_version(name, registry.CHAMPION):
        return None
    observed.start(name, newest, shadow_first=cfg.registry.canary.shadow_answers > 0)
    return f"v{newest}, queued, is the challenger now" + (f" (v{', v'.join(older)} superseded)" if older else "")


def retire(s: Status) -> None:
    end_canary(s.name, s.challenger, {observed.VERDICT: s.verdict, "canary_reason": s.reason[:4000]})


def end_canary(name: str, version: str, tags: dict[str, str]) -> None:
    """`tags` on the version, and the `challenger` alias removed if it still points at it."""
    import mlflow

    registry.tag_version(name, version, tags)
    if registry.alias_version(name, registry.CHALLENGER) == version:
        mlflow.MlflowClient().delete_registered_model_alias(name, registry.CHALLENGER)


def promote(cfg: Config, s: Status) -> str:
    """`champion` to the challenger under the retrain slot, compared with the champion the canary ran against."""
    from flows.approval import await_approval
    from flows.contracts import Registration
    from service.slot import RetrainSlot, SlotBusy, SlotLost

    approver = "canary (sequential test)"
    if cfg.gate.approval == "manual":
        decision = await_approval(cfg, Registration(s.name, s.challenger))
        if decision is None or not decision.approve:
            retire(s)
            return f"v{s.challenger} was not approved: retired, the champion v{s.champion} keeps all traffic"
        approver = decision.approver
    logger = get_run_logger()
    slot = RetrainSlot(cfg, lambda line: logger.info("%s", line), on_lost=lambda: None)
    try:
        slot.acquire(wait_s=0)
    except SlotBusy as e:
        return f"not promoted yet: {e}; the next check tries again"
    try:
        registry.promote(s.name, s.challenger, approver=approver, compared=s.champion, fence=slot.fence)
    except (SlotLost, registry.ChampionMoved) as e:
        retire(s)
        return f"v{s.challenger} not promoted ({e}): retired"
    finally:
        slot.release()
    retire(s)  # the verdict tag, and the challenger alias removed: the promoted version is the champion now
    return f"v{s.challenger} promoted to champion (was v{s.champion}), approved by {approver}"


def record(cfg: Config, s: Status) -> None:
    """An MLflow run `canary v<N>` with the decision's numbers and the per-arm curves as a plot."""
    import mlflow

    from components.training.plots import canary_curves

    with mlflow.start_run(
        run_name=f"canary v{s.challenger} vs v{s.champion}: {s.verdict}", experiment_id=tracking.serving_experiment(cfg)
    ):
        mlflow.set_tags(
            {"rlhf.kind": "canary", "verdict": s.verdict, "challenger": s.challenger, "champion": s.champion}
        )
        mlflow.log_params({"challenger_version": s.challenger, "champion_version": s.champion})
        d = s.decision
        mlflow.log_metrics(
            {
                **{f"canary/{arm}_judged": float(s.judged[arm]) for arm in s.judged},
                **{f"canary/{arm}_thumbs_up_rate": s.rate(arm) for arm in s.judged},
                **{f"canary/{arm}_answers": float(n) for arm, n in s.served.items()},
                "canary/pairs": float(d.pairs.n),
                "canary/difference": d.pairs.mean,
                "canary/log_evidence_better": d.log_wealth_better,
                "canary/log_evidence_not_worth": d.log_wealth_not_worth,
                "canary/failed_windows": float(len(s.guard.failures)),
            }
        )
        mlflow.log_text(f"{s.table()}\n\noutcome: {s.outcome}\n", "canary.md")
        if any(s.curves.values()):
            import matplotlib.pyplot as plt

            fig = canary_curves(s.curves, s.intervals)
            mlflow.log_figure(fig, "canary_curves.png")
            plt.close(fig)
        canary_run = mlflow.active_run().info
    # the retrain that produced the challenger carries the verdict too (its summary page links here)
    retrain = registry.version_tags(s.name, s.challenger).get("pipeline_run_id")
    if retrain:
        client = mlflow.MlflowClient()
        try:
            client.set_tag(retrain, "canary_verdict", s.verdict)
            client.log_text(
                retrain,
                f"# canary: {s.verdict}\n\n{s.reason}\n\n{s.outcome}\n\n[the canary run](#/experiments/"
                f"{canary_run.experiment_id}/runs/{canary_run.run_id})\n",
                "canary.md",
            )
        except Exception as e:  # the retrain's run may be gone (deleted by hand): the verdict stands
            get_run_logger().warning("the verdict could not be added to retrain run %s (%s)", retrain, e)


def announce(cfg: Config, s: Status) -> None:
    """A Prefect event for the verdict (an automation can notify on it) and the optional webhook."""
    from prefect.events import emit_event

    payload = {
        "model": s.name,
        "challenger": s.challenger,
        "champion": s.champion,
        "verdict": s.verdict,
        "reason": s.reason,
        "outcome": s.outcome,
    }
    emit_event(
        event=EVENTS[s.verdict],
        resource={"prefect.resource.id": f"rlhf.model.{s.name}", "rlhf.version": s.challenger},
        payload=payload,
    )
    if cfg.registry.canary.webhook:
        import urllib.request

        request = urllib.request.Request(
            cfg.registry.canary.webhook,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError as e:
            get_run_logger().warning("canary: the webhook was not reached (%s); the verdict stands", e)
