"""What a canary's arms did, read from MLflow: the served answers of each version since the canary started, and the
users' trusted votes on them (issue 41). The decision is components/evaluation/sequential.py's, the guardrails
components/evaluation/guardrails.py's; acting on them is flows/canary.py's.

Only what the loop trusts counts (components/registry/feedback.scan): answers the serving process signed, and per
answer the latest signed vote of each rater who is not revoked. An answer's arm comes from its signed version, never
from a tag (tags can be changed through the API). An answer with several raters counts once, by its majority (a tie
is left out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from components.evaluation.guardrails import Answer
from components.registry import provenance
from components.registry.feedback import Limits, answer_of, answer_status, canary_votes, scan

STARTED = "canary_started_ms"  # the challenger version's tag: when its canary started
VERDICT = "canary_verdict"  # the challenger version's tag once decided: promote | retire | guardrail | superseded
PHASE = "canary_phase"  # shadow (answers every prompt, unseen) | traffic (its share of users)
QUEUED = "canary_queued_ms"  # a candidate that passed the gate while another canary ran: when it was queued


def start(registered_name: str, version: str, shadow_first: bool) -> None:
    """Make `version` the challenger: its start time and phase as tags first, then the alias (a serving process that
    sees the alias finds the tags)."""
    import mlflow

    from components.registry.registry import CHALLENGER, tag_version

    tags = {STARTED: str(int(time.time() * 1000)), PHASE: "shadow" if shadow_first else "traffic"}
    tag_version(registered_name, version, tags)
    mlflow.MlflowClient().set_registered_model_alias(registered_name, CHALLENGER, version)


def queued(registered_name: str) -> list[str]:
    """The versions waiting for a canary, oldest first (queued and not decided)."""
    import mlflow

    found = mlflow.MlflowClient().search_model_versions(f"name = '{registered_name}'")
    waiting = [v for v in found if QUEUED in (v.tags or {}) and VERDICT not in (v.tags or {})]
    return [str(v.version) for v in sorted(waiting, key=lambda v: int(v.version))]


@dataclass
class Arms:
    """A canary's two versions and when it started."""

    champion: str
    challenger: str
    started_ms: int

    def arm_of(self, version: str) -> str | None:
        return {self.champion: "champion", self.challenger: "challenger"}.get(version)


@dataclass
class Observed:
    votes: list[tuple[str, bool, int]] = field(default_factory=list)  # (arm, thumbs up, served ms), oldest first
    served: dict[str, list[tuple[int, Answer]]] = field(default_factory=dict)  # arm -> (served ms, answer)
    skipped: dict[str, int] = field(default_factory=dict)  # votes and answers left out, by reason


def started_ms(registered_name: str, version: str) -> int:
    """When `version`'s canary started: its tag, else when the version was registered."""
    import mlflow

    v = mlflow.MlflowClient().get_model_version(registered_name, version)
    try:
        return int(v.tags.get(STARTED, ""))
    except ValueError:
        return int(v.creation_timestamp)


def votes(arms: Arms, experiment_id: str, keys: dict[str, bytes], revoked: set[str], limits: Limits) -> Observed:
    """The trusted judged answers of both arms since the canary started, one vote each (the majority of its counted
    raters' votes: feedback.canary_votes applies the per-rater limits)."""
    judged, unsigned, skipped = scan(experiment_id, keys, arms.started_ms, revoked=revoked)
    judged, over = canary_votes(judged, limits, lambda j: arms.arm_of(j.version))
    out = Observed(skipped={**unsigned, **skipped, **over})
    for j in judged:
        arm = arms.arm_of(j.version)
        ups = sum(v.up for v in j.votes)
        if arm is None or 2 * ups == len(j.votes):
            continue
        out.votes.append((arm, 2 * ups > len(j.votes), j.served_ms))
    return out


def served(arms: Arms, experiment_id: str, keys: dict[str, bytes], page_size: int = 500) -> dict[str, list]:
    """Every signed answer of both arms since the canary started, oldest first: arm -> [(served ms, Answer)] (shadow
    answers count as the challenger's)."""
    import mlflow

    client = mlflow.MlflowClient()
    out: dict[str, list[tuple[int, Answer]]] = {"champion": [], "challenger": []}
    token = None
    while True:
        page = client.search_traces(
            locations=[experiment_id],
            filter_string=(
                f"trace.timestamp_ms > {arms.started_ms} AND trace.timestamp_ms <= {int(time.time() * 1000) + 60_000}"
            ),
            max_results=page_size,
            order_by=["timestamp_ms ASC"],
            page_token=token,
        )
        for trace in page:
            try:
                if answer_status(trace, keys) != provenance.OK:
                    continue
                root = next(s for s in trace.data.spans if s.parent_id is None)
                arm = arms.arm_of(str((root.attributes or {}).get("rlhf.version", "")))
                answer = answer_of(trace)
                if arm is None or answer is None:
                    continue
                latency = float((root.attributes or {}).get("latency_ms", 0.0))
                failed = isinstance(root.outputs, dict) and "error" in root.outputs  # service/serving.failure
                out[arm].append((trace.info.timestamp_ms, Answer(answer[1], latency, failed=failed, prompt=answer[0])))
            except Exception:  # whatever a stored trace holds, it never stops the reading: skipped
                continue
        token = page.token
        if not token:
            break
    return out


_SCORERS: dict[tuple[str, str], object] = {}


def champion_scorer(registered_name: str, version: str):
    """The reward model bundled with `version` (its pyfunc's RewardScorer: components/registry/policy_model.py), or
    None when it was registered without one or cannot be loaded; loaded once per process."""
    key = (registered_name, version)
    if key not in _SCORERS:
        import mlflow

        try:
            model = mlflow.pyfunc.load_model(f"models:/{registered_name}/{version}")
            _SCORERS[key] = getattr(model.unwrap_python_model(), "scorer", None)
        except Exception:
            _SCORERS[key] = None
    return _SCORERS[key]


def scored(scorer, answers: list[Answer], batch: int = 16) -> list[Answer]:
    """The answers with `reward` from the champion's reward model (failed answers are left as they are)."""
    from dataclasses import replace

    ok = [i for i, a in enumerate(answers) if not a.failed]
    out = list(answers)
    for start in range(0, len(ok), batch):
        idx = ok[start : start + batch]
        rewards = scorer.scores([answers[i].prompt for i in idx], [answers[i].response for i in idx])
        for i, r in zip(idx, rewards, strict=True):
            out[i] = replace(answers[i], reward=float(r))
    return out
