"""The canary's decision on a real registry, real signed traces and votes (tests/registry/signed_answers.py: the
serving process's Tracer and FeedbackDesk, without a server), and the real retrain slot and Prefect events:
`canary_check` promotes a challenger its users like better, and retires one that starts repeating words on its
guardrails before the test has its sample."""

import asyncio
import threading
import time
from pathlib import Path

import mlflow
import pytest

from cli.main import main
from components import tracking
from components.registry import registry
from components.registry.policy_model import Tracer
from components.registry.registry import CHALLENGER, CHAMPION, alias_version
from flows.canary import canary_check
from service import keys
from service.feedback_api import FeedbackDesk
from tests.conftest import make_project
from tests.registry.signed_answers import serving_desk
from tests.registry.test_promotion import new_version

pytestmark = pytest.mark.usefixtures("prefect_server")
NAME = "canary-test"
GOOD = [
    "a warm and moving film with a fine cast",
    "the story is slow but the ending pays off",
    "sharp writing and a score that stays with you",
    "I laughed more than I expected to",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    cfg = make_project(
        tmp_path_factory.mktemp("canary") / "proj",
        f"tracking.registered_model_name={NAME}",
        "registry.canary.min_judged=20",
        "registry.canary.window=20",
    )
    tracking.setup(cfg)
    return cfg


def arm_desk(cfg, version: str, alias: str, like) -> FeedbackDesk:
    ring = keys.load(cfg)
    tracer = Tracer(like.tracer.experiment_id, f"{NAME}/{version}@{alias}", str(ring.path))
    return FeedbackDesk(tracer, like.desk.raters.path, ring.path, like.desk.rating_range)


def overrides(cfg) -> list[str]:
    return [f"root={cfg.root}", f"tracking.registered_model_name={NAME}", "registry.canary.min_judged=8"]


def test_a_challenger_its_users_like_better_is_promoted_and_the_decision_recorded(project, capsys):
    v1 = new_version(NAME)
    registry.promote(NAME, v1, approver="test")
    v2 = new_version(NAME, compared=v1)
    assert main(["canary", "start", v2, *overrides(project)]) == 0
    champion = serving_desk(project, ["ann", "bob"], version=v1)
    challenger = arm_desk(project, v2, CHALLENGER, champion)
    answers = []
    for i in range(10):  # the users like the challenger's answers and not the champion's
        for desk, up in ((challenger, True), (champion.desk, False)):
            (trace_id,) = desk.tracer.record(
                [f"Review {i}"], {"n": 1}, [[GOOD[i % 4]]], None, _frame(GOOD[i % 4]), time.time_ns()
            )
            answers.append((desk, trace_id, up))
    # the votes come later, as from another replica: the desk finds each signed answer in the store (a vote right
    # after its answer makes the desk flush MLflow's export queue first, ~1 s each: tests/registry/test_registry.py)
    mlflow.flush_trace_async_logging()
    for k, (desk, trace_id, up) in enumerate(answers):  # two raters, taking turns on each arm: within the limits of
        desk.tracer.recent.clear()  # one rater's share of an arm's votes (registry.feedback.max_rater_share)
        rater = ("ann", "bob")[k // 2 % 2]
        assert desk.handle(f"Bearer {champion.tokens[rater]}", _vote(trace_id, up)).status == 200
    assert main(["canary", "status", *overrides(project)]) == 0
    assert "decision: promote: the challenger's thumbs-up rate is above the champion's" in capsys.readouterr().out

    # every pair +1: the evidence passes 1/0.05 at the 8th pair (tests/evaluation/test_sequential.py, by hand);
    # gate.approval=manual: the promotion waits for a person, who answers with `rlhf approve`
    manual = make_project(
        Path(project.root),
        f"tracking.registered_model_name={NAME}",
        "registry.canary.min_judged=8",
        "gate.approval=manual",
        "gate.approval_timeout_s=120",
    )
    person = approve_when_paused(["--approver", "alice", f"root={project.root}"])
    s = canary_check(manual)
    person.join(timeout=10)
    assert person.answer == [0], person.answer
    assert s.verdict == "promote" and s.decision.judged == {"champion": 8, "challenger": 8}, s.table()
    assert f"v{v2} promoted to champion (was v{v1}), approved by alice" == s.outcome, s.outcome
    assert alias_version(NAME, CHAMPION) == v2 and alias_version(NAME, CHALLENGER) is None
    assert registry.version_tags(NAME, v2)["canary_verdict"] == "promote"
    (run,) = mlflow.search_runs(
        [tracking.serving_experiment(project)], filter_string="tags.`rlhf.kind` = 'canary'", output_format="list"
    )
    assert run.info.run_name == f"canary v{v2} vs v{v1}: promote" and run.data.metrics["canary/difference"] == 1.0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"canary.md", "canary_curves.png"} <= artifacts
    assert _event("rlhf.canary.promoted", v2)["payload"]["verdict"] == "promote"


def test_a_challenger_that_repeats_words_is_retired_by_its_guardrails_before_the_test_has_its_sample(project):
    champion_v = alias_version(NAME, CHAMPION)
    v3 = new_version(NAME, compared=champion_v)
    assert main(["canary", "start", v3, *overrides(project)]) == 0
    champion = serving_desk(project, ["cy"], version=champion_v)
    challenger = arm_desk(project, v3, CHALLENGER, champion)
    for i in range(40):  # two windows of 20 answers each; nobody has voted yet
        bad = GOOD[i % 4].replace(" ", " very very ", 1)
        challenger.tracer.record([f"Q {i}"], {"n": 1}, [[bad]], None, _frame(bad), time.time_ns())
        champion.tracer.record([f"Q {i}"], {"n": 1}, [[GOOD[i % 4]]], None, _frame(GOOD[i % 4]), time.time_ns())
    mlflow.flush_trace_async_logging()
    s = canary_check(project)
    assert s.verdict == "guardrail" and s.decision.judged["challenger"] == 0, s.table()
    assert "2 of 2 windows failed their guardrails" in s.reason and "repeated-word share" in s.reason, s.reason
    assert alias_version(NAME, CHALLENGER) is None and alias_version(NAME, CHAMPION) == champion_v
    assert registry.version_tags(NAME, v3)["canary_verdict"] == "guardrail"
    assert "repeated-word share" in registry.version_tags(NAME, v3)["canary_reason"]
    assert _event("rlhf.canary.guardrail", v3)["payload"]["outcome"].startswith(f"v{v3} retired")


def approve_when_paused(argv_tail: list[str], timeout: float = 120) -> threading.Thread:
    """A person who runs `rlhf approve RUN_ID ...` as soon as a flow run pauses (in this process: the command's own
    start-up is tests/flows/test_approval.py's)."""
    from tests.flows.test_approval import _paused_runs

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if runs := asyncio.run(_paused_runs()):
                t.answer.append(main(["approve", str(runs[0].id), *argv_tail]))
                return
            time.sleep(0.5)

    t = threading.Thread(target=run, daemon=True)
    t.answer = []  # type: ignore[attr-defined]
    t.start()
    return t


def _frame(text: str):
    import pandas as pd

    return pd.DataFrame({"response": [text]})


def _vote(trace_id: str, up: bool) -> bytes:
    import json

    return json.dumps({"trace_id": trace_id, "value": up}).encode()


def _event(name: str, version: str) -> dict:
    from tests.flows.test_data_flows import wait_for_event

    return wait_for_event(name, version, key=lambda e: e["resource"].get("rlhf.version"))


def test_the_server_follows_the_canarys_phase_from_shadow_to_traffic_without_loading_again(project):
    """The serving process's arms (service/arms.py) against the real registry: a canary started in shadow
    (registry.canary.shadow_answers) is loaded as the shadow arm; once the check moves its phase on, the next poll shows
    the same loaded model to its share of users; its alias removed, it leaves. (The loader is the one stand-in: the
    versions here have no model files.)"""
    from types import SimpleNamespace

    from components.registry import canary as observed
    from service.arms import Arm, Arms

    loads: list[tuple[str, str]] = []

    def load(name, version, alias, arm):
        loads.append((version, arm))
        model = SimpleNamespace(unwrap_python_model=lambda: SimpleNamespace(tracer=None))
        return Arm(arm, version, None, model, 1 << 20)

    champion_v = alias_version(NAME, CHAMPION)
    v = new_version(NAME, compared=champion_v)
    observed.start(NAME, v, shadow_first=True)
    arms = Arms(NAME, CHAMPION, CHALLENGER, share=0.1, poll_s=0, load=load)
    arms.refresh()
    assert arms.current()[1].name == "shadow" and loads[-1] == (v, "shadow")
    registry.tag_version(NAME, v, {observed.PHASE: "traffic"})
    assert arms.refresh() == [f"challenger v{v} answers for 10% of users"]
    assert arms.current()[1].name == CHALLENGER and len(loads) == 2, "the loaded model is shown, not loaded again"
    mlflow.MlflowClient().delete_registered_model_alias(NAME, CHALLENGER)
    assert arms.refresh() == [f"challenger v{v} left traffic"] and arms.current()[1] is None


def test_a_retrain_with_promotion_canary_makes_its_candidate_the_challenger_and_queues_the_next(project):
    """registry.promotion=canary: a candidate that passed its gate becomes the challenger under the retrain slot; the
    next one, while that canary runs, is queued (on_new_candidate=queue) and becomes the challenger when the first is
    decided (here: retired at its deadline, no votes). With on_new_candidate=replace, the next one takes the running
    canary's place at once."""
    from pathlib import Path

    from flows.contracts import Registration
    from flows.retrain import enter_canary
    from service.slot import RetrainSlot
    from tests.registry.test_promotion import summary

    cfg = make_project(Path(project.root), f"tracking.registered_model_name={NAME}", "registry.promotion=canary")
    champion = alias_version(NAME, CHAMPION)
    first, second = new_version(NAME, compared=champion), new_version(NAME, compared=champion)
    with RetrainSlot(cfg, print, on_lost=lambda: None) as slot, mlflow.start_run():
        state = enter_canary(cfg, summary(cfg, champion, Registration(NAME, first)), slot)
        assert state.is_completed() and f"v{first} passed the gate and is the challenger" in state.message
        assert alias_version(NAME, CHALLENGER) == first and alias_version(NAME, CHAMPION) == champion
        state = enter_canary(cfg, summary(cfg, champion, Registration(NAME, second)), slot)
        assert state.is_completed() and f"waits for the canary of v{first} to end" in state.message, state.message
        assert alias_version(NAME, CHALLENGER) == first
    late = make_project(Path(project.root), f"tracking.registered_model_name={NAME}", "registry.canary.deadline_h=0")
    s = canary_check(late)
    assert s.verdict == "retire" and "deadline passed" in s.reason, s.table()
    assert f"v{second}, queued, is the challenger now" in s.outcome, s.outcome
    assert alias_version(NAME, CHALLENGER) == second
    assert registry.version_tags(NAME, first)["canary_verdict"] == "retire"

    # on_new_candidate=replace: a candidate that passes while a canary runs takes its place at once
    replacing = make_project(
        Path(project.root),
        f"tracking.registered_model_name={NAME}",
        "registry.promotion=canary",
        "registry.canary.on_new_candidate=replace",
    )
    third = new_version(NAME, compared=champion)
    with RetrainSlot(replacing, print, on_lost=lambda: None) as slot, mlflow.start_run():
        state = enter_canary(replacing, summary(replacing, champion, Registration(NAME, third)), slot)
    assert state.is_completed() and f"v{third} passed the gate and is the challenger" in state.message, state.message
    assert alias_version(NAME, CHALLENGER) == third and alias_version(NAME, CHAMPION) == champion
    assert registry.version_tags(NAME, second)["canary_verdict"] == "superseded"
    assert registry.version_tags(NAME, second)["canary_reason"] == f"replaced by v{third}"

    # a check killed after `champion` moved and before its verdict: the next check finishes the promotion's record
    registry.promote(NAME, third, approver="test", compared=champion)
    assert alias_version(NAME, CHALLENGER) == alias_version(NAME, CHAMPION) == third
    assert canary_check(project) is None and alias_version(NAME, CHALLENGER) is None
    assert registry.version_tags(NAME, third)["canary_verdict"] == "promote"


def test_failed_answers_are_signed_traces_that_trip_the_error_rate_guardrail(project):
    """A failed answer of an arm (a 5xx, or MLflow's generic 400 with a stack trace; not a request refused as
    invalid) is a signed trace of that arm (service/serving.failure); the challenger failing where the champion does
    not is retired on its error rate."""
    from types import SimpleNamespace

    from service.serving import failed, failure

    assert failed(500, b"") and failed(400, b'{"error_code": "BAD_REQUEST", "stack_trace": "..."}')
    assert not failed(400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "n must be in 1..8"}')
    assert not failed(413, b"") and not failed(200, b"{}")
    champion_v = alias_version(NAME, CHAMPION)
    challenger_v = new_version(NAME, compared=champion_v)
    assert main(["canary", "start", challenger_v, *overrides(project)]) == 0
    champion = serving_desk(project, ["di"], version=champion_v)
    challenger = arm_desk(project, challenger_v, CHALLENGER, champion)
    arm = SimpleNamespace(name=CHALLENGER, tracer=challenger.tracer)
    for i in range(40):
        failure(arm, b'{"inputs": ["Q"]}', 500, b"", time.time_ns())
        champion.tracer.record([f"Q {i}"], {"n": 1}, [[GOOD[i % 4]]], None, _frame(GOOD[i % 4]), time.time_ns())
    mlflow.flush_trace_async_logging()
    import http.server
    import json
    import threading
    from pathlib import Path

    posted: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    cfg = make_project(
        Path(project.root),
        f"tracking.registered_model_name={NAME}",
        "registry.canary.window=20",
        f"registry.canary.webhook=http://127.0.0.1:{hook.server_port}/canary",
    )
    try:
        s = canary_check(cfg)
    finally:
        hook.shutdown()
    assert s.verdict == "guardrail" and "error rate 1.000 vs the champion's 0.000" in s.reason, s.table()
    assert alias_version(NAME, CHALLENGER) is None
    (sent,) = posted  # the operator's webhook hears the verdict
    assert sent["verdict"] == "guardrail" and sent["challenger"] == challenger_v and "error rate" in sent["reason"]
