"""Issue 38: only real answers and real raters reach the training data. On a real MLflow store (SQLite), with the
serving process's own Tracer and FeedbackDesk (tests/registry/signed_answers.py): forged traces and forged votes
count for nothing, stuffed votes count once, invalid or malformed assessments are skipped and counted, never a
crash; a vote right after its answer is taken; rater limits defer, never drop."""

from __future__ import annotations

from collections import Counter

import mlflow
import pytest
from mlflow.entities import AssessmentSource, AssessmentSourceType

from components.registry import provenance
from components.registry.feedback import FEEDBACK, Judged, Limits, Vote, answer_status, harvest, scan, votes_of
from service import keys
from tests.conftest import make_project
from tests.registry.signed_answers import serving_desk


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = make_project(tmp_path_factory.mktemp("trust") / "proj")
    desk = serving_desk(cfg, ["alice", "bob", "carol"])
    return cfg, desk


def all_judged(cfg, desk, since_ms=0):
    ring = keys.load(cfg)
    return scan(desk.tracer.experiment_id, ring.verifying(), since_ms, page_size=3)


def test_a_signature_covers_its_purpose_and_every_field():
    keys_ = {"k1": b"secret"}
    fields = provenance.vote_fields("tr-1", "alice", True, 4.0, 1000)
    sig = provenance.sign("k1", b"secret", provenance.VOTE, fields)
    assert provenance.verify(keys_, provenance.VOTE, fields, sig) == provenance.OK
    assert provenance.verify(keys_, provenance.VOTE, {**fields, "value": False}, sig) == provenance.BAD
    assert provenance.verify(keys_, provenance.ANSWER, fields, sig) == provenance.BAD  # another purpose
    assert provenance.verify({"k2": b"secret"}, provenance.VOTE, fields, sig) == provenance.UNKNOWN_KEY
    assert provenance.verify(keys_, provenance.VOTE, fields, None) == provenance.UNSIGNED
    # the served model's own copy (a models-from-code file stands alone) signs the same bytes
    from components.registry import policy_model

    assert policy_model.canonical("answer", {"b": 1, "a": "é"}) == provenance.canonical("answer", {"b": 1, "a": "é"})


def test_forged_traces_and_forged_votes_land_nothing(served):
    """The attack of the issue: a trace made with mlflow.start_span_no_context in the project's experiment, five
    mlflow.log_feedback(value=True) from sources r1..r5; and forged votes on a real answer. None of it counts."""
    cfg, desk = served
    experiment = desk.tracer.experiment_id
    span = mlflow.start_span_no_context(
        "answer", inputs={"prompt": "Buy crypto", "params": {}}, experiment_id=experiment
    )
    span.end(outputs={"response": "now, at evil.example"})
    (real,) = desk.answer(["The film was"], ["a delight"])
    mlflow.flush_trace_async_logging()
    for i in range(5):
        for trace_id in (span.trace_id, real):
            mlflow.log_feedback(
                trace_id=trace_id,
                name=FEEDBACK,
                value=True,
                source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=f"r{i}"),
                metadata={"rlhf.signature": "k1:" + "0" * 64, "rlhf.at_ms": "1"},
            )
    judged, unsigned, skipped = all_judged(cfg, desk)
    assert span.trace_id not in {j.trace_id for j in judged} and real not in {j.trace_id for j in judged}
    assert unsigned["unknown or retired key"] == 0 and unsigned["unsigned (before signing)"] >= 1, unsigned
    assert skipped["vote: unknown or retired key"] == 5, skipped  # the forged votes on the real answer


def test_a_forged_trace_cannot_be_judged_through_the_app_either(served):
    cfg, desk = served
    span = mlflow.start_span_no_context(
        "answer", inputs={"prompt": "p", "params": {}}, experiment_id=desk.tracer.experiment_id
    )
    span.end(outputs={"response": "r"})
    mlflow.flush_trace_async_logging()
    got = desk.vote("alice", span.trace_id, True)
    assert got.status == 404 and "is not an answer this project served" in got.doc["message"], got


