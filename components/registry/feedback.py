"""People's judgements of served answers, as MLflow assessments on the answers' traces, and back into the data.

    POST /feedback on the served app (service/feedback_api.py)     a rater's vote, written and signed by the app
    harvest(judged, ...)                                            `rlhf ingest --from-traces`: what becomes rows
    scan(experiment_id, keys, ...)                                  the judged answers in MLflow, page by page

The served model records each answer as a trace and signs it (components/registry/policy_model.Tracer); the served
app records each judgement as MLflow's own feedback assessment on that trace (name `thumbs`, value True (up) or
False (down), source HUMAN with the rater's id, the optional rating in its metadata) and signs it too
(components/registry/provenance.py). Only what verifies counts: an answer whose signature verifies, and per rater
their latest signed vote whose value is a boolean and rating a number, not overridden as invalid. Anything else is
skipped and counted by reason, never a crash. A trace's counted votes become one `feedback` row: its prompt and
response, the majority label (a tie is left out until someone breaks it), the mean rating when every rater gave one,
and the trace id as the row's id, which is how a later ingest knows the trace is in the data.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from components.config import DataConfig
from components.registry import provenance

FEEDBACK = "thumbs"  # the assessment's name
SOURCE = "traces"  # the rows' `source`
SIGNATURE = "rlhf.signature"  # an answer's root-span attribute; a vote's metadata key
AT_MS = "rlhf.at_ms"  # a vote's metadata: when the app recorded it (the latest vote of a rater wins)
DAY_MS = 86_400_000


class BadFeedback(ValueError):
    """A judgement that cannot be recorded, in one sentence: what is wrong and what to do."""


@dataclass(frozen=True)
class Vote:
    rater: str
    up: bool
    rating: float | None
    at_ms: int = 0


def check_rating_range(up: bool, rating: float | None, lo: float, hi: float) -> None:
    """The data suite's rule (components/data/validation.py): a rating in lo..hi, on the label's side of the middle."""
    if rating is None:
        return
    if not lo <= rating <= hi:
        raise BadFeedback(f"rating {rating:g} is outside {lo:g}..{hi:g}: give a rating in that range, or none")
    mid = (lo + hi) / 2
    if rating != mid and (rating > mid) != up:
        side = "up" if rating > mid else "down"
        raise BadFeedback(
            f"rating {rating:g} is a thumbs {side} (the middle of {lo:g}..{hi:g} is {mid:g}) but the vote is "
            f"{'up' if up else 'down'}: make them agree"
        )


def check_rating(up: bool, rating: float | None, cfg: DataConfig) -> None:
    check_rating_range(up, rating, cfg.min_rating, cfg.max_rating)


# ---------------------------------------------------------------------------------------------- one trace
def _root(trace) -> Any:
    spans = trace.data.spans if trace.data else []
    return next((s for s in spans if s.parent_id is None), None)


def answer_of(trace) -> tuple[str, str] | None:
    """(prompt, response) of a served answer's trace, or None for a trace that is not shaped like one."""
    root = _root(trace)
    if root is None or not isinstance(root.inputs, dict) or not isinstance(root.outputs, dict):
        return None
    prompt, response = root.inputs.get("prompt"), root.outputs.get("response")
    return (prompt, response) if isinstance(prompt, str) and isinstance(response, str) else None


def answer_status(trace, keys: dict[str, bytes]) -> str:
    """provenance.OK when the trace is an answer the serving process signed, else why not (UNSIGNED, UNKNOWN_KEY,
    BAD, or "not an answer")."""
    answer = answer_of(trace)
    if answer is None:
        return "not an answer"
    root = _root(trace)
    attrs = root.attributes or {}
    version = attrs.get("rlhf.version", (trace.info.tags or {}).get("rlhf.version", ""))  # the span's: not mutable
    fields = provenance.answer_fields(trace.info.trace_id, *answer, version, root.inputs.get("params"))
    return provenance.verify(keys, provenance.ANSWER, fields, attrs.get(SIGNATURE))


