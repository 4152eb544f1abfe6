"""The canary's decision on a real registry, real signed traces and votes (tests/registry/signed_answers.py: the
serving process's Tracer and FeedbackDesk, without a server), and the real retrain slot and Prefect events:
`canary_check` promotes a challenger its users like better, and retires one that starts repeating words on its
guardrails before the test has its sample."""

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
    for desk, trace_id, up in answers:
        desk.tracer.recent.clear()
        assert desk.handle(f"Bearer {champion.tokens['ann']}", _vote(trace_id, up)).status == 200
    assert main(["canary", "status", *overrides(project)]) == 0
    assert "decision: promote: the challenger's thumbs-up rate is above the champion's" in capsys.readouterr().out

    # every pair +1: the evidence passes 1/0.05 at the 8th pair (tests/evaluation/test_sequential.py, by hand)
    s = canary_check(
        make_project(Path(project.root), f"tracking.registered_model_name={NAME}", "registry.canary.min_judged=8")
    )
    assert s.verdict == "promote" and s.decision.judged == {"champion": 8, "challenger": 8}, s.table()
    assert "promoted to champion" in s.outcome, s.outcome
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


def _frame(text: str):
    import pandas as pd

    return pd.DataFrame({"response": [text]})


def _vote(trace_id: str, up: bool) -> bytes:
    import json

    return json.dumps({"trace_id": trace_id, "value": up}).encode()


def _event(name: str, version: str) -> dict:
    from tests.flows.test_data_flows import wait_for_event

    return wait_for_event(name, version, key=lambda e: e["resource"].get("rlhf.version"))