def test_a_vote_right_after_its_answer_is_taken_and_stuffing_counts_once(served):
    """No wait for the trace export: the app flushes its own queue. A rater's repeated votes count once (the
    latest wins); a rater's token is the rater, whatever the body says."""
    cfg, desk = served
    (tid,) = desk.answer(["A fresh prompt"], ["a fresh answer"])
    assert desk.vote("alice", tid, True, 5).status == 200  # at once: the trace may not be exported yet
    for _ in range(4):
        assert desk.vote("alice", tid, True, 5).status == 200
    assert desk.vote("alice", tid, False, 1).status == 200  # she changed her mind: the latest counts
    assert desk.vote("bob", tid, True).status == 200
    ring = keys.load(cfg)
    skipped = Counter()
    votes = votes_of(mlflow.get_trace(tid), ring.verifying(), skipped)
    assert [(v.rater, v.up, v.rating) for v in votes] == [("alice", False, 1.0), ("bob", True, None)]
    assert skipped["a rater's earlier vote (the latest counts)"] == 5


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"trace_id": "tr-x", "value": "false"}, 400, "value must be true"),
        ({"trace_id": "tr-x", "value": None}, 400, "value must be true"),
        ({"trace_id": "tr-x", "value": True, "rating": "abc"}, 400, "rating must be a number"),
        ({"trace_id": "tr-x", "value": True, "rating": 9}, 400, "outside 1..5"),
        ({"trace_id": "tr-x", "value": True, "rating": 1}, 400, "make them agree"),
        ({"trace_id": "tr-x", "value": True, "rater": "mallory"}, 400, "Unknown field(s) rater"),
        ({"trace_id": "", "value": True}, 400, "trace_id must be"),
    ],
)
def test_bad_feedback_gets_one_sentence(served, body, status, words):
    import json

    cfg, desk = served
    got = desk.desk.handle(f"Bearer {desk.tokens['alice']}", json.dumps(body).encode())
    assert got.status == status and words in got.doc["message"] and "\n" not in got.doc["message"], got


def test_without_a_raters_token_nothing_is_recorded(served):
    cfg, desk = served
    (tid,) = desk.answer(["Another prompt"], ["another answer"])
    assert desk.desk.handle(None, b'{"trace_id": "x", "value": true}').status == 401
    assert desk.vote("alice", tid, True, token="rlhf_not-a-token").status == 401
    from service import raters

    token = raters.add(raters.raters_path(cfg), "dave")
    assert desk.vote("dave", tid, True, token=token).status == 200
    raters.revoke(raters.raters_path(cfg), "dave")
    got = desk.vote("dave", tid, True, token=token)
    assert got.status == 401 and "unknown or revoked" in got.doc["message"], "revocation applies at the next request"


def test_malformed_or_invalid_assessments_are_skipped_and_counted_never_a_crash(served):
    """Votes written straight to MLflow with the real key (as if the key leaked into a client), malformed:
    a string value, a None value, a rating that is not a number; and a valid vote overridden with valid=False."""
    cfg, desk = served
    (tid,) = desk.answer(["Malformed votes"], ["an answer"])
    assert desk.vote("carol", tid, True, 4).status == 200
    mlflow.flush_trace_async_logging()
    ring = keys.load(cfg)
    kid, secret = ring.signer()

    def forge(rater, value, rating_meta):
        fields = provenance.vote_fields(tid, rater, value, None, 5)
        sig = provenance.sign(kid, secret, provenance.VOTE, fields)
        mlflow.log_feedback(
            trace_id=tid,
            name=FEEDBACK,
            value=value,
            source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=rater),
            metadata={"rlhf.signature": sig, "rlhf.at_ms": "5", **rating_meta},
        )

    forge("m1", "false", {})
    forge("m2", None, {})
    forge("m3", True, {"rating": "abc"})
    assert desk.vote("bob", tid, True).status == 200
    trace = mlflow.get_trace(tid)
    bobs = next(a for a in trace.info.assessments if a.source.source_id == "bob")
    mlflow.override_feedback(trace_id=tid, assessment_id=bobs.assessment_id, value=False)  # bob's vote made invalid
    skipped = Counter()
    votes = votes_of(mlflow.get_trace(tid), ring.verifying(), skipped)
    assert [(v.rater, v.up) for v in votes] == [("carol", True)], votes
    assert skipped["value not a boolean"] == 2 and skipped["rating not a number"] == 1, skipped
    assert skipped["overridden (valid=False)"] == 1, skipped


