"""People's judgements of served answers, as MLflow assessments on the answers' traces, and back into the data.

    record_feedback(trace_id, up, rating, rater, experiment_id, data_cfg)   `rlhf feedback TRACE_ID up|down`
    feedback_rows(experiment_id, known_ids, since_ms, data_cfg)             `rlhf ingest --from-traces`

The served model records each answer as a trace (components/registry/policy_model.Tracer). A judgement is MLflow's
own feedback assessment on that trace (`mlflow.log_feedback`): name `thumbs`, value True (up) or False (down),
source HUMAN with the rater's id, and the optional rating in its metadata, so the MLflow UI shows it beside the
trace. A trace's judgements become one `feedback` row: its prompt and response, the majority label of its raters
(a tie is left out until someone breaks it), the mean rating when every rater gave one, and the trace id as the
row's id, which is how a second ingest knows the trace is already in the data.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config import DataConfig

FEEDBACK = "thumbs"  # the assessment's name
SOURCE = "traces"  # the rows' `source`


class BadFeedback(ValueError):
    """A judgement that cannot be recorded, in one sentence: what is wrong and what to do."""


@dataclass(frozen=True)
class Vote:
    rater: str
    up: bool
    rating: float | None


def check_rating(up: bool, rating: float | None, cfg: DataConfig) -> None:
    """The data suite's rule (components/data/validation.py): a rating in range, on the label's side of the middle."""
    if rating is None:
        return
    lo, hi = cfg.min_rating, cfg.max_rating
    if not lo <= rating <= hi:
        raise BadFeedback(f"rating {rating:g} is outside {lo:g}..{hi:g}: give a rating in that range, or none")
    mid = (lo + hi) / 2
    if rating != mid and (rating > mid) != up:
        side = "up" if rating > mid else "down"
        raise BadFeedback(
            f"rating {rating:g} is a thumbs {side} (the middle of {lo:g}..{hi:g} is {mid:g}) but the vote is "
            f"{'up' if up else 'down'}: make them agree"
        )


def votes_of(trace) -> list[Vote]:
    """The people's judgements on a trace (HUMAN feedback named `thumbs`), oldest first."""
    out = []
    for a in getattr(trace.info, "assessments", None) or []:
        source = getattr(a, "source", None)
        if a.name != FEEDBACK or source is None or str(source.source_type) != "HUMAN":
            continue
        value = getattr(a, "value", None)
        if value is None:
            value = getattr(getattr(a, "feedback", None), "value", None)
        rating = (a.metadata or {}).get("rating")
        out.append(Vote(source.source_id, bool(value), float(rating) if rating is not None else None))
    return out


def answer_of(trace) -> tuple[str, str] | None:
    """(prompt, response) of a served answer's trace, or None for a trace that is not one."""
    spans = trace.data.spans if trace.data else []
    root = next((s for s in spans if s.parent_id is None), None)
    if root is None or not isinstance(root.inputs, dict) or not isinstance(root.outputs, dict):
        return None
    prompt, response = root.inputs.get("prompt"), root.outputs.get("response")
    return (prompt, response) if isinstance(prompt, str) and isinstance(response, str) else None


def record_feedback(
    trace_id: str, up: bool, rating: float | None, rater: str, experiment_id: str, cfg: DataConfig
) -> str:
    """Attach a person's judgement to a served answer's trace; -> the assessment id. BadFeedback, in one sentence,
    for an unknown trace, a rating out of range or against the vote, and a rater's second vote on the trace."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    if not rater.strip():
        raise BadFeedback("the rater id is empty: pass --rater ID")
    check_rating(up, rating, cfg)
    try:
        trace = mlflow.get_trace(trace_id)
    except Exception:  # a malformed id, or a store that says so by raising
        trace = None
    if trace is None or trace.info.experiment_id != experiment_id or answer_of(trace) is None:
        raise BadFeedback(
            f"trace {trace_id!r} is not a served answer of this project: copy the trace_id of a response of "
            "`rlhf model serve`"
        )
    if any(v.rater == rater for v in votes_of(trace)):
        raise BadFeedback(f"{rater} has already judged trace {trace_id}: one vote per rater and answer")
    assessment = mlflow.log_feedback(
        trace_id=trace_id,
        name=FEEDBACK,
        value=up,
        source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=rater),
        metadata={"rating": str(rating)} if rating is not None else None,
    )
    return assessment.assessment_id


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


@dataclass
class TraceHarvest:
    rows: list[dict]  # new feedback rows, one per judged trace not in the data yet
    judged: int = 0  # traces with at least one person's vote
    known: int = 0  # of those, already in the data (skipped)
    ties: int = 0  # left out: as many ups as downs
    empty: int = 0  # left out: an empty answer (the feedback contract needs a response)
    repeats: int = 0  # left out: the same prompt and answer as an earlier judged trace (the data holds it once)


def harvest(judged: list[tuple[str, str, str, list[Vote]]], known_ids: set[str]) -> TraceHarvest:
    """Judged answers (trace id, prompt, response, votes), oldest first -> the rows the data does not hold yet, and
    what was left out and why. Pure: the part of `feedback_rows` that decides."""
    out = TraceHarvest([])
    seen: set[tuple[str, str]] = set()
    for trace_id, prompt, response, votes in judged:
        out.judged += 1
        key = (" ".join(prompt.lower().split()), " ".join(response.lower().split()))  # as the data suite compares
        if trace_id in known_ids:
            out.known += 1
        elif not response.strip():
            out.empty += 1
        elif key in seen:
            out.repeats += 1
        elif (row := row_of(trace_id, prompt, response, votes)) is None:
            out.ties += 1
        else:
            out.rows.append(row)
        seen.add(key)
    return out


def feedback_rows(experiment_id: str, known_ids: set[str], since_ms: int | None = None) -> TraceHarvest:
    """The judged served answers of the experiment (since `since_ms`) that the data does not hold yet."""
    import mlflow

    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string=f"trace.timestamp_ms > {since_ms}" if since_ms is not None else None,
        return_type="list",
        order_by=["timestamp_ms ASC"],
    )
    judged = []
    for trace in traces:
        votes, answer = votes_of(trace), answer_of(trace)
        if votes and answer is not None:
            judged.append((trace.info.trace_id, *answer, votes))
    return harvest(judged, known_ids)
