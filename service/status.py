"""What `rlhf status` shows: who holds the retrain slot (and whether it is alive), and the last retrains
with their outcomes in Prefect and MLflow."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from components.config import Config
from service.lifecycle import PROJECT_LABEL, _client, project_id
from service.slot import RetrainSlot


# ----------------------------------------------------------------------------------------
def status_lines(cfg: Config, last: int = 10) -> list[str]:
    import mlflow
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    slot = RetrainSlot(cfg, say=lambda _: None)
    holder = slot.read()
    lines = [f"retrain slot {slot.name}:"]
    if holder is None:
        lines.append("  free")
    else:
        reason = slot.verdict(holder)
        lines.append(f"  held by {holder.describe()}; last heartbeat {time.time() - holder.heartbeat:.0f} s ago")
        lines.append(f"  {'STALE: ' + reason + ' (the next retrain frees it)' if reason else 'holder alive'}")
    with _client() as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=last * 3,
        )
    runs = [r for r in runs if r.labels.get(PROJECT_LABEL) in (None, project_id(cfg))][:last]
    lines.append(f"last {len(runs)} retrain flow runs (Prefect):")
    for r in runs:
        start = r.start_time.strftime("%Y-%m-%d %H:%M:%S") if r.start_time else "not started"
        message = (r.state.message or "").splitlines()[0][:100] if r.state and r.state.message else ""
        lines.append(f"  {start}  {r.state_name:<10} {r.name:<24} {message}")
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    parents = (
        mlflow.MlflowClient().search_runs(
            [experiment.experiment_id],
            "tags.pipeline = 'retrain'",
            order_by=["attributes.start_time DESC"],
            max_results=last,
        )
        if experiment
        else []
    )
    lines.append(f"last {len(parents)} retrain runs (MLflow, experiment {cfg.tracking.experiment}):")
    for r in parents:
        start = datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"  {start}  {r.info.status:<9} {r.info.run_id[:8]}  data {r.data.tags.get('data_version', '?')[:8]}  "
            f"{r.data.tags.get('outcome', r.data.tags.get('rlhf.ended_because', ''))[:90]}"
        )
    return lines