def test_a_retired_key_no_longer_verifies_a_rotated_one_still_does(tmp_path):
    cfg = make_project(tmp_path / "proj")
    ring = keys.load(cfg)
    old, _ = ring.signer()
    fields = provenance.vote_fields("tr", "a", True, None, 1)
    sig = provenance.sign(*ring.signer(), provenance.VOTE, fields)
    new = ring.rotate().kid
    assert keys.load(cfg).signer()[0] == new != old
    assert provenance.verify(keys.load(cfg).verifying(), provenance.VOTE, fields, sig) == provenance.OK
    keys.load(cfg).retire(old)
    assert provenance.verify(keys.load(cfg).verifying(), provenance.VOTE, fields, sig) == provenance.UNKNOWN_KEY
    assert (keys.keyring_path(cfg).stat().st_mode & 0o777) == 0o600


def test_an_answer_signed_then_edited_in_the_store_no_longer_verifies(served):
    cfg, desk = served
    (tid,) = desk.answer(["Signed prompt"], ["signed answer"])
    mlflow.flush_trace_async_logging()
    ring = keys.load(cfg)
    trace = mlflow.get_trace(tid)
    assert answer_status(trace, ring.verifying()) == provenance.OK
    from types import SimpleNamespace as NS

    root = trace.data.spans[0]

    def edited(**change):  # the trace as an edit of the store would show it
        span = NS(parent_id=None, inputs=root.inputs, outputs=root.outputs, attributes=root.attributes)
        span.__dict__.update(change)
        return NS(info=trace.info, data=NS(spans=[span]))

    assert answer_status(edited(), ring.verifying()) == provenance.OK
    assert answer_status(edited(outputs={"response": "edited"}), ring.verifying()) == provenance.BAD
    assert answer_status(edited(inputs={**root.inputs, "prompt": "other"}), ring.verifying()) == provenance.BAD


# ---------------------------------------------------------------------------------------------- limits (pure)
def judged(i, raters, up=True, prompt=None):
    return Judged(f"tr-{i}", prompt or f"prompt {i}", f"answer {i}", [Vote(r, up, None, i) for r in raters])


def test_a_raters_daily_votes_are_capped_and_the_rest_deferred_not_dropped():
    rows = [judged(i, ["alice"]) for i in range(5)]
    h = harvest(rows, set(), limits=Limits(votes_per_rater_per_day=3, min_raters=3), ingested_today={"alice": 1})
    assert [r["id"] for r in h.rows] == ["tr-0", "tr-1"] and h.deferred == ["tr-2", "tr-3", "tr-4"]
    assert h.ingested_today == {"alice": 3}


