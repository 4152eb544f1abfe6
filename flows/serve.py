"""`rlhf serve`: the retrain flow as a long-lived Prefect deployment (`Flow.serve`).

- schedule: `infra.retrain_cron` (default nightly at 03:00);
- trigger: every `rlhf.data.updated` event that `rlhf ingest` emits for this project's data
  (`infra.retrain_on_new_data`);
- at most one retrain at a time (deployment concurrency limit 1; later runs queue).

The deployment's parameter is the list of Hydra overrides, so a scheduled or triggered run
composes the same config as `rlhf run <overrides>`. Events reach the deployment only through a
server both processes share: run `prefect server start` (or `infra=server`) and point
`infra.prefect_api_url` / PREFECT_API_URL at it.
"""
from __future__ import annotations

from prefect import flow

from components.config import Config, compose
from flows.env import configure_environment
from flows.ingest import DATA_UPDATED, data_resource
from flows.retrain import retrain

DEPLOYMENT = "rlhf-retrain"


@flow(name="retrain-service", validate_parameters=False)
def retrain_service(overrides: list[str] | None = None):
    """Compose the config from overrides, then run `retrain` as a subflow."""
    cfg = compose(list(overrides or []))
    configure_environment(cfg)
    return retrain(cfg, return_state=True)


def deployment(cfg: Config, overrides: list[str]):
    from prefect.events import DeploymentEventTrigger

    # only this project's data: events from other projects on a shared server do not retrain this one
    triggers = [DeploymentEventTrigger(name="retrain on new data", expect={DATA_UPDATED},
                                       match={"prefect.resource.id": data_resource(cfg)["prefect.resource.id"]},
                                       parameters={"overrides": overrides})] if cfg.infra.retrain_on_new_data else []
    return retrain_service.to_deployment(
        name=DEPLOYMENT, cron=cfg.infra.retrain_cron, parameters={"overrides": overrides}, triggers=triggers,
        concurrency_limit=1, description="validate -> SFT -> RM -> PPO -> evaluate -> gate -> register -> promote",
        tags=["rlhf", cfg.model.name])


def serve(cfg: Config, overrides: list[str]) -> None:
    """`prefect.serve` of the deployment until Ctrl-C or SIGTERM (both: pause the schedule, exit 0)."""
    import asyncio
    import os
    import signal

    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *args, **kwargs):
            # Prefect 3.8's handler deadlocks (it waits, inside the signal handler, on the event loop the
            # handler interrupted); take the Ctrl-C path instead, which shuts down cleanly
            os.kill(os.getpid(), signal.SIGINT)

    runner = _Runner(pause_on_shutdown=True)
    runner.add_deployment(deployment(cfg, overrides))
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
