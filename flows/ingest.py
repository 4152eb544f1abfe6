"""Flow `ingest`: validate a batch, append it as a versioned shard, announce the new data version.

Emits the Prefect event `rlhf.data.updated` (payload: data_version, kind, shard, rows)
that the retrain deployment is triggered by. `traces_to_file`: the batch of `rlhf ingest --from-traces`, the
judged served answers the data does not hold yet (components/registry/feedback.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger
from prefect.events import emit_event
from prefect.states import Completed, Failed

from components.config import Config
from components.data.ingest import IngestRefused, IngestResult, ingest
from components.data.versioning import DataVersionError
from components.registry.feedback import DAY_MS, TraceHarvest, day_of
from service import lifecycle
from service.redaction import config_flow

DATA_UPDATED = "rlhf.data.updated"


@dataclass
class HarvestState:
    """What `rlhf ingest --from-traces` remembers between harvests (<state dir>/traces/harvest.json): where the next
    scan starts (answers older than the feedback window are settled), the rows deferred by a rater's limit (taken
    again next time, whatever their age), the rows the data suite refused (with their rules: never retried, so one
    bad row never stalls the scheduled ingest), and each rater's votes landed per day (the daily limit)."""

    path: Path
    settled_ms: int = 0
    deferred: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)
    landed: dict[str, dict[str, int]] = field(default_factory=dict)  # UTC day -> rater -> votes

    @classmethod
    def load(cls, cfg: Config) -> HarvestState:
        path = cfg.state_path / "traces" / "harvest.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        return cls(path, doc["settled_ms"], doc["deferred"], doc["refused"], doc["landed"])

    def save(self) -> None:
        """Write it, merged with what another process saved since this one loaded it (a forget's refusals and a
        harvest's may land at once): `refused` is their union, the rest is this one's. Under a file lock."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.refused = {**json.loads(self.path.read_text())["refused"], **self.refused}
            except FileNotFoundError:
                pass
            tmp = self.path.with_suffix(".tmp")
            doc = {k: getattr(self, k) for k in ("settled_ms", "deferred", "refused", "landed")}
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(self.path)


@dataclass
class TraceBatch:
    """A harvest written as a feedback batch, and what to remember once the ingest has taken it."""

    path: Path | None
    harvest: TraceHarvest
    state: HarvestState
    scanned_to_ms: int  # answers older than this minus the window are settled after this batch

    def landed(self, result: IngestResult | None) -> None:
        """After the ingest (None: there was nothing to ingest): count the rows that landed against their raters'
        day, remember what the suite refused, keep the deferred rows for the next harvest."""
        h, state = self.harvest, self.state
        refused = _quarantined_ids(result.quarantine) if result is not None and result.quarantine else {}
        state.refused.update(refused)
        today = day_of()
        if result is not None and result.n_good:
            state.landed = {today: {r: n for r, n in h.ingested_today.items() if n}}
            for row in h.rows:  # a refused row's votes did not land
                if row["id"] in refused:
                    for rater in h.raters.get(row["id"], []):
                        state.landed[today][rater] -= 1
        state.deferred = list(h.deferred)
        state.settled_ms = max(state.settled_ms, self.scanned_to_ms)
        state.save()


def _quarantined_ids(quarantine: str) -> dict[str, list[str]]:
    """Row id -> the rules it broke, for each row of a quarantine file with an id."""
    from components.data.forget import quarantined_id

    out = {}
    for line in Path(quarantine).read_text().splitlines():
        if (row_id := quarantined_id(line)) is not None:
            out[row_id] = list(json.loads(line).get("rules") or [])
    return out


def traces_to_file(cfg: Config, since_ms: int | None = None) -> TraceBatch:
    """The judged served answers whose signatures verify and whose trace ids the feedback data does not hold yet, as
    a feedback JSONL under the state dir. Scans from the stored watermark (or `since_ms`): the answers served within
    the feedback window (registry.feedback.window_days), plus the rows deferred last time."""
    from components import tracking
    from components.data.schemas import read_jsonl, shard_files
    from components.data.versioning import ensure_data
    from components.registry.feedback import Limits, harvest, scan
    from service import keys

    ensure_data(cfg)
    fb = cfg.registry.feedback
    state = HarvestState.load(cfg)
    known = {
        row["id"] for shard in shard_files(cfg.data_path / "feedback") for _, row in read_jsonl(shard, "feedback").rows
    }
    evals = {
        row["prompt"] for shard in shard_files(cfg.data_path / "eval") for _, row in read_jsonl(shard, "eval").rows
    }
    now_ms = int(time.time() * 1000)
    window_start = now_ms - int(fb.window_days * DAY_MS)
    start = since_ms if since_ms is not None else max(state.settled_ms, window_start)
    ring = keys.load(cfg)
    from service import raters

    revoked = {r.name for r in raters.read(raters.raters_path(cfg)).values() if r.revoked is not None}
    experiments = tracking.trace_experiments(cfg)  # the serving experiment, and the training one's older traces
    judged, unsigned, skipped = scan(experiments, ring.verifying(), start, fb.page_size, state.deferred, revoked)
    limits = Limits(fb.votes_per_rater_per_day, fb.max_rater_share, fb.min_raters, cfg.data.max_prompt_chars)
    h = harvest(judged, known | set(state.refused), evals, limits, state.landed.get(day_of(now_ms), {}))
    h.unsigned, h.skipped_votes = unsigned, skipped
    batch = TraceBatch(None, h, state, window_start)
    if h.rows:
        batch.path = cfg.state_path / "traces" / f"feedback-{time.strftime('%Y%m%d-%H%M%S')}-{len(h.rows)}.jsonl"
        batch.path.parent.mkdir(parents=True, exist_ok=True)
        batch.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in h.rows))
    return batch


def harvest_summary(h: TraceHarvest, experiment: str) -> list[str]:
    """What a harvest found, left out and deferred, and who contributed: lines for the CLI and the flow's log."""
    lines = [
        f"traces: {h.judged} judged answer(s) in experiment {experiment!r} with signatures that verify; "
        f"{h.known} already in the data or refused before, {h.ties} tied (left out), {len(h.rows)} new"
    ]
    left = {
        "empty answer(s)": h.empty,
        "repeat(s) of an earlier judged answer": h.repeats,
        "answer(s) to a frozen eval prompt": h.eval_prompts,
        "prompt(s) over data.max_prompt_chars": h.too_long,
    }
    if any(left.values()):
        lines.append("  left out: " + ", ".join(f"{n} {what}" for what, n in left.items() if n))
    if h.unsigned:
        lines.append("  answers not counted: " + ", ".join(f"{n} {why}" for why, n in sorted(h.unsigned.items())))
    if h.skipped_votes:
        lines.append("  votes not counted: " + ", ".join(f"{n} {why}" for why, n in sorted(h.skipped_votes.items())))
    if h.deferred:
        lines.append(
            f"  deferred to a later harvest: {len(h.deferred)} row(s) over a rater's limit "
            "(registry.feedback.votes_per_rater_per_day, max_rater_share)"
        )
    if h.contributors:
        lines.append("  raters of the new rows: " + ", ".join(f"{r} {n}" for r, n in h.contributors.most_common()))
    return lines


def announce(cfg: Config, before: str, after: str, kind: str, shard: str | None, rows: int, **extra) -> None:
    """The Prefect event `rlhf.data.updated` for a new data version of this project (what triggers the retrain)."""
    payload = {"data_version": after, "previous_version": before, "kind": kind, "shard": shard, "rows": rows, **extra}
    emit_event(event=DATA_UPDATED, resource=data_resource(cfg), payload=payload)


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
        announce(cfg, result.version_before, result.version_after, kind, result.shard, result.n_good)
        log.info("emitted %s (data version %s)", DATA_UPDATED, result.version_after)
    return Completed(data=result, message=f"ingested {result.n_good} row(s), quarantined {result.n_bad}")
