"""Crash safety: the retrain slot a dead holder cannot keep, orphaned flow runs and MLflow runs ended.
Real Prefect (the session's test server) and real MLflow (SQLite); dead processes are real processes
that have exited."""

import subprocess
import sys
import threading
import time
import uuid

import mlflow
import pytest

from components import tracking
from components.owner import HOST, Owner, _start_time
from service import lifecycle
from service import slot as slot_module
from service.lifecycle import reap_orphans
from service.slot import Holder, RetrainSlot, stale_reason
from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("prefect_server")


def dead_owner() -> Owner:
    """A process of this host that has exited (its pid now names nothing, or a newer process)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    owner = Owner(HOST, proc.pid, _start_time(proc.pid))
    proc.wait()
    return owner


# ---- pure verdicts, by hand
@pytest.mark.parametrize(
    "alive, final, unchanged_s, stale",
    [
        (True, None, 1e9, False),  # alive on this host: never stale, however long its heartbeat stood still
        (False, None, 0.0, True),  # the process is gone
        (None, "Crashed", 0.0, True),  # another host, its flow run ended
        (None, None, 60.0, False),  # another host, its heartbeat changed 60 s ago (by the waiter's clock)
        (None, None, 121.0, True),  # another host, unchanged for longer than the limit
    ],
)
def test_stale_reason(alive, final, unchanged_s, stale):
    holder = Holder("t", "run", "name", f"{HOST}:1:1.00", 0.0, 0.0)
    assert (stale_reason(holder, unchanged_s, alive, final, 120.0) is not None) is stale


def test_owner_tells_a_dead_process_and_a_reused_pid():
    assert Owner.me().alive() is True
    assert dead_owner().alive() is False
    me = Owner.me()
    assert Owner(me.host, me.pid, me.started - 100).alive() is False  # a record of an earlier version: start differs
    assert Owner(me.host, me.pid, me.started, me.ticks + 1).alive() is False  # same pid, another process


def test_a_live_owner_stays_alive_across_a_wall_clock_step():
    """Issue 28, item 11: psutil's epoch start moves with the wall clock (an NTP step, a VM resume). Recorded with
    its ticks since boot, a live owner whose recorded epoch start is 5 minutes off is still alive, and its retrain
    is not crashed; the record reads back the same, and earlier versions' records still parse."""
    me = Owner.me()
    assert me.ticks is not None and Owner.parse(str(me)) == me
    assert Owner(me.host, me.pid, me.started + 300, me.ticks).alive() is True
    assert Owner.parse(f"{HOST}:{me.pid}:{me.started:.2f}") == Owner(HOST, me.pid, round(me.started, 2))
    assert Owner("another-host", 1, 1.0).alive() is None
    assert Owner.parse(str(me)) == me and Owner.parse(f"{HOST}:{me.pid}") == Owner(HOST, me.pid, 0.0)


def test_the_project_is_the_registered_model_on_a_tracking_server_and_the_state_dir_without_one(tmp_path):
    """Issue 28, chaos: two orchestrators in two state dirs against one tracking server retrain one project (one
    slot); without a server each state dir is a project of its own."""
    server = ("tracking.uri=http://127.0.0.1:5000",)
    a, b = make_project(tmp_path / "a", *server), make_project(tmp_path / "b", *server)
    assert lifecycle.project_id(a) == lifecycle.project_id(b)
    assert lifecycle.project_id(a).startswith("rlhf-policy-")
    with_user = make_project(tmp_path / "c", "tracking.uri=http://someone:pw@127.0.0.1:5000/")
    assert lifecycle.project_id(with_user) == lifecycle.project_id(a)
    other_model = make_project(tmp_path / "d", *server, "tracking.registered_model_name=other")
    assert lifecycle.project_id(other_model) != lifecycle.project_id(a)
    assert lifecycle.project_id(make_project(tmp_path / "e")) != lifecycle.project_id(make_project(tmp_path / "f"))


# ---- the slot
def test_slot_is_exclusive_and_says_who_holds_it(tmp_path):
    project = make_project(tmp_path / "proj")
    said: list[str] = []
    first = RetrainSlot(project, said.append)
    first.acquire()
    assert first.read().token == first.mine.token
    slot_module.SAY_EVERY_S, saved = 0.5, slot_module.SAY_EVERY_S
    try:
        second = RetrainSlot(project, said.append)
        got = threading.Event()
        t = threading.Thread(target=lambda: (second.acquire(), got.set()), daemon=True)
        t.start()
        time.sleep(3)
        assert not got.is_set(), "a second retrain must wait while a live one holds the slot"
        assert any("waiting for the retrain slot" in s and str(Owner.me().pid) in s for s in said), said
        first.release()
        assert got.wait(10), "released: the waiter takes it"
        second.release()
    finally:
        slot_module.SAY_EVERY_S = saved
    assert first.read() is None


