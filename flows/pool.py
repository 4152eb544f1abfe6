"""The training pool's side: one Prefect flow per stage (what a worker runs), their deployments, the worker.

    rlhf deploy [--pool gpu]      work pool (type process) + deployments stage-<stage>/<pool>
    rlhf worker [--pool gpu]      a Prefect process worker for the pool, state in RLHF_WORKER_DIR (default .)

The deployments' entrypoints are module paths (`flows.pool.sft_stage`): a worker runs the code installed in
its own environment (the trainer image), never files of the orchestrator. For docker and kubernetes pools
see dockerfiles/README.md (base job templates that request a GPU).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path

from prefect import flow

from flows import stages
from flows.dispatch import deployment_name, run_request

DEFAULT_POOL = "gpu"


@flow(name="stage-base", validate_parameters=False)
def base_stage(request: dict) -> dict:
    return run_request(request, stages.demo_base)


@flow(name="stage-sft", validate_parameters=False)
def sft_stage(request: dict) -> dict:
    return run_request(request, stages.sft.fn)


@flow(name="stage-reward-model", validate_parameters=False)
def reward_model_stage(request: dict) -> dict:
    return run_request(request, stages.reward_model.fn)


@flow(name="stage-ppo", validate_parameters=False)
def ppo_stage(request: dict) -> dict:
    return run_request(request, stages.ppo.fn)


@flow(name="stage-rejection-sampling", validate_parameters=False)
def rejection_sampling_stage(request: dict) -> dict:
    return run_request(request, stages.rejection_sampling.fn)


@flow(name="stage-grpo", validate_parameters=False)
def grpo_stage(request: dict) -> dict:
    return run_request(request, stages.grpo.fn)


@flow(name="stage-rloo", validate_parameters=False)
def rloo_stage(request: dict) -> dict:
    return run_request(request, stages.rloo.fn)


@flow(name="stage-dpo", validate_parameters=False)
def dpo_stage(request: dict) -> dict:
    return run_request(request, stages.dpo.fn)


@flow(name="stage-kto", validate_parameters=False)
def kto_stage(request: dict) -> dict:
    return run_request(request, stages.kto.fn)


@flow(name="stage-evaluate", validate_parameters=False)
def evaluate_stage(request: dict) -> dict:
    return run_request(request, stages.evaluate.fn)


STAGE_FLOWS = {
    "base": base_stage,
    "sft": sft_stage,
    "reward-model": reward_model_stage,
    "ppo": ppo_stage,
    "rejection-sampling": rejection_sampling_stage,
    "grpo": grpo_stage,
    "rloo": rloo_stage,
    "dpo": dpo_stage,
    "kto": kto_stage,
    "evaluate": evaluate_stage,
}


# The process pool's job template, locked: Prefect's default lets every flow run set `command`, `env` and
# `working_dir` through job variables, so any caller of the Prefect API could run a shell command on a worker, or point
# it at their own keyring (RLHF_SIGNING_KEYS) or tracking server. Here no variable exists and nothing is templated:
# the worker runs Prefect's engine with its own environment, whatever a run asks for.
LOCKED_TEMPLATE: dict = {
    "job_configuration": {"stream_output": True},
    "variables": {"type": "object", "properties": {}},
}


def ensure_pool(pool: str) -> str | None:
    """The work pool, as a `process` pool with LOCKED_TEMPLATE when it does not exist yet. An existing process pool
    still on Prefect's default template (made by an earlier version) is locked; one with a template of the operator's,
    and docker and kubernetes pools, are kept as their operators set them up. -> what was done, or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=LOCKED_TEMPLATE))
                return f"created work pool {pool!r} (process, job variables locked)"
            except ObjectAlreadyExists:  # another process created it meanwhile
                return None
        if existing.type == "process" and existing.base_job_template == ProcessWorker.get_default_base_job_template():
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=LOCKED_TEMPLATE))
            return f"locked the job variables of work pool {pool!r} (Prefect's default let a run set its command)"
    return None


@functools.cache  # once per process: deployments are upserted, a worker may run older code until restarted
def ensure_deployed(pool: str) -> None:
    """The stage deployments on `pool`, upserted once per process by the flow that dispatches to it (retrain,
    sweep) before its first stage: dispatch itself only submits runs (it cannot import this module, which imports
    the stages, which import dispatch)."""
    deploy(pool)


def deploy(pool: str = DEFAULT_POOL) -> list[str]:
    """Create or update the stage deployments on `pool`; returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    ensure_pool(pool)
    names = []
    with get_client(sync_client=True) as client:
        for stage, stage_flow in STAGE_FLOWS.items():
            flow_id = client.create_flow_from_name(stage_flow.name)
            client.create_deployment(
                flow_id,
                name=pool,
                work_pool_name=pool,
                entrypoint=f"{__name__}.{stage_flow.fn.__name__}",
                parameter_openapi_schema=parameter_schema(stage_flow.fn).model_dump_for_openapi(),
                enforce_parameter_schema=False,
                pull_steps=[],
                description=f"rlhf-ops stage {stage} (dispatched by the retrain flow when infra.training_pool={pool})",
                tags=["rlhf", f"stage:{stage}"],
            )
            names.append(deployment_name(stage, pool))
    return names


def worker_argv(pool: str, name: str | None, limit: int) -> list[str]:
    prefect = str(Path(sys.executable).parent / "prefect")
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    return [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--limit", str(limit)]
