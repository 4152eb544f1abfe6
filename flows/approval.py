"""Manual approval (gate.approval=manual): the retrain pauses until a person answers, in the Prefect UI
(the Approval form) or with `rlhf approve FLOW_RUN_ID [--reject] --approver NAME`."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.input import RunInput

from components.config import Config
from flows.contracts import Registration


class Approval(RunInput):
    """What a person answers to a paused retrain. `approve` defaults to False: pressing Resume in the UI
    without reading the form must not promote a model."""

    approve: bool = False
    approver: str = "unknown"
    comment: str = ""


def await_approval(cfg: Config, reg: Registration) -> Approval | None:
    """Pause this flow run until an Approval arrives; None when the timeout passes first."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run

    from service.prefect_compat import resume_after_pause_timeout

    get_run_logger().warning(
        "%s v%s passed the gate and waits for approval (timeout %ss): resume flow run %s in the Prefect UI, or run "
        "`rlhf approve %s [--reject] --approver NAME`",
        reg.name,
        reg.version,
        cfg.gate.approval_timeout_s,
        flow_run.id,
        flow_run.id,
    )
    try:
        return pause_flow_run(
            wait_for_input=Approval,
            timeout=cfg.gate.approval_timeout_s,
            poll_interval=min(5, cfg.gate.approval_timeout_s),
            key=f"approve-v{reg.version}",
        )
    except FlowPauseTimeout:
        resume_after_pause_timeout(flow_run.id)
        return None