def test_a_dead_holder_is_freed_and_its_runs_are_ended(tmp_path):
    """What SIGKILL leaves: the slot record, a Running flow run and RUNNING MLflow runs of a dead process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.states import Running

    from flows.retrain import retrain

    project = make_project(tmp_path / "proj")
    tracking.setup(project)
    dead = dead_owner()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(retrain)
        run = client.create_flow_run(retrain, state=Running())
        client.update_flow_run_labels(
            run.id, {lifecycle.OWNER_LABEL: str(dead), lifecycle.PROJECT_LABEL: lifecycle.project_id(project)}
        )
        holder = Holder(uuid.uuid4().hex, str(run.id), run.name, str(dead), time.time(), time.time())
        client.create_variable(VariableCreate(name=lifecycle.slot_name(project), value=holder.__dict__))
    assert flow_id
    tags = {lifecycle.OWNER_LABEL: str(dead), "rlhf.flow_run_id": str(run.id)}
    parent = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(project.tracking.experiment).experiment_id, tags=tags
    )
    alive = mlflow.MlflowClient().create_run(parent.info.experiment_id, tags={lifecycle.OWNER_LABEL: str(Owner.me())})

    said: list[str] = []
    slot = RetrainSlot(project, said.append)
    started = time.time()
    slot.acquire()
    assert time.time() - started < 30
    slot.release()
    assert any("freed the retrain slot" in s and "is gone" in s for s in said), said
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.name == "Crashed"
    ended = mlflow.get_run(parent.info.run_id)
    assert ended.info.status == "KILLED" and "ended without finishing" in ended.data.tags["rlhf.ended_because"]
    assert mlflow.get_run(alive.info.run_id).info.status == "RUNNING", "a live process's run is left alone"
    assert reap_orphans(project, said.append) == [], "nothing left to clean"


def test_a_leftover_claim_of_a_dead_waiter_does_not_block_the_slot(tmp_path):
    """Issue 28, item 4: a waiter that died between claiming a stale holder and freeing it leaves
    `<slot>_reap_<token>`. The next waiter removes that claim (its creator is gone), frees the holder and takes the
    slot, saying both; while a claim stands it waits a poll between looks instead of spinning."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    project = make_project(tmp_path / "proj")
    tracking.setup(project)  # freeing a holder ends its MLflow runs: the project's store, not ./mlflow.db
    holder = Holder(uuid.uuid4().hex, "", "", str(dead_owner()), time.time(), time.time())
    claim = f"{lifecycle.slot_name(project)}_reap_{holder.token}"
    with get_client(sync_client=True) as client:
        client.create_variable(VariableCreate(name=lifecycle.slot_name(project), value=holder.__dict__))
        client.create_variable(VariableCreate(name=claim, value=str(dead_owner())))
    said: list[str] = []
    slot = RetrainSlot(project, said.append)
    reads = []
    slot.read = lambda read=slot.read: reads.append(1) or read()
    done = threading.Event()
    threading.Thread(target=lambda: (slot.acquire(), done.set()), daemon=True).start()
    assert done.wait(30), f"the slot stayed blocked by the leftover claim: {said}"
    slot.release()
    assert any("removed a leftover claim" in s and "its process is gone" in s for s in said), said
    assert any("freed the retrain slot" in s for s in said), said
    assert len(reads) < 20, f"{len(reads)} reads: the waiter spun instead of polling"
    with get_client(sync_client=True) as client:
        assert client.read_variable_by_name(claim) is None


