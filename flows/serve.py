"""`rlhf serve`: the retrain flow as a long-lived Prefect deployment (`Flow.serve`).

- schedule: `infra.retrain_cron` (default nightly at 03:00);
- trigger: every `rlhf.data.updated` event that `rlhf ingest` emits for this project's data
  (`infra.retrain_on_new_data`);
- at most one retrain at a time (deployment concurrency limit 1; later runs queue);
- with `registry.promotion=canary`, a third deployment every `registry.canary.check_every_s` (300): `rlhf canary check` on that interval (the
  canary's decision, flows/canary.py; nothing to do without a challenger). No parameters either.
- with `infra.ingest_traces_cron`, a second deployment: `rlhf ingest --from-traces` on that schedule (the judged
  served answers become feedback rows; their `rlhf.data.updated` event then triggers the retrain). It takes no
  parameters: it runs on the operator's config alone.

The deployment's parameter is the list of Hydra overrides, so a scheduled or triggered run
composes the same config as `rlhf run <overrides>` (shown redacted: the Prefect API stores them).
Whoever can reach the Prefect API can start a run with other parameters: the operator's own overrides
(`rlhf serve`'s command line) are trusted, anything else must match the serving config's
`infra.remote_overrides` and never NEVER_REMOTE (components/config.py). Events reach the deployment only through a
server both processes share: run `prefect server start` (or `infra=server`) and point
`infra.prefect_api_url` / PREFECT_API_URL at it.
"""

from __future__ import annotations

import json
import os

from prefect import flow
from prefect.states import Completed, Failed

from components.config import Config, ConfigError, OverrideNotAllowed, check_remote_overrides, compose
from components.tracking import SERVING_SUFFIX, redact_override
from flows.ingest import DATA_UPDATED, data_resource, harvest_summary, ingest_flow, traces_to_file
from flows.retrain import retrain
from service import lifecycle
from service.env import configure_environment

DEPLOYMENT = "rlhf-retrain"
INGEST_TRACES = "rlhf-ingest-traces"
CANARY_CHECK = "rlhf-canary-check"
# the operator's `rlhf serve` overrides, for the flow runs the runner starts (subprocesses: they inherit
# the environment, not the serving process's variables)
SERVED_OVERRIDES = "RLHF_SERVED_OVERRIDES"


@flow(name="retrain-service", validate_parameters=False)
def retrain_service(overrides: list[str] | None = None):
    """Compose the config from overrides, then run `retrain` as a subflow. A refused override fails the
    run before anything else happens."""
    served = json.loads(os.environ.get(SERVED_OVERRIDES, "[]"))
    try:
        cfg = compose(allowed_overrides(served, list(overrides or []), compose(served)))
    except OverrideNotAllowed as e:
        return Failed(message=str(e))
    except ConfigError:  # what it says may name this host's files or values: not for a remote caller
        return Failed(message="the run's overrides do not compose with the serving config: nothing ran")
    configure_environment(cfg)
    lifecycle.claim_run(cfg)  # if this process dies, the next `rlhf serve` or retrain ends this run as Crashed
    return retrain(cfg, return_state=True)


@flow(name="ingest-traces-service", validate_parameters=False)
def ingest_traces_service():
    """`rlhf ingest --from-traces` on the operator's config (no parameters: nothing a caller of the Prefect API
    could change): the judged served answers not in the data yet become a feedback batch through the usual ingest,
    with quarantine: a row the data suite refuses is set aside with its rules and remembered, the rest land, and the
    next tick goes on (issue 38: one refused row used to block every later tick)."""
    cfg = compose(json.loads(os.environ.get(SERVED_OVERRIDES, "[]")))
    configure_environment(cfg)
    lifecycle.claim_run(cfg)
    batch = traces_to_file(cfg)
    summary = "\n".join(harvest_summary(batch.harvest, cfg.tracking.experiment + SERVING_SUFFIX))
    if batch.path is None:
        batch.landed(None)
        return Completed(message=f"nothing new to ingest\n{summary}")
    state = ingest_flow(cfg, str(batch.path), "feedback", quarantine=True, return_state=True)
    if state.is_completed():
        batch.landed(state.result())
    return state


@flow(name="canary-check-service", validate_parameters=False)
def canary_check_service():
    """`rlhf canary check` on the operator's config (no parameters): decide the canary, act on a verdict."""
    from flows.canary import canary_check

    cfg = compose(json.loads(os.environ.get(SERVED_OVERRIDES, "[]")))
    configure_environment(cfg)
    s = canary_check(cfg)
    return Completed(message=s.outcome if s is not None else "no canary")


