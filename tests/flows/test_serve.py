"""`rlhf serve`'s deployment, registered on the session's Prefect test server: cron schedule from
config, a trigger on rlhf.data.updated, one run at a time, the overrides as its parameter."""
import asyncio

import pytest

from components.config import compose
from flows.ingest import DATA_UPDATED
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
    assert automations[0].actions[0].parameters == {"overrides": overrides}


def test_no_schedule_and_no_trigger_when_configured_off(tmp_path):
    overrides = [f"root={tmp_path}", "infra.retrain_cron=null", "infra.retrain_on_new_data=false"]
    d = deployment(compose(overrides), overrides)
    assert d.schedules in (None, []) and d.triggers == []