def test_clock_skew_or_a_jump_of_the_waiters_clock_frees_no_live_holder(tmp_path, monkeypatch):
    """Issue 28, item 3: staleness is the holder's heartbeat value standing still on the waiter's own monotonic
    clock. A holder whose clock is 10 minutes behind (its heartbeat looks old), seen by a waiter whose wall clock
    then jumps +5 minutes, is not freed; it is only once its value stays unchanged for the limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    project = make_project(tmp_path / "proj", "infra.retrain_slot_stale_s=2")
    slot = RetrainSlot(project, print)
    skewed = Holder("skew", "", "", "another-host:42:1.00", time.time() - 600, time.time() - 600)
    with get_client(sync_client=True) as client:
        client.create_variable(VariableCreate(name=slot.name, value=skewed.__dict__))
    assert slot.verdict(slot.read()) is None  # before: 600 s "old" > 2 s: freed
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 300)  # the waiter's wall clock steps 5 minutes ahead
    assert slot.verdict(slot.read()) is None
    time.sleep(1.2)
    skewed.heartbeat += 15  # the live holder beats (on its own clock)
    with get_client(sync_client=True) as client:
        client.update_variable(VariableUpdate(name=slot.name, value=skewed.__dict__))
    time.sleep(1.2)
    assert slot.verdict(slot.read()) is None, "2.4 s since it was first seen, but its value changed: counted anew"
    time.sleep(1.2)
    assert slot.verdict(slot.read()) is None
    time.sleep(1.0)
    assert "no heartbeat for" in slot.verdict(slot.read())  # unchanged for 2.2 s > 2 s
    assert slot.free(slot.read(), "test")


def test_a_holder_that_lost_the_slot_stops_its_run(tmp_path):
    """Freed all the same (a Prefect outage longer than the limit): at its next heartbeat the holder sees another
    token and stops its run (on_lost; by default the main thread's SIGTERM), and leaves the new holder's slot."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableUpdate

    project = make_project(tmp_path / "proj")
    stopped, said = threading.Event(), []
    slot = RetrainSlot(project, said.append, on_lost=stopped.set)
    slot.heartbeat_s = 0.2
    slot.acquire()
    other = Holder("someone-else", "", "", "another-host:7:1.00", time.time(), time.time())
    with get_client(sync_client=True) as client:
        client.update_variable(VariableUpdate(name=slot.name, value=other.__dict__))
    assert stopped.wait(10), "the holder never noticed it lost the slot"
    assert slot.lost and any("stopping this run" in s for s in said), said
    slot.release()
    assert slot.read().token == "someone-else", "the new holder's slot is left alone"
    with get_client(sync_client=True) as client:
        client.delete_variable_by_name(slot.name)


def test_a_holder_on_another_host_is_stale_only_without_heartbeat(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    project = make_project(tmp_path / "proj", "infra.retrain_slot_stale_s=5")
    tracking.setup(project)  # freeing a slot also ends the dead holder's MLflow runs: in this project's store
    slot = RetrainSlot(project, print)
    beating = Holder("x", "", "", "another-host:42:1.00", time.time(), time.time())
    with get_client(sync_client=True) as client:
        client.create_variable(VariableCreate(name=slot.name, value=beating.__dict__))
    assert slot.verdict(slot.read()) is None
    time.sleep(6)
    assert "no heartbeat" in slot.verdict(slot.read())
    assert slot.free(slot.read(), "test") and slot.read() is None


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_rlhf_run_waiting_for_the_slot_says_who_holds_it_and_stops_on_a_signal(tmp_path, sig):
    """The real command in its own process, on the shared (test) server: it waits for a live holder, says
    which run holds the slot, and a signal stops it within 10 s without taking the slot."""
    import os
    import signal
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL
    from prefect.types import DateTime

    project = make_project(tmp_path / "proj")
    holder = RetrainSlot(project, print)
    holder.acquire()
    began = time.time() - 1
    log_path = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONFAULTHANDLER": "1"}
    try:
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("rlhf")),
                    "run",
                    f"root={project.root}",
                    "data=demo_small",
                    f"infra.prefect_api_url={PREFECT_API_URL.value()}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                # as from a terminal: a shell's background job (`make test &`, nohup) starts with SIGINT
                # ignored, which a child inherits and Python then leaves ignored (no KeyboardInterrupt)
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        deadline = time.time() + 240
        while "waiting for the retrain slot" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        text = log_path.read_text()
        assert f"pid {os.getpid()}" in text, text[-2000:]  # who holds it
        sent = time.time()
        proc.send_signal(getattr(signal, sig))
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # PYTHONFAULTHANDLER: SIGABRT dumps every thread's stack into the log
            proc.send_signal(signal.SIGABRT)
            time.sleep(3)
            raise AssertionError(f"still running 10 s after {sig}:\n{log_path.read_text()[-20000:]}") from None
        print(f"rlhf run waiting for the slot, {sig}: exited {code} in {time.time() - sent:.1f} s")
        assert code in (130, 143), log_path.read_text()[-3000:]
        assert holder.read().token == holder.mine.token, "the waiter never took the slot"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        holder.release()
    # the waiting run did not stay Running. Only runs that began after this test's start: the server's default
    # order is by (random, uuid4) id, so a plain `limit=` returned an arbitrary sample of the session's runs
    with get_client(sync_client=True) as client:
        after = FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=DateTime.fromtimestamp(began)))
        runs = [
            r
            for r in client.read_flow_runs(flow_run_filter=after, sort=FlowRunSort.EXPECTED_START_TIME_DESC)
            if r.labels.get(lifecycle.PROJECT_LABEL) == lifecycle.project_id(project)
        ]
    assert runs and all(r.state.is_final() for r in runs), [(r.name, r.state_name) for r in runs]


def test_rlhf_status_names_the_holder_and_says_when_it_is_stale(tmp_path):
    import os
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.settings import PREFECT_API_URL

    project = make_project(tmp_path / "proj")
    dead = dead_owner()
    with get_client(sync_client=True) as client:
        client.create_variable(
            VariableCreate(
                name=lifecycle.slot_name(project),
                value=Holder("t", "", "crashed-run", str(dead), time.time(), time.time()).__dict__,
            )
        )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("rlhf")),
            "status",
            f"root={project.root}",
            f"infra.prefect_api_url={PREFECT_API_URL.value()}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "held by flow run crashed-run" in proc.stdout and f"pid {dead.pid}" in proc.stdout, proc.stdout
    assert "STALE: its process" in proc.stdout and "the next retrain frees it" in proc.stdout, proc.stdout
    assert RetrainSlot(project, print).read() is not None, "status only reads"
