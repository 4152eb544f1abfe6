"""Workarounds for Prefect behaviour we depend on, in one place. Each says why it exists and the Prefect
versions it was verified against; outside them it still applies, with a warning to re-check it.

Tested set: constraints.txt pins prefect 3.8.8.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

VERIFIED = ("3.8", "3.9")  # major.minor versions these workarounds were checked against
_warned: set[str] = set()


def _check(name: str) -> None:
    import prefect

    version = ".".join(prefect.__version__.split(".")[:2])
    if version not in VERIFIED and name not in _warned:
        _warned.add(name)
        logging.getLogger("rlhf").warning(
            "Prefect %s: workaround %r was verified on %s only; re-check whether it "
            "is still needed (service/prefect_compat.py)",
            prefect.__version__,
            name,
            VERIFIED,
        )


def resume_after_pause_timeout(flow_run_id) -> None:
    """After `pause_flow_run(timeout=...)` raises FlowPauseTimeout, Prefect 3.8 leaves the run Paused, and a
    Paused run cannot complete: take it back to Running so the flow ends with its own message."""
    _check("resume_after_pause_timeout")
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(), force=True)


def runner_with_own_sigterm(on_sigterm: Callable[[], None]):
    """A `prefect.runner.Runner` whose SIGTERM handler only calls `on_sigterm`. Prefect 3.8's handler stops
    the runner from inside the signal handler and could hang, so `rlhf serve` ran on after SIGTERM
    (issue 10); `flows/serve.py` stops the runner from its event loop instead."""
    _check("runner_with_own_sigterm")
    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *args, **kwargs):  # installed by Runner.start() on the main thread
            on_sigterm()

    return _Runner
