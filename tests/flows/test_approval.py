"""gate.approval=manual: the retrain pauses for an Approval input; approve, or time out and promote
nothing. Under the session's Prefect test server (the flow runs here, the approver in a thread)."""

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from components.registry.registry import CANDIDATE, CHAMPION, alias_version
from flows.approval import Approval
from flows.retrain import retrain
from tests.conftest import OPEN_GATE, make_project

pytestmark = pytest.mark.usefixtures("prefect_server")

MANUAL_GATE = (*OPEN_GATE, "gate.approval=manual")


async def _paused_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"])))
        )


def approve_when_paused(argv_tail: list[str], timeout: float = 300) -> threading.Thread:
    """A person who answers with `rlhf approve` as soon as the run pauses: the real command in a fresh
    process that knows the server only from `infra.prefect_api_url` (not from PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = asyncio.run(_paused_runs())
            if runs:
                answer.append(
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "cli.main",
                            "approve",
                            str(runs[0].id),
                            *argv_tail,
                            f"infra.prefect_api_url={url}",
                        ],
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                )
                return
            time.sleep(1)

    answer: list = []
    t = threading.Thread(target=run, daemon=True)
    t.answer = answer
    t.start()
    return t


def test_manual_approval_pauses_then_promotes(tmp_path):
    project = make_project(
        tmp_path / "proj", "tracking.registered_model_name=approval-test", *MANUAL_GATE, "gate.approval_timeout_s=300"
    )
    approver = approve_when_paused(["--approver", "alice", f"root={project.root}"])
    state = retrain(project, return_state=True)
    approver.join(timeout=10)
    (answer,) = approver.answer
    assert answer.returncode == 0 and "approved by alice" in answer.stdout, answer.stdout + answer.stderr
    assert state.is_completed(), state.message
    assert "approved by alice" in state.message
    assert alias_version("approval-test", CHAMPION) == "1"
    import mlflow

    assert mlflow.MlflowClient().get_model_version("approval-test", "1").tags["approver"] == "alice"


def test_no_approval_before_the_timeout_promotes_nothing(tmp_path):
    project = make_project(
        tmp_path / "proj", "tracking.registered_model_name=timeout-test", *MANUAL_GATE, "gate.approval_timeout_s=3"
    )
    state = retrain(project, return_state=True)
    assert state.is_completed() and "no approval within 3s" in state.message, state.message
    assert alias_version("timeout-test", CHAMPION) is None
    assert alias_version("timeout-test", CANDIDATE) == "1"


def test_the_approval_form_defaults_to_not_approving():
    """Resume pressed in the Prefect UI without reading the form must not promote."""
    assert Approval(approver="x").approve is False
    assert Approval.model_json_schema()["properties"]["approve"]["default"] is False


def test_approve_reaches_the_configured_server_and_names_an_unknown_run():
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "approve",
            "00000000-0000-0000-0000-000000000000",
            f"infra.prefect_api_url={PREFECT_API_URL.value()}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        f"no flow run 00000000-0000-0000-0000-000000000000 on the Prefect server {PREFECT_API_URL.value()}"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