def votes_of(trace, keys: dict[str, bytes], skipped: Counter | None = None) -> list[Vote]:
    """The counted judgements on a trace, one per rater (their latest signed vote), oldest first; what is left out
    is counted in `skipped` by reason: not signed (before signing), a bad signature, invalid (overridden), a value
    that is not a boolean, a rating that is not a number, a rater's earlier vote."""
    skipped = skipped if skipped is not None else Counter()
    latest: dict[str, Vote] = {}
    for a in getattr(trace.info, "assessments", None) or []:
        source = getattr(a, "source", None)
        if a.name != FEEDBACK or source is None or str(source.source_type) != "HUMAN":
            continue
        if getattr(a, "valid", True) is False:
            skipped["overridden (valid=False)"] += 1
            continue
        value = getattr(getattr(a, "feedback", None), "value", None)
        meta = a.metadata or {}
        if not isinstance(value, bool):
            skipped["value not a boolean"] += 1
            continue
        try:
            rating = None if meta.get("rating") is None else float(meta["rating"])
            at_ms = int(meta.get(AT_MS, ""))
        except (TypeError, ValueError):
            skipped["rating not a number" if meta.get("rating") is not None else "unsigned (before signing)"] += 1
            continue
        if rating is not None and rating != rating:  # NaN
            skipped["rating not a number"] += 1
            continue
        rater = str(source.source_id)
        fields = provenance.vote_fields(trace.info.trace_id, rater, value, rating, at_ms)
        status = provenance.verify(keys, provenance.VOTE, fields, meta.get(SIGNATURE))
        if status != provenance.OK:
            skipped["unsigned (before signing)" if status == provenance.UNSIGNED else f"vote: {status}"] += 1
            continue
        vote = Vote(rater, value, rating, at_ms)
        if rater in latest:
            skipped["a rater's earlier vote (the latest counts)"] += 1
            if latest[rater].at_ms > at_ms:
                continue
        latest[rater] = vote
    return sorted(latest.values(), key=lambda v: v.at_ms)


def row_of(trace_id: str, prompt: str, response: str, votes: list[Vote]) -> dict | None:
    """One `feedback` row from a trace's votes: the majority label, the mean rating when every vote has one;
    None for a tie. [up 4, up 5, down 2] -> label 1, rating 3.67."""
    ups = sum(v.up for v in votes)
    if not votes or 2 * ups == len(votes):
        return None
    row: dict = {"id": trace_id, "prompt": prompt, "response": response, "label": int(2 * ups > len(votes))}
    ratings = [v.rating for v in votes]
    if all(r is not None for r in ratings):
        row["rating"] = round(sum(r for r in ratings if r is not None) / len(ratings), 4)
    row["source"] = SOURCE
    return row


# ---------------------------------------------------------------------------------------------- a harvest
@dataclass(frozen=True)
class Judged:
    """A signed answer with its counted votes."""

    trace_id: str
    prompt: str
    response: str
    votes: list[Vote]
    served_ms: int = 0
    version: str = ""  # the version that answered, as signed (the root span's attribute)


@dataclass(frozen=True)
class Limits:
    """What one rater may put into the data (registry.feedback)."""

    votes_per_rater_per_day: int = 200  # votes that reach the data per rater per UTC day (of the ingest)
    max_rater_share: float = 0.5  # of one batch's rows, with at least min_raters raters in it
    min_raters: int = 3
    max_prompt_chars: int = 2000  # the data contract's (data.max_prompt_chars)


@dataclass
class TraceHarvest:
    rows: list[dict]  # new feedback rows, one per judged trace not in the data yet
    judged: int = 0  # signed answers with at least one counted vote
    known: int = 0  # of those, already in the data or refused by an earlier ingest (skipped)
    ties: int = 0  # left out: as many ups as downs
    empty: int = 0  # left out: an empty answer (the feedback contract needs a response)
    repeats: int = 0  # pooled: the same prompt and answer as an earlier judged trace (one row, their votes together)
    eval_prompts: int = 0  # left out: an answer to a frozen eval prompt (never training data)
    too_long: int = 0  # left out: a prompt over the data contract's max_prompt_chars
    deferred: list[str] = field(default_factory=list)  # over a rater's limit: a later harvest takes them
    unsigned: Counter = field(default_factory=Counter)  # answers that do not verify, by reason
    skipped_votes: Counter = field(default_factory=Counter)  # votes that do not count, by reason
    contributors: Counter = field(default_factory=Counter)  # rater -> rows they voted on in this batch
    ingested_today: dict[str, int] = field(default_factory=dict)  # rater -> votes landed today, this batch included
    raters: dict[str, list[str]] = field(default_factory=dict)  # row id -> the raters whose votes made it


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _pooled(same: list[Judged]) -> list[Vote]:
    """The votes on one answer served several times: each rater's latest."""
    latest: dict[str, Vote] = {}
    for vote in sorted((v for j in same for v in j.votes), key=lambda v: v.at_ms):
        latest[vote.rater] = vote
    return list(latest.values())


