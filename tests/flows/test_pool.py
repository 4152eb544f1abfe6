"""The training pool's job template (issue 38, found in review): Prefect's default process-pool template lets every
flow run set `command`, `env` and `working_dir` through job variables, so any caller of the Prefect API could run a
shell command on a worker or point it at a keyring of their own. The pool rlhf-ops makes is locked."""

import asyncio

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

ATTACK = {"command": "sh -c 'touch /tmp/pwned'", "env": {"RLHF_SIGNING_KEYS": "/tmp/mine.json"}, "working_dir": "/"}


def job_config(pool: str):
    from prefect.client.orchestration import get_client
    from prefect.workers.process import ProcessJobConfiguration

    with get_client(sync_client=True) as client:
        template = client.read_work_pool(pool).base_job_template
    return asyncio.run(ProcessJobConfiguration.from_template_and_values(template, ATTACK))


def test_a_runs_job_variables_cannot_set_the_workers_command_env_or_directory():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from flows.pool import ensure_pool

    assert "created" in ensure_pool("locked-pool")
    cfg = job_config("locked-pool")
    assert (cfg.command, cfg.env, cfg.working_dir) == (None, {}, None)
    # a pool an earlier version made with Prefect's default template is locked on the next deploy
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name="old-pool", type="process", base_job_template=ProcessWorker.get_default_base_job_template()
            )
        )
    assert job_config("old-pool").command == ATTACK["command"], "the default template runs what the run asks"
    assert "locked" in ensure_pool("old-pool")
    assert job_config("old-pool").command is None
