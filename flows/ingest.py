"""Flow `ingest`: validate a batch, append it as a versioned shard, announce the new data version.

Emits the Prefect event `rlhf.data.updated` (payload: data_version, kind, shard, rows)
that the retrain deployment is triggered by. `traces_to_file`: the batch of `rlhf ingest --from-traces`, the
judged served answers the data does not hold yet (components/registry/feedback.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import get_run_logger
from prefect.events import emit_event
from prefect.states import Completed, Failed

from components.config import Config
from components.data.ingest import IngestRefused, IngestResult, ingest
from components.data.versioning import DataVersionError
from components.registry.feedback import TraceHarvest, feedback_rows
from service import lifecycle
from service.redaction import config_flow

DATA_UPDATED = "rlhf.data.updated"


def traces_to_file(cfg: Config, since_ms: int | None = None) -> tuple[Path | None, TraceHarvest]:
    """The judged served answers (since `since_ms`) whose trace ids the feedback data does not hold yet, as a
    feedback JSONL under the state dir: -> (its path, or None when there are none; what was found)."""
    import json
    import time

    from components import tracking
    from components.data.schemas import read_jsonl, shard_files
    from components.data.versioning import ensure_data

    ensure_data(cfg)
    known = {
        row["id"] for shard in shard_files(cfg.data_path / "feedback") for _, row in read_jsonl(shard, "feedback").rows
    }
    harvest = feedback_rows(tracking.setup(cfg), known, since_ms)
    if not harvest.rows:
        return None, harvest
    path = cfg.state_path / "traces" / f"feedback-{time.strftime('%Y%m%d-%H%M%S')}-{len(harvest.rows)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in harvest.rows))
    return path, harvest


def data_resource(cfg: Config) -> dict[str, str]:
    """The project's data as a Prefect event resource; the id is unique per data dir (name + path hash)."""
    digest = hashlib.sha256(str(cfg.data_path.resolve()).encode()).hexdigest()[:8]
    return {
        "prefect.resource.id": f"rlhf.data.{cfg.root_path.name}-{digest}",
        "prefect.resource.name": str(cfg.data_path),
    }


@config_flow(name="ingest", log_prints=True, validate_parameters=False)
def ingest_flow(cfg: Config, file: str, kind: str, quarantine: bool = False):
    log = get_run_logger()
    lifecycle.claim_run(cfg)  # a killed ingest's flow run is ended as Crashed by the next command
    try:
        result: IngestResult = ingest(cfg, Path(file), kind, quarantine, on_step=lambda s: log.info("ingest: %s", s))
    except (IngestRefused, DataVersionError) as e:
        problems = len(e.report.findings) if isinstance(e, IngestRefused) and e.report else 1
        log.error("%s", e)
        return Failed(message=f"ingest refused: {problems} problem(s) in {file}", data=str(e))
    if result.quarantine:
        log.warning("%d bad row(s) quarantined to %s\n%s", result.n_bad, result.quarantine, result.report)
    if result.changed:
        emit_event(
            event=DATA_UPDATED,
            resource=data_resource(cfg),
            payload={
                "data_version": result.version_after,
                "previous_version": result.version_before,
                "kind": kind,
                "shard": result.shard,
                "rows": result.n_good,
            },
        )
        log.info("emitted %s (data version %s)", DATA_UPDATED, result.version_after)
    return Completed(data=result, message=f"ingested {result.n_good} row(s), quarantined {result.n_bad}")
