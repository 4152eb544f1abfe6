"""`rlhf worker`: Prefect's process worker, supervised so that it stops when asked.

Prefect's worker, sent SIGTERM, logs "Sending SIGINT to the process worker" and can go on running (measured: still
running 30 s later, and looping on connection errors once the Prefect server is gone). Here the worker runs as a
child in a process group of its own. SIGTERM or SIGINT to `rlhf worker`: SIGINT to the worker, then after
`grace_s` SIGKILL to the worker and every process it started (the stages); then the flow runs those stages left
Running are marked Crashed, so the retrain that dispatched them retries them at once instead of waiting for the
worker to be judged lost. When the Prefect server is unreachable that last step is skipped (the retrain's own
check, `infra.worker_lost_s`, then ends them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable

from components.owner import HOST

# SIGINT, then this long before SIGKILL. The whole stop stays within 10 s: up to 0.5 s to notice the signal, the
# grace, the kill, and marking the stages' runs Crashed (its Prefect client imported before, not during, the stop:
# importing it on a loaded 2-core machine took over a second, and 8 s of grace then ended at 10.1 s in CI)
GRACE_S = 6.0


def supervise(argv: list[str], say: Callable[[str], None], grace_s: float = GRACE_S) -> int:
    """Run `argv` (Prefect's worker) until it exits or this process is asked to stop. -> its exit code."""
    import psutil
    from prefect.client.orchestration import get_client  # noqa: F401 (imported now: a stop has no time for it)

    proc = subprocess.Popen(argv, start_new_session=True)
    asked = threading.Event()
    previous = {s: signal.signal(s, lambda *_: asked.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None and not asked.wait(0.5):
            pass
        if proc.poll() is not None:
            return proc.returncode
        try:
            stages = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            stages = []
        say(f"stopping the worker (SIGINT, then SIGKILL after {grace_s:g} s) and {len(stages)} process(es) it started")
        _signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in stages:  # a stage in a session of its own is not in the worker's group
            try:
                p.kill()
            except psutil.Error:
                pass
        if crashed := crash_runs_of({p.pid for p in stages}):
            say(f"marked {len(crashed)} stage flow run(s) of this worker Crashed: {', '.join(crashed)}")
        return 143 if proc.returncode in (None, -signal.SIGKILL, -signal.SIGINT) else proc.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def crash_runs_of(pids: set[int]) -> list[str]:
    """Flow runs not yet final whose process (Prefect's `infrastructure_pid`, `host:pid`) is one of `pids` on this
    host: -> their names, now Crashed. Nothing when the Prefect server cannot be reached."""
    if not pids:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    mine = {f"{HOST}:{pid}" for pid in pids}
    try:
        with get_client(sync_client=True) as client:
            running = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING])
                    )
                ),
                limit=200,
            )
            crashed = []
            for run in running:
                if run.infrastructure_pid in mine:
                    client.set_flow_run_state(run.id, Crashed(message="its worker was stopped"), force=True)
                    crashed.append(run.name)
            return crashed
    except Exception:  # the server is down: the dispatching retrain ends them (infra.worker_lost_s)
        return []
