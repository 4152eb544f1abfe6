"""`rlhf serve`'s deployment, registered on the session's Prefect test server: cron schedule from
config, a trigger on rlhf.data.updated, one run at a time, the overrides as its parameter."""
import asyncio

import pytest

from components.config import compose
from flows.ingest import DATA_UPDATED, data_resource
from flows.serve import DEPLOYMENT, deployment

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_deployment_has_schedule_trigger_and_concurrency_limit(tmp_path):
    overrides = [f"root={tmp_path}", "data=demo_small", "infra.retrain_cron=15 4 * * *"]
    d = deployment(compose(overrides), overrides)
    deployment_id = d.apply()

    async def read():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            dep = await client.read_deployment(deployment_id)
            automations = await client.read_automations_by_name(f"retrain on new data")
            return dep, automations

    dep, automations = asyncio.run(read())
    assert dep.name == DEPLOYMENT and dep.parameters == {"overrides": overrides}
    assert [s.schedule.cron for s in dep.schedules] == ["15 4 * * *"]
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert automations and DATA_UPDATED in automations[0].trigger.expect
    # only this project's data events: the resource id ingest emits for this data dir
    assert automations[0].trigger.match.model_dump()["prefect.resource.id"] == \
        data_resource(compose(overrides))["prefect.resource.id"]
    assert automations[0].actions[0].parameters == {"overrides": overrides}


def test_no_schedule_and_no_trigger_when_configured_off(tmp_path):
    overrides = [f"root={tmp_path}", "infra.retrain_cron=null", "infra.retrain_on_new_data=false"]
    d = deployment(compose(overrides), overrides)
    assert d.schedules in (None, []) and d.triggers == []


def test_an_ingest_event_runs_the_served_deployment(tmp_path):
    """`rlhf serve` in its own process against the test server; `ingest` emits rlhf.data.updated; the
    automation starts the deployment; the served process runs the retrain, which registers a champion."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL

    from components.data.versioning import data_version, ensure_data
    from components.tracking import tracking_uri
    from components.registry.registry import CHAMPION, alias_version
    from flows.ingest import ingest_flow
    from tests.conftest import FAST_STAGES, OPEN_GATE, make_project

    root = tmp_path / "proj"
    overrides = [f"root={root}", "data=demo_small", *FAST_STAGES, "infra.retrain_cron=null",
                 f"infra.prefect_api_url={PREFECT_API_URL.value()}", "tracking.registered_model_name=served-test",
                 *OPEN_GATE]
    project = make_project(root, *overrides[1:])
    ensure_data(project)  # `rlhf data`: the demo data, versioned

    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(Path(sys.executable).with_name("rlhf")), "serve", *overrides], stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 120
            while True:  # the served process registers the deployment and its automation
                try:
                    dep = client.read_deployment_by_name(f"retrain-service/{DEPLOYMENT}")
                    if dep.parameters == {"overrides": overrides} and client.read_automations_by_name("retrain on new data"):
                        break
                except Exception:
                    pass
                assert serve.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
            time.sleep(3)  # let the server's trigger service load the new automation

            batch = tmp_path / "batch.jsonl"
            batch.write_text("".join(json.dumps({"id": f"served-{i}", "prompt": f"A served prompt {i}",
                                                 "chosen": f"a lovely answer {i}", "rejected": f"a bad answer {i}"}) + "\n"
                                     for i in range(5)))
            assert ingest_flow(project, str(batch), "preferences", return_state=True).is_completed()
            version = data_version(root)

            deadline = time.time() + 420
            while True:  # the triggered run, executed by the served process
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                if runs and runs[0].state.is_final():
                    break
                assert serve.poll() is None and time.time() < deadline, \
                    f"runs: {[(r.name, r.state_name) for r in runs]}\n" + (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(2)
        (run,) = runs  # no cron: the event was the only thing that started it
        assert run.state.is_completed(), f"{run.state.message}\n" + (tmp_path / "serve.log").read_text()[-3000:]
        assert run.parameters == {"overrides": overrides}
        serve.send_signal(signal.SIGTERM)  # as a service manager stops it: a clean exit
        assert serve.wait(timeout=10) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert "stopped serving" in (tmp_path / "serve.log").read_text()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()
    mlflow.set_tracking_uri(tracking_uri(project))
    assert alias_version("served-test", CHAMPION) == "1"
    assert mlflow.MlflowClient().get_model_version("served-test", "1").tags["data_version"] == version


@pytest.fixture(scope="module")
def quiet_project(tmp_path_factory):
    """One project for the stop tests (its temporary Prefect server migrates its database once)."""
    from tests.conftest import make_project

    root = tmp_path_factory.mktemp("serve-stop") / "proj"
    make_project(root)
    return root


@pytest.mark.parametrize("server", ["shared", "temporary"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_stops_within_10s_on_sigterm_and_sigint(quiet_project, tmp_path, server, sig):
    """A service manager's stop (SIGTERM) or Ctrl-C (SIGINT): exit 0 within 10 s, schedule paused. Prefect's
    own SIGTERM handling had `rlhf serve` run on after SIGTERM (issue 10)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    overrides = [f"root={quiet_project}", "data=demo_small", "infra.retrain_cron=0 3 * * *"]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    if server == "shared":
        overrides.append(f"infra.prefect_api_url={PREFECT_API_URL.value()}")
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("rlhf")), "serve", *overrides], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "waiting for scheduled or triggered runs" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1)  # the runner is polling
        sent = time.time()
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=10)
        took = time.time() - sent
        assert code == 0, log_path.read_text()[-3000:]
        assert "stopped serving" in log_path.read_text() and "paused" in log_path.read_text()
        print(f"{server} server, {sig}: exited in {took:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