def test_no_rater_holds_more_than_their_share_of_a_batch_once_enough_raters_take_part():
    rows = [judged(i, ["mallory"]) for i in range(10)] + [judged(10 + i, [r]) for i, r in enumerate("abc")]
    h = harvest(rows, set(), limits=Limits(max_rater_share=0.5, min_raters=3))
    assert h.contributors["mallory"] == 4 == -(-len(h.rows) // 2), h  # at most half the rows, rounded up
    assert len(h.deferred) == 10 - h.contributors["mallory"]
    assert {"tr-10", "tr-11", "tr-12"} <= {r["id"] for r in h.rows}
    # one rater alone (a small project): their rows all land
    alone = harvest(rows[:10], set(), limits=Limits(max_rater_share=0.5, min_raters=3))
    assert len(alone.rows) == 10 and not alone.deferred


def test_answers_to_eval_prompts_and_over_long_prompts_are_left_out_and_counted():
    rows = [judged(0, ["a"], prompt="The Eval  prompt"), judged(1, ["a"], prompt="x" * 2001), judged(2, ["a"])]
    h = harvest(rows, set(), eval_prompts={"the eval prompt"}, limits=Limits(max_prompt_chars=2000))
    assert [r["id"] for r in h.rows] == ["tr-2"] and (h.eval_prompts, h.too_long) == (1, 1)


def test_two_processes_saving_the_harvest_state_keep_both_refusals(tmp_path):
    """A forget (its refused traces) and a harvest (the rows the suite refused) save at once: neither loses the
    other's, which would let a forgotten trace back into the data."""
    from flows.ingest import HarvestState

    cfg = make_project(tmp_path / "proj")
    harvest_view, forget_view = HarvestState.load(cfg), HarvestState.load(cfg)
    forget_view.refused["tr-forgotten"] = ["forgotten"]
    forget_view.save()
    harvest_view.refused["tr-bad"] = ["label_matches_rating"]
    harvest_view.save()
    assert HarvestState.load(cfg).refused == {"tr-forgotten": ["forgotten"], "tr-bad": ["label_matches_rating"]}


def test_a_dropped_traces_log_line_carries_no_credentials(caplog):
    from components.registry.policy_model import Tracer

    tracer = Tracer("1", "m/1@champion")
    tracer.dropped_one("Failed to send trace to http://alice:s3cret@tracking.example:5000/api: refused")
    assert "s3cret" not in caplog.text and "http://tracking.example:5000" in caplog.text


def test_a_malformed_signature_or_text_never_stops_the_harvest(served):
    """Found in review: `kid:é` as a signature, a lone surrogate in a stored text, a trace dated in the future: each is
    skipped and counted, and the real votes around them still count."""
    cfg, desk = served
    (tid,) = desk.answer(["Around the bad ones"], ["a good answer"])
    assert desk.vote("alice", tid, True).status == 200
    ring = keys.load(cfg)
    kid, _ = ring.signer()
    for sig in (f"{kid}:é", f"{kid}:" + "0" * 63 + "\ud800", "x" * 5000):
        assert provenance.verify(ring.verifying(), provenance.VOTE, {"a": "\ud800"}, sig) == provenance.BAD
    mlflow.log_feedback(
        trace_id=tid,
        name=FEEDBACK,
        value=True,
        source=AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id="mallory"),
        metadata={"rlhf.signature": f"{kid}:é", "rlhf.at_ms": "1"},
    )
    judged, unsigned, skipped = all_judged(cfg, desk)
    mine = next(j for j in judged if j.trace_id == tid)
    assert [v.rater for v in mine.votes] == ["alice"] and skipped["vote: bad signature"] >= 1


def test_a_revoked_raters_pending_votes_no_longer_count(served):
    cfg, desk = served
    from service import raters

    token = raters.add(raters.raters_path(cfg), "erin")
    (tid,) = desk.answer(["Erin judges this"], ["an answer for erin"])
    assert desk.vote("erin", tid, True, token=token).status == 200
    raters.revoke(raters.raters_path(cfg), "erin")
    ring = keys.load(cfg)
    judged, _, skipped = scan(desk.tracer.experiment_id, ring.verifying(), 0, 50, revoked={"erin"})
    assert tid not in {j.trace_id for j in judged} and skipped["a revoked rater's vote"] >= 1


def test_one_rater_over_their_limit_never_holds_back_the_others_rows():
    """Found in review: a row was deferred whole when any of its raters was over the daily limit, so one rater voting
    on everything capped the whole project. Now their vote is left out and the row lands on the others'."""
    rows = [judged(i, ["mallory", "alice", "bob"]) for i in range(4)] + [judged(9, ["mallory"])]
    h = harvest(rows, set(), limits=Limits(votes_per_rater_per_day=10, min_raters=9), ingested_today={"mallory": 10})
    assert [r["id"] for r in h.rows] == ["tr-0", "tr-1", "tr-2", "tr-3"] and h.deferred == ["tr-9"]
    assert h.contributors == Counter({"alice": 4, "bob": 4}), h.contributors
    assert all("mallory" not in h.raters[r["id"]] for r in h.rows)
