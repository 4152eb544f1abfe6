"""Crash safety of the service: each flow run and MLflow run records its owner process, and what a dead
process left behind (Running flow runs, RUNNING MLflow runs) is ended by the next command. The retrain
slot that builds on this is in service/slot.py.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from components.config import Config
from components.owner import Owner

PROJECT_FLOWS = ("retrain", "retrain-service", "ingest")
OWNER_LABEL, PROJECT_LABEL = "rlhf.owner", "rlhf.project"


def project_id(cfg: Config) -> str:
    """Stable per project, usable in Prefect names: `<name>-<hash>`. With a tracking server (an http(s) URI) the
    project is what its retrains promote into, the registered model on that server: two orchestrators in two state
    dirs (or on two machines) share one retrain slot. Otherwise it is the state dir (its own MLflow store)."""
    uri = cfg.tracking.uri or ""
    if uri.startswith(("http://", "https://")):
        where = re.sub(r"//[^/@]*@", "//", uri.rstrip("/"))  # credentials in the URI are not part of the identity
        name, key = cfg.tracking.registered_model_name, f"{where}|{cfg.tracking.registered_model_name}"
    else:
        name, key = cfg.root_path.name, str(cfg.state_path.resolve())
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "project"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def slot_name(cfg: Config) -> str:
    return "rlhf_retrain_slot_" + project_id(cfg).replace("-", "_")


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _current_flow_run() -> tuple[str, str]:
    from prefect.runtime import flow_run

    return str(flow_run.id or ""), str(flow_run.name or "")


def claim_run(cfg: Config) -> None:
    """Label the current flow run with its owner process and project, so a later command can tell
    whether it is still alive (`reap_orphans`)."""
    run_id, _ = _current_flow_run()
    if run_id:
        with _client() as client:
            client.update_flow_run_labels(
                uuid.UUID(run_id), {OWNER_LABEL: str(Owner.me()), PROJECT_LABEL: project_id(cfg)}
            )


def mlflow_owner_tags() -> dict[str, str]:
    """Tags for every MLflow run a flow starts: who owns it, so an orphan can be ended."""
    run_id, _ = _current_flow_run()
    return {OWNER_LABEL: str(Owner.me()), "rlhf.flow_run_id": run_id}


# ----------------------------------------------------------------------------------------
# Orphans: what a dead process left running
# ----------------------------------------------------------------------------------------
def _final_state(flow_run_id: str) -> str | None:
    if not flow_run_id:
        return None
    from prefect.exceptions import ObjectNotFound

    try:
        with _client() as client:
            run = client.read_flow_run(uuid.UUID(flow_run_id))
    except ObjectNotFound:
        return None
    return run.state.name if run.state is not None and run.state.is_final() else None


def _crash_flow_run(flow_run_id: str, message: str) -> None:
    from prefect.states import Crashed

    with _client() as client:
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        if run.state is not None and not run.state.is_final():
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)


def _cancel_stage_runs(client, parent_ids: list[str]) -> list[str]:
    """Stages a crashed retrain dispatched to a work pool (its subflow runs) would train on for nobody: ask
    their workers to stop them (Cancelling; the worker kills the process). The next retrain resumes them."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Cancelled, Cancelling

    if not parent_ids:
        return []
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(i) for i in parent_ids])
        ),
        limit=200,
    )
    done = []
    for run in children:
        if run.state is None or run.state.is_final() or run.state.is_cancelling():
            continue
        waiting = run.state.is_scheduled()  # no worker has it yet: nothing to stop
        state = (Cancelled if waiting else Cancelling)(message="the retrain that started it crashed")
        client.set_flow_run_state(run.id, state, force=True)
        done.append(f"stage flow run {run.name} ({run.id}) {run.state_name} -> {state.name}: its retrain crashed")
    return done


def _unfinished_runs(client) -> list:
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    live = [StateType.RUNNING, StateType.PAUSED, StateType.PENDING, StateType.CANCELLING]
    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=list(PROJECT_FLOWS))),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))),
        limit=200,
    )


def reap_orphans(cfg: Config, say: Callable[[str], None]) -> list[str]:
    """End what dead processes of this project left unfinished: Prefect flow runs -> Crashed (which also
    gives back a deployment's concurrency slot), MLflow runs -> KILLED with the tag `rlhf.ended_because`.
    Only records whose owner is known to be dead are touched. Needs MLflow tracking set up."""
    import mlflow
    from mlflow.entities import RunStatus

    me, done = _current_flow_run()[0], []
    dead_runs: dict[str, str] = {}
    with _client() as client:
        for run in _unfinished_runs(client):
            owner = Owner.parse(run.labels.get(OWNER_LABEL) or run.infrastructure_pid)
            ours = run.labels.get(PROJECT_LABEL) in (None, project_id(cfg))
            began = run.start_time.timestamp() if run.start_time else None
            if str(run.id) == me or owner is None or not ours or owner.alive(began_by=began) is not False:
                continue
            why = f"its process ({owner.describe()}) ended without finishing the run (crash, SIGKILL or OOM)"
            _crash_flow_run(str(run.id), f"crashed: {why}; found by {Owner.me().describe()}")
            dead_runs[str(run.id)] = why
            done.append(f"flow run {run.name} ({run.id}) {run.state_name} -> Crashed: {why}")
        done += _cancel_stage_runs(client, list(dead_runs))

    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        tracker = mlflow.MlflowClient()
        for run in tracker.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=500):
            owner = Owner.parse(run.data.tags.get(OWNER_LABEL))
            flow_run_id = run.data.tags.get("rlhf.flow_run_id", "")
            if owner is None:
                continue
            alive = owner.alive()
            why = (
                f"its process ({owner.describe()}) ended without finishing the run (crash, SIGKILL or OOM)"
                if alive is False
                else dead_runs.get(flow_run_id)
                or (f"its flow run ended ({state})" if alive is None and (state := _final_state(flow_run_id)) else None)
            )
            if why is None:
                continue
            tracker.set_tag(
                run.info.run_id,
                "rlhf.ended_because",
                f"{why}; found by {Owner.me().describe()} at {_when(time.time())}",
            )
            tracker.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            done.append(f"MLflow run {run.info.run_name} ({run.info.run_id}) RUNNING -> KILLED: {why}")
    for line in done:
        say(f"cleaned up after a crash: {line}")
    return done
