"""gate.approval=manual: the retrain pauses for an Approval input; approve, or time out and promote
nothing. Under the session's Prefect test server (the flow runs here, the approver in a thread)."""
import asyncio
import threading
import time

import pytest

from components.registry.registry import CHALLENGER, CHAMPION, alias_version
from flows.cli import main
from flows.retrain import retrain
from tests.conftest import OPEN_GATE, make_project

pytestmark = pytest.mark.usefixtures("prefect_server")

MANUAL_GATE = (*OPEN_GATE, "gate.approval=manual")


async def _paused_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))))


def approve_when_paused(argv_tail: list[str], timeout: float = 300) -> threading.Thread:
    """A person who answers with `rlhf approve` as soon as the run pauses."""
    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = asyncio.run(_paused_runs())
            if runs:
                main(["approve", str(runs[0].id), *argv_tail])
                return
            time.sleep(1)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_manual_approval_pauses_then_promotes(tmp_path):
    project = make_project(tmp_path / "proj", "tracking.registered_model_name=approval-test", *MANUAL_GATE,
                           "gate.approval_timeout_s=300")
    approver = approve_when_paused(["--approver", "alice", f"root={project.root}"])
    state = retrain(project, return_state=True)
    approver.join(timeout=10)
    assert state.is_completed(), state.message
    assert "approved by alice" in state.message
    assert alias_version("approval-test", CHAMPION) == "1"
    import mlflow

    assert mlflow.MlflowClient().get_model_version("approval-test", "1").tags["approver"] == "alice"


def test_no_approval_before_the_timeout_promotes_nothing(tmp_path):
    project = make_project(tmp_path / "proj", "tracking.registered_model_name=timeout-test", *MANUAL_GATE,
                           "gate.approval_timeout_s=3")
    state = retrain(project, return_state=True)
    assert state.is_completed() and "no approval within 3s" in state.message, state.message
    assert alias_version("timeout-test", CHAMPION) is None
    assert alias_version("timeout-test", CHALLENGER) == "1"