def harvest(
    judged: list[Judged],
    known_ids: set[str],
    eval_prompts: set[str] = frozenset(),  # type: ignore[assignment]
    limits: Limits = Limits(),
    ingested_today: dict[str, int] | None = None,
) -> TraceHarvest:
    """Judged answers, oldest first -> the rows the data does not hold yet, what was left out and why, and what was
    deferred by the limits. Pure: the part of `rlhf ingest --from-traces` that decides.

    Limits, in this order: a rater's votes landing per day (`ingested_today`: what earlier batches landed today), then,
    when the batch has at least `min_raters` raters, no rater's share of its rows above `max_rater_share` (their
    newest rows are deferred first). A deferred row is not dropped: it is not marked as ingested, so a later harvest
    takes it."""
    out = TraceHarvest([])
    evals = {_norm(p) for p in eval_prompts}
    groups: dict[tuple[str, str], list[Judged]] = {}
    for j in judged:  # the same prompt and answer served twice is one row: its votes pooled (as the suite compares)
        groups.setdefault((_norm(j.prompt), _norm(j.response)), []).append(j)
    candidates: list[tuple[Judged, list[Vote]]] = []
    for (prompt_key, _), same in groups.items():
        first = same[0]
        out.judged += len(same)
        out.repeats += len(same) - 1
        if any(j.trace_id in known_ids for j in same):
            out.known += 1
        elif not first.response.strip():
            out.empty += 1
        elif prompt_key in evals:
            out.eval_prompts += 1
        elif len(first.prompt) > limits.max_prompt_chars:
            out.too_long += 1
        elif row_of(first.trace_id, first.prompt, first.response, votes := _pooled(same)) is None:
            out.ties += 1
        else:
            candidates.append((first, votes))
    # a rater's votes per day: a row keeps its other raters' votes; one with no other rater waits for a later day
    today = dict(ingested_today or {})
    kept: list[tuple[Judged, list[Vote]]] = []
    for first, votes in candidates:
        within = [v for v in votes if today.get(v.rater, 0) < limits.votes_per_rater_per_day]
        if len(within) < len(votes) and not _decided(within):
            out.deferred.append(first.trace_id)
            continue
        out.skipped_votes["over a rater's daily limit (the row landed on the others' votes)"] += len(votes) - len(
            within
        )
        for v in within:
            today[v.rater] = today.get(v.rater, 0) + 1
        kept.append((first, within))
    # a rater's share of the batch: the rater furthest over loses their newest votes (a row with no other rater, or
    # one the others leave tied, waits for a later harvest) until no rater is over
    while True:
        counts = Counter(v.rater for _, votes in kept for v in votes)
        if len(counts) < limits.min_raters or not kept:
            break
        cap = max(1, math.ceil(limits.max_rater_share * len(kept)))
        over = [r for r, c in counts.most_common() if c > cap]
        if not over:
            break
        i = max(i for i, (_, votes) in enumerate(kept) if any(v.rater == over[0] for v in votes))
        first, votes = kept[i]
        others = [v for v in votes if v.rater != over[0]]
        today[over[0]] -= 1
        if _decided(others):
            kept[i] = (first, others)
            out.skipped_votes["over a rater's share of the batch (the row landed on the others' votes)"] += 1
        else:
            kept.pop(i)
            out.deferred.append(first.trace_id)
            for v in others:
                today[v.rater] -= 1
    out.rows = [row_of(j.trace_id, j.prompt, j.response, votes) for j, votes in kept]  # type: ignore[misc]
    out.raters = {j.trace_id: sorted(v.rater for v in votes) for j, votes in kept}
    out.contributors = Counter(v.rater for _, votes in kept for v in votes)
    out.ingested_today = today
    return out


