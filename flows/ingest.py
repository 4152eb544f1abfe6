"""Flow `ingest`: validate a batch, append it as a versioned shard, announce the new data version.

Emits the Prefect event `rlhf.data.updated` (payload: data_version, kind, shard, rows)
that the retrain deployment is triggered by.
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
from service import lifecycle
from service.redaction import config_flow

DATA_UPDATED = "rlhf.data.updated"


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