def allowed_overrides(served: list[str], requested: list[str], cfg: Config) -> list[str]:
    """The overrides a run composes its config from: the operator's (`served`, trusted; the parameters
    show them redacted, which stands for the real one) with what the run changes on top, checked against
    the serving config `cfg`'s infra.remote_overrides. Raises OverrideNotAllowed. A run cannot drop an
    operator's override (`root=...`): one it leaves out still applies."""
    trusted = {redact_override(o): o for o in served} | {o: o for o in served}
    asked = [trusted.get(o, o) for o in requested]
    check_remote_overrides([o for o in asked if o not in served], cfg.infra.remote_overrides, base=cfg)
    changed = {_key(o) for o in asked}
    return [o for o in served if _key(o) not in changed] + asked


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def deployment(cfg: Config, overrides: list[str]):
    from prefect.events import DeploymentEventTrigger

    shown = [redact_override(o) for o in overrides]  # stored by the Prefect API: no credentials

    # only this project's data: events from other projects on a shared server do not retrain this one
    triggers = (
        [
            DeploymentEventTrigger(
                name="retrain on new data",
                expect={DATA_UPDATED},
                match={"prefect.resource.id": data_resource(cfg)["prefect.resource.id"]},
                parameters={"overrides": shown},
            )
        ]
        if cfg.infra.retrain_on_new_data
        else []
    )
    return retrain_service.to_deployment(
        name=DEPLOYMENT,
        cron=cfg.infra.retrain_cron,
        parameters={"overrides": shown},
        triggers=triggers,
        concurrency_limit=1,
        description="validate -> SFT -> RM -> PPO -> evaluate -> gate -> register -> promote",
        tags=["rlhf", cfg.model.name],
    )


def ingest_traces_deployment(cfg: Config):
    """`rlhf ingest --from-traces` on `infra.ingest_traces_cron` (None when unset): no parameters, one at a time."""
    if not cfg.infra.ingest_traces_cron:
        return None
    return ingest_traces_service.to_deployment(
        name=INGEST_TRACES,
        cron=cfg.infra.ingest_traces_cron,
        concurrency_limit=1,
        description="the judged served answers -> feedback rows (rlhf ingest --from-traces)",
        tags=["rlhf"],
    )


def canary_check_deployment(cfg: Config):
    """The canary's decision every `registry.canary.check_every_s` with registry.promotion=canary (else None): no
    parameters, one at a time."""
    if cfg.registry.promotion != "canary" or not cfg.registry.canary.check_every_s:
        return None
    return canary_check_service.to_deployment(
        name=CANARY_CHECK,
        interval=cfg.registry.canary.check_every_s,
        concurrency_limit=1,
        description="the canary: the sequential test on the users' votes and the guardrails; promote or retire",
        tags=["rlhf"],
    )


# SIGTERM/SIGINT -> runner stopped: at most this; then Prefect stops its temporary server (if any; up to
# 5 s, then it kills it), so the process exits within 10 s of the signal
STOP_GRACE_S = 3.0


def serve(cfg: Config, overrides: list[str]) -> None:
    """Serve the deployment until SIGTERM or SIGINT (Ctrl-C): both stop polling, cancel a run in flight
    (it resumes from its checkpoints next time), pause the schedule and return.

    The signals are ours, not Prefect's (service/prefect_compat.py: Prefect 3.8's Runner SIGTERM handling
    could hang, and a SIGINT-to-cancel of the main task was swallowed by its task group). Here a signal
    only sets an event; the runner is stopped from the event loop, with a deadline."""
    import asyncio
    import signal

    from components import tracking
    from service.prefect_compat import runner_with_own_sigterm

    tracking.setup(cfg)
    os.environ[SERVED_OVERRIDES] = json.dumps(overrides)  # what the runs it starts trust
    lifecycle.reap_orphans(cfg, print)  # a run a crashed `rlhf serve` left Running would hold the deployment's slot
    if cfg.infra.training_pool:  # the stages its runs dispatch
        from flows.pool import deploy

        print(
            f"stage deployments on work pool {cfg.infra.training_pool!r}: {', '.join(deploy(cfg.infra.training_pool))}"
        )
    stop = asyncio.Event()

    runner = runner_with_own_sigterm(lambda: loop.call_soon_threadsafe(stop.set))(pause_on_shutdown=True)
    runner.add_deployment(deployment(cfg, overrides))
    if (ingest := ingest_traces_deployment(cfg)) is not None:
        runner.add_deployment(ingest)
    if (check := canary_check_deployment(cfg)) is not None:
        runner.add_deployment(check)

    async def main() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        started = asyncio.create_task(runner.start())
        print(
            f"deployment retrain-service/{DEPLOYMENT} registered; waiting for scheduled or triggered runs", flush=True
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():  # the runner ended by itself: an error
            stopping.cancel()
            return started.result()
        print(
            "stopping: no new runs; a run in flight is cancelled (it resumes from its checkpoints next time)",
            flush=True,
        )

        async def shutdown() -> None:
            if runner.started:
                await runner.astop()
            await started  # leaving `async with runner` pauses the schedule

        try:
            await asyncio.wait_for(shutdown(), STOP_GRACE_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            print(f"the runner did not stop within {STOP_GRACE_S:g} s; exiting anyway", flush=True)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