def canary_votes(
    judged: list[Judged], limits: Limits, arm_of: Callable[[Judged], str | None] = lambda j: None
) -> tuple[list[Judged], Counter]:
    """The votes a canary counts, under the same Limits as the harvest: judged answers in, the same answers with only
    their counted votes out (answers left with none dropped), and the votes left out by reason. Pure.

    Votes are taken in the order they were cast. A vote counts while its rater
    - has fewer than `votes_per_rater_per_day` counted votes that UTC day, and
    - would hold at most `max_rater_share` of its arm's counted votes with it (`arm_of`; rounded up; a rater's first
      vote counts),
    so one rater, or a few, cannot carry an arm. Each vote is decided once, on what came before it: a later vote
    never changes an earlier one's, and the stream the sequential test reads only grows."""
    order = sorted(((v.at_ms, i, k) for i, j in enumerate(judged) for k, v in enumerate(j.votes)))
    counted: dict[int, list[Vote]] = {}
    per_day: Counter = Counter()
    per_rater: Counter = Counter()  # (arm, rater) -> counted votes
    total: Counter = Counter()  # arm -> counted votes
    skipped: Counter = Counter()
    for at_ms, i, k in order:
        vote = judged[i].votes[k]
        day, arm = (vote.rater, at_ms // 86_400_000), arm_of(judged[i])
        if per_day[day] >= limits.votes_per_rater_per_day:
            skipped["over a rater's daily limit (registry.feedback.votes_per_rater_per_day)"] += 1
            continue
        mine = per_rater[arm, vote.rater]
        if mine and mine + 1 > math.ceil(limits.max_rater_share * (total[arm] + 1)):
            skipped["over a rater's share of the canary's votes (registry.feedback.max_rater_share)"] += 1
            continue
        per_day[day] += 1
        per_rater[arm, vote.rater] += 1
        total[arm] += 1
        counted.setdefault(i, []).append(vote)
    kept = [replace(j, votes=counted[i]) for i, j in enumerate(judged) if i in counted]
    return kept, skipped


def _decided(votes: list[Vote]) -> bool:
    return bool(votes) and 2 * sum(v.up for v in votes) != len(votes)


def scan(
    experiment_id: str | list[str],
    keys: dict[str, bytes],
    since_ms: int,
    page_size: int = 500,
    extra_ids: list[str] = (),  # type: ignore[assignment]
    revoked: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[Judged], Counter, Counter]:
    """The signed, judged answers of the experiment(s) served after `since_ms` (and the traces `extra_ids`, deferred
    earlier), oldest first, read `page_size` traces at a time: only judged traces are read (MLflow's assessment
    filter), and only their counted votes are kept, so memory grows with the judged answers, not with traffic.
    -> (judged, answers left out by reason, votes left out by reason)."""
    import mlflow

    client = mlflow.MlflowClient()
    ids = [experiment_id] if isinstance(experiment_id, str) else list(experiment_id)
    unsigned: Counter = Counter()
    skipped: Counter = Counter()
    judged: dict[str, Judged] = {}

    def take(trace) -> None:
        try:
            judge(trace)
        except Exception as e:  # whatever a stored trace holds, it never stops the harvest: counted, skipped
            unsigned[f"unreadable ({type(e).__name__})"] += 1

    def judge(trace) -> None:
        status = answer_status(trace, keys)
        if status != provenance.OK:
            if any(a.name == FEEDBACK for a in getattr(trace.info, "assessments", None) or []):
                unsigned["unsigned (before signing)" if status == provenance.UNSIGNED else status] += 1
            return
        counted = votes_of(trace, keys, skipped)
        votes = [v for v in counted if v.rater not in revoked]
        if len(votes) < len(counted):
            skipped["a revoked rater's vote"] += len(counted) - len(votes)
        if votes:
            prompt, response = answer_of(trace)  # type: ignore[misc]
            version = str((_root(trace).attributes or {}).get("rlhf.version", ""))
            judged[trace.info.trace_id] = Judged(
                trace.info.trace_id, prompt, response, votes, trace.info.timestamp_ms, version
            )

    token = None
    while True:
        page = client.search_traces(
            locations=ids,
            filter_string=(  # not after now: a trace dated in the future is no answer of this server
                f"feedback.{FEEDBACK} IS NOT NULL AND trace.timestamp_ms > {int(since_ms)} "
                f"AND trace.timestamp_ms <= {int(time.time() * 1000) + 60_000}"
            ),
            max_results=page_size,
            order_by=["timestamp_ms ASC"],
            page_token=token,
        )
        for trace in page:
            take(trace)
        token = page.token
        if not token:
            break
    for trace_id in extra_ids:
        if trace_id not in judged:
            try:
                trace = mlflow.get_trace(trace_id)
            except Exception:
                trace = None
            if trace is not None and trace.info.experiment_id in ids:
                take(trace)
    return sorted(judged.values(), key=lambda j: j.served_ms), unsigned, skipped


def day_of(ms: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime((ms if ms is not None else time.time() * 1000) / 1000))
