"""Flow `forget`: remove a rater's, a trace's or a user's rows from the data as a new data version (issue 38, item 6).

    forget(cfg, selector, reason, purge)    the work: MLflow look-up, new DVC version, record, purge (no Prefect)
    forget_flow(...)                        `rlhf forget`: the same as a flow run, and the `rlhf.data.updated` event
    summary(result)                         what it did and what a retrain must do next, for the CLI and the log

Which rows: the `feedback` rows of `rlhf ingest --from-traces` carry their MLflow trace id as their id. `--trace` names
them; `--rater` is every trace of the project's experiment that carries a `thumbs` vote (MLflow feedback assessment,
source HUMAN) with that rater's name as its source id, valid or not; `--user` every trace tagged `rlhf.user` with that
id. The rows leave the data as a new data version, made as an ingest makes one: under the data lock, from a clean
data/, journaled (a kill is rolled back by the next command to the recorded version, and data/ is then refused until
`dvc checkout --force data.dvc`; a failure is rolled back at once), `dvc add` + `dvc push`. A shard that loses rows is
rewritten without them (tmp + fsync + rename), one left empty is deleted. The traces go to the harvest's refused set
first (reason "forgotten"), so `rlhf ingest --from-traces` never takes them again, even if the commit fails.

A record of what was removed and why (who, when, the selector, the reason, the removed ids - never a prompt or a
response -, the data versions before and after, the shards rewritten, what was purged) goes to
`<state>/forget/<time>-<selector>.json` and to an MLflow run named `forget` (tags `selector`, `reason`; the record as
the artifact `forget.json`).

`purge=True` also deletes the traces' `thumbs` votes (only the rater's own for `--rater`), and every shard object of
the DVC cache and remote that holds a removed row (read from the data versions' `.dir` listings in the local cache:
the old shards' md5, computed from the files before they are rewritten, and those of earlier versions), the retrain
snapshots of the data versions that held them, and the rows' copies in the harvest batches and the quarantine under the
state dir. Those older data versions can no longer be restored whole; the summary names them.

Not reached: the traces themselves (the served prompt and answer stay in MLflow), a rater's later votes (`rlhf raters
revoke`), snapshots on other machines (a worker's `<state>/snapshots`), and a harvest running at the same moment, which
saves the refused set it loaded before the forget (run the forget again after it: the rows are found again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import get_run_logger
from prefect.states import Completed, Failed

from components import tracking
from components.config import Config
from components.data.forget import (
    BadSelector,
    History,
    Selector,
    ShardEdit,
    drop_rows,
    ids_in,
    quarantined_id,
    selector,
    shard_objects,
    version_range,
    versions_holding,
)
from components.data.schemas import read_jsonl, shard_files
from components.data.versioning import (
    DVC_FILE,
    DataVersionError,
    Dvc,
    _journal,
    _rollback,
    _write_durably,
    add_and_push,
    data_lock,
    data_version,
    open_repo,
    require_clean,
)
from components.owner import Owner
from components.registry.feedback import FEEDBACK, SOURCE
from flows.ingest import DATA_UPDATED, HarvestState, announce
from service import lifecycle
from service.redaction import config_flow

FORGOTTEN = "forgotten"  # the reason in the harvest's refused set
USER_TAG = "rlhf.user"  # a trace's user (issue 41 records it)
KIND = "feedback"
PAGE = 500


class ForgetRefused(Exception):
    """Nothing to forget, or nothing that can be: one sentence; nothing was changed."""


@dataclass
class Purged:
    votes: int = 0  # `thumbs` assessments deleted
    objects: list[str] = field(default_factory=list)  # shard objects (md5) deleted from the cache or the remote
    from_cache: int = 0
    from_remote: int = 0
    incomplete: list[str] = field(default_factory=list)  # data versions that now miss an object
    snapshots: list[str] = field(default_factory=list)  # retrain snapshots removed
    state_files: list[str] = field(default_factory=list)  # harvest batches and quarantine files cleaned
    problems: list[str] = field(default_factory=list)  # what could not be purged, one sentence each


@dataclass
class ForgetResult:
    selector: Selector
    reason: str
    by: str
    at: str  # UTC, ISO 8601
    experiment: str
    removed: list[str] = field(default_factory=list)  # row ids removed from the data
    refused: list[str] = field(default_factory=list)  # trace ids the harvest refuses from now on
    unknown: list[str] = field(default_factory=list)  # --trace ids neither in the data nor in MLflow
    undecidable: int = 0  # --rater: rows from traces that are no longer in MLflow (who voted cannot be told)
    version_before: str = ""
    version_after: str = ""
    rewritten: list[str] = field(default_factory=list)  # shards under data/
    deleted: list[str] = field(default_factory=list)
    old_objects: dict[str, str] = field(default_factory=dict)  # shard -> its md5 before the rewrite
    history: History = field(default_factory=History)
    unchecked_models: list[str] = field(default_factory=list)  # trained on a data version not in the local cache
    champion: str | None = None
    purged: Purged | None = None
    record: str = ""
    run_id: str | None = None

    @property
    def changed(self) -> bool:
        return self.version_after != self.version_before

    def as_record(self) -> dict:
        """The record: ids, versions and files only (no prompt, no response)."""
        return {
            "by": self.by,
            "at": self.at,
            "selector": self.selector.as_dict(),
            "reason": self.reason,
            "experiment": self.experiment,
            "removed_row_ids": self.removed,
            "refused_trace_ids": self.refused,
            "unknown_ids": self.unknown,
            "rows_undecidable": self.undecidable,
            "data_version_before": self.version_before,
            "data_version_after": self.version_after,
            "shards_rewritten": self.rewritten,
            "shards_deleted": self.deleted,
            "old_shard_md5": self.old_objects,
            "data_versions_that_held_them": self.history.versions,
            "registered_versions_trained_on_them": self.history.models,
            "registered_versions_unchecked": self.unchecked_models,
            "purge": asdict(self.purged) if self.purged is not None else None,
            "mlflow_run_id": self.run_id,
        }


# ---------------------------------------------------------------------------------------------- MLflow
def _thumbs(trace, rater: str | None = None) -> list[str]:
    """The ids of the trace's `thumbs` votes (source HUMAN), only `rater`'s when given."""
    out = []
    for a in getattr(trace.info, "assessments", None) or []:
        source = getattr(a, "source", None)
        if a.name != FEEDBACK or source is None or str(source.source_type) != "HUMAN":
            continue
        if rater is None or str(source.source_id) == rater:
            out.append(a.assessment_id)
    return out


def _search(experiment_id: str | list[str], filter_string: str) -> Iterator:
    """The experiment's traces that match, `PAGE` at a time (only what the caller keeps of each stays in memory)."""
    import mlflow

    client, token = mlflow.MlflowClient(), None
    while True:
        page = client.search_traces(
            locations=[experiment_id] if isinstance(experiment_id, str) else list(experiment_id),
            filter_string=filter_string,
            max_results=PAGE,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def find_traces(experiment_id: str | list[str], sel: Selector) -> tuple[dict[str, list[str]], set[str]]:
    """The traces of the experiment(s) the selector names -> (trace id -> the votes a purge deletes, every judged trace
    id seen: for --rater, a row whose trace is not among them cannot be decided)."""
    import mlflow

    if sel.kind == "trace":
        found = {}
        for trace_id in sel.values:
            with tracking.quiet("mlflow.tracing.fluent"):
                try:
                    trace = mlflow.get_trace(trace_id)
                except Exception:  # an id MLflow refuses to look up is not one of its traces
                    trace = None
            ids = [experiment_id] if isinstance(experiment_id, str) else experiment_id
            if trace is not None and trace.info.experiment_id in ids:
                found[trace_id] = _thumbs(trace)
        return found, set(found)
    if sel.kind == "user":
        traces = _search(experiment_id, f"tag.`{USER_TAG}` = '{sel.values[0]}'")
        return {t.info.trace_id: _thumbs(t) for t in traces}, set()
    found, seen = {}, set()
    for t in _search(experiment_id, f"feedback.{FEEDBACK} IS NOT NULL"):
        seen.add(t.info.trace_id)
        if votes := _thumbs(t, sel.values[0]):
            found[t.info.trace_id] = votes
    return found, seen


def _registered(cfg: Config, history: History) -> tuple[list[str], list[str], str | None]:
    """(the registered versions trained on a data version that held the rows (tag `data_version`), those trained on a
    data version whose listing is not in the local DVC cache (cannot be told), the champion's version)."""
    import mlflow

    name = cfg.tracking.registered_model_name
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    except Exception:  # no registry yet, or no such model
        return [], [], None
    versions = sorted(versions, key=lambda v: int(v.version))
    held, listed = set(history.versions), set(history.listed)
    trained = [str(v.version) for v in versions if v.tags.get("data_version") in held]
    unknown = [str(v.version) for v in versions if v.tags.get("data_version") not in listed]
    champion = next((str(v.version) for v in versions if "champion" in (v.aliases or [])), None)
    return trained, unknown, champion


# ---------------------------------------------------------------------------------------------- DVC
class _Store:
    """The DVC cache and remote of the project, as object stores (DVC's CLI has no command that deletes one object:
    its own object-database API does it, with the remote's configuration and credentials)."""

    def __init__(self, cfg: Config):
        from dvc.repo import Repo

        self.cfg = cfg
        self.repo = Repo(str(cfg.root_path))
        self.cache = self.repo.cache.local

    def listings(self) -> dict[str, list[dict]]:
        """Every data version whose `.dir` listing is in the local cache -> its entries {"md5", "relpath"}."""
        out = {}
        for path in Path(self.cache.path).glob("*/*.dir"):
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(entries, list):
                out[path.parent.name + path.name] = [e for e in entries if isinstance(e, dict)]
        return out

    def read(self, md5: str) -> str | None:
        path = Path(self.cache.oid_to_path(md5))
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def delete(self, md5: str, purged: Purged) -> None:
        if self.cache.exists(md5):
            self.cache.delete(md5)
            purged.from_cache += 1
        try:
            remote = self.repo.cloud.get_remote_odb(self.cfg.infra.dvc_remote_name)
            if remote.exists(md5):
                remote.delete(md5)
                purged.from_remote += 1
        except Exception as e:
            purged.problems.append(
                f"object {md5} could not be deleted from the DVC remote: {tracking.redact_url(str(e))}"
            )
        purged.objects.append(md5)

    def close(self) -> None:
        self.repo.close()


def _commit(cfg: Config, dvc: Dvc, edits: list[ShardEdit], on_step) -> str:
    """Rewrite the shards, `dvc add`, `dvc push`: the new data version. The caller holds the data lock. The ingest
    journal records data.dvc first, so a kill is rolled back by the next command; a failure here is rolled back at
    once, data/ checked out as data.dvc records it again."""
    folder = cfg.data_path / KIND
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dvc_file = cfg.root_path / DVC_FILE
    entry = {
        "shard": str(cfg.state_path / "staging" / f"forget-{stamp}"),  # nothing to unlink: the journal's data.dvc
        "data_dvc": dvc_file.read_text() if dvc_file.exists() else None,
        "started": time.time(),
        "owner": str(Owner.me()),
    }
    _journal(cfg).parent.mkdir(parents=True, exist_ok=True)
    _write_durably(_journal(cfg), json.dumps(entry))
    try:
        on_step("rewrite shards")
        for e in edits:
            if e.kept is None:
                (folder / e.name).unlink()
            else:
                _write_durably(folder / e.name, e.kept)
        add_and_push(cfg, dvc, on_step)
    except BaseException:
        _rollback(cfg, entry)
        dvc("checkout", "--force", DVC_FILE, check=False)
        raise
    _journal(cfg).unlink()
    return data_version(cfg.root_path) or ""


def _history(store: _Store, ids: set[str], old_objects: set[str]) -> History:
    """The shard objects in the local cache that hold one of `ids` (the old shards' own always among them), and the
    data versions whose listings name one."""
    listings = store.listings()
    held = set(old_objects)
    for md5 in shard_objects(listings, KIND) - held:
        text = store.read(md5)
        if text is not None and ids_in(text, ids):
            held.add(md5)
    return History(held, versions_holding(listings, held), listed=sorted(listings))


def _clean_state_files(cfg: Config, ids: set[str], purged: Purged) -> None:
    """The rows' copies under the state dir: harvest batches (<state>/traces) and the quarantine."""
    for folder, id_of in ((cfg.state_path / "traces", None), (cfg.state_path / "quarantine", quarantined_id)):
        files = {p.name: p for p in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}
        texts = {n: p.read_text(encoding="utf-8", errors="replace") for n, p in files.items()}
        edits = drop_rows(texts, ids) if id_of is None else drop_rows(texts, ids, id_of)
        for e in edits:
            if e.kept is None:
                files[e.name].unlink()
            else:
                _write_durably(files[e.name], e.kept)
            purged.state_files.append(str(files[e.name]))


def _refuse(cfg: Config, trace_ids: list[str]) -> None:
    state = HarvestState.load(cfg)
    for t in trace_ids:
        state.refused[t] = [FORGOTTEN]
    state.save()


# ---------------------------------------------------------------------------------------------- the work
def forget(
    cfg: Config,
    sel: Selector,
    reason: str = "",
    purge: bool = False,
    by: str | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> ForgetResult:
    """Forget the selector's rows; ForgetRefused (nothing changed) when it names none. See the module docstring."""
    import mlflow

    experiment_id = tracking.setup(cfg)
    result = ForgetResult(
        sel,
        reason,
        by or os.environ.get("USER", "unknown"),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        cfg.tracking.experiment,
    )
    on_step(f"find the traces of {sel.describe()} in MLflow")
    traces, seen = find_traces(tracking.trace_experiments(cfg), sel)
    if sel.kind == "rater":
        result.undecidable = _undecidable(cfg, seen)
    # a trace forgotten before (maybe gone from MLflow since) may still be purged from the history
    refused_before = HarvestState.load(cfg).refused
    earlier = {t for t in sel.values if refused_before.get(t) == [FORGOTTEN]} if sel.kind == "trace" else set()
    if not traces and not earlier and (sel.kind != "trace" or not set(sel.values) & _row_ids(cfg)):
        raise ForgetRefused(_nothing(result, sel))  # rows are found by their traces: none, no rows (no lock, no DVC)
    with data_lock(cfg, f"forget {sel.describe()}", say=on_step):
        dvc = open_repo(cfg)
        result.version_before = result.version_after = require_clean(cfg, dvc)
        folder = cfg.data_path / KIND
        texts = {p.name: p.read_text(encoding="utf-8") for p in shard_files(folder)}
        ids = set(sel.values) if sel.kind == "trace" else set(traces)
        edits = drop_rows(texts, ids)
        result.removed = [i for e in edits for i in e.removed]
        result.refused = sorted(set(result.removed) | set(traces) | earlier)
        if sel.kind == "trace":
            result.unknown = [t for t in sel.values if t not in result.refused]
        if not result.refused:
            raise ForgetRefused(_nothing(result, sel))
        _refuse(cfg, result.refused)  # before the data changes: a failed commit never lets a harvest take them back
        result.old_objects = {
            str(folder / e.name): hashlib.md5((folder / e.name).read_bytes()).hexdigest() for e in edits
        }
        if edits:
            result.version_after = _commit(cfg, dvc, edits, on_step)
            result.rewritten = [str(folder / e.name) for e in edits if e.kept is not None]
            result.deleted = [str(folder / e.name) for e in edits if e.kept is None]
        on_step("find the data versions that held the rows")
        store = _Store(cfg)
        try:
            result.history = _history(store, set(result.refused), set(result.old_objects.values()))
            if purge:
                on_step("purge the DVC cache and remote")
                result.purged = purged = Purged()
                for md5 in sorted(result.history.objects):
                    store.delete(md5, purged)
                purged.incomplete = [v for v in result.history.versions if v != result.version_after]
                for v in purged.incomplete:
                    snap = cfg.state_path / "snapshots" / v
                    if snap.exists():
                        shutil.rmtree(snap, ignore_errors=True)
                        purged.snapshots.append(str(snap))
                _clean_state_files(cfg, set(result.refused), purged)
        finally:
            store.close()
    if result.purged is not None:
        on_step("delete the votes")
        for trace_id, votes in traces.items():  # for --rater, only theirs
            for assessment_id in votes:
                try:
                    mlflow.delete_assessment(trace_id, assessment_id)
                    result.purged.votes += 1
                except Exception as e:
                    result.purged.problems.append(f"vote {assessment_id} on {trace_id} could not be deleted: {e}")
    result.history.models, result.unchecked_models, result.champion = _registered(cfg, result.history)
    _record(cfg, result, experiment_id)
    return result


def _rows(cfg: Config):
    return (row for p in shard_files(cfg.data_path / KIND) for _, row in read_jsonl(p, KIND).rows)


def _row_ids(cfg: Config) -> set[str]:
    return {row.get("id") for row in _rows(cfg)}


def _undecidable(cfg: Config, seen: set[str]) -> int:
    """The feedback rows from traces that are not among the judged traces `seen` (deleted, or their votes were)."""
    return sum(1 for row in _rows(cfg) if row.get("source") == SOURCE and row.get("id") not in seen)


def _nothing(result: ForgetResult, sel: Selector) -> str:
    exp = result.experiment
    if sel.kind == "trace":
        return (
            f"0 rows matched: no feedback row has the id {', '.join(sel.values)} and no trace of experiment {exp!r} "
            "has it; nothing was changed"
        )
    if sel.kind == "user":
        return (
            f"0 rows matched: found 0 traces of experiment {exp!r} that record the user {sel.values[0]!r} (trace tag "
            f"{USER_TAG}; served answers do not record a user yet, issue 41 adds it); nothing was changed"
        )
    tail = (
        f" ({result.undecidable} feedback row(s) come from traces no longer in MLflow: who voted on them cannot be "
        "told; forget them by --trace)"
        if result.undecidable
        else ""
    )
    return f"0 rows matched: no trace of experiment {exp!r} carries a `{FEEDBACK}` vote from rater {sel.values[0]!r}{tail}; nothing was changed"


def _record(cfg: Config, result: ForgetResult, experiment_id: str) -> None:
    """The record file, then the MLflow run `forget` with it as an artifact (the file gets the run's id)."""
    import mlflow

    folder = cfg.state_path / "forget"
    folder.mkdir(parents=True, exist_ok=True)
    path = (
        folder / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{result.selector.kind}-{uuid.uuid4().hex[:6]}.json"
    )
    result.record = str(path)
    _write_durably(path, json.dumps(result.as_record(), indent=1))
    selector_tag = f"{result.selector.kind}={','.join(result.selector.values)}"
    try:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name="forget",
            tags={
                "selector": selector_tag[:500],
                "reason": result.reason[:500],
                "forget.by": result.by,
                "data_version_before": result.version_before,
                "data_version_after": result.version_after,
                "purge": str(result.purged is not None).lower(),
            },
        ) as run:
            result.run_id = run.info.run_id
            mlflow.log_metrics({"rows_removed": len(result.removed), "traces_refused": len(result.refused)})
            mlflow.log_dict(result.as_record(), "forget.json")
    except Exception as e:  # the data has changed already: the record file says what, the summary says this
        result.run_id = None
        print(f"⚠ forget: the record is in {path}; logging it to MLflow failed: {e}")
        return
    _write_durably(path, json.dumps(result.as_record(), indent=1))


# ---------------------------------------------------------------------------------------------- what to say
def summary(result: ForgetResult) -> list[str]:
    """What a forget did and what a retrain must do next."""
    sel, n = result.selector, len(result.removed)
    lines = [
        f"✓ forgot {sel.describe()}: {n} feedback row(s) removed from the data"
        + (f" (reason: {result.reason})" if result.reason else "")
    ]
    if result.changed:
        lines.append(
            f"  data version: {result.version_before} -> {result.version_after}  (commit data.dvc to record it in git)"
        )
        if result.rewritten:
            lines.append(f"  shards rewritten: {', '.join(result.rewritten)}")
        if result.deleted:
            lines.append(f"  shards deleted (left empty): {', '.join(result.deleted)}")
    else:
        lines.append(f"  the data holds none of their rows: data version {result.version_before} is unchanged")
    if result.unknown:
        lines.append(f"  not found (neither in the data nor in MLflow): {', '.join(result.unknown)}")
    if result.undecidable:
        lines.append(
            f"  {result.undecidable} feedback row(s) come from traces no longer in MLflow: who voted on them cannot be "
            "told (forget them by --trace)"
        )
    lines.append(
        f"  harvests: `rlhf ingest --from-traces` refuses these {len(result.refused)} trace(s) from now on"
        + (
            f"; {sel.values[0]}'s later votes still count: `rlhf raters revoke {sel.values[0]}` refuses their token"
            if sel.kind == "rater"
            else ""
        )
    )
    lines.append(f"  record: {result.record}" + (f" (MLflow run `forget` {result.run_id})" if result.run_id else ""))
    versions = result.history.versions
    p = result.purged
    if p is not None:
        lines.append(
            f"  purged: {p.votes} `{FEEDBACK}` vote(s); {len(p.objects)} shard object(s) that held the rows "
            f"({p.from_cache} from the DVC cache, {p.from_remote} from the remote)"
            + (f"; {len(p.snapshots)} retrain snapshot(s)" if p.snapshots else "")
            + (f"; copies in {len(p.state_files)} state file(s)" if p.state_files else "")
        )
        if p.incomplete:
            lines.append(
                f"  now incomplete (cannot be restored or pulled whole): data version(s) {', '.join(p.incomplete)}"
            )
        lines.extend(f"  ⚠ {problem}" for problem in p.problems)
    elif versions:
        lines.append(
            f"  still in the history: data version(s) {', '.join(versions)} hold these rows in the DVC cache and "
            "remote; `--purge` deletes them"
        )
    models = result.history.models
    if models:
        champ = f" ({'v' + result.champion} is champion)" if result.champion in models else ""
        lines.append(
            f"  next: the registered version(s) {version_range(models)}{champ} were trained on data versions that held "
            "these rows; run `rlhf run` to train on the new version, and roll back or archive those versions"
        )
    elif result.changed:
        lines.append("  next: no registered version was trained on these rows; the next `rlhf run` trains without them")
    if result.unchecked_models:
        lines.append(
            f"  unchecked: the registered version(s) {version_range(result.unchecked_models)} were trained on data "
            "versions whose listings are not in the local DVC cache: whether they held these rows cannot be told here"
        )
    return lines


# ---------------------------------------------------------------------------------------------- the flow
@config_flow(name="forget", log_prints=True, validate_parameters=False)
def forget_flow(
    cfg: Config,
    rater: str | None = None,
    traces: list[str] | None = None,
    user: str | None = None,
    purge: bool = False,
    reason: str = "",
    by: str | None = None,
):
    log = get_run_logger()
    lifecycle.claim_run(cfg)
    try:
        result = forget(
            cfg, selector(rater, traces, user), reason, purge, by, on_step=lambda s: log.info("forget: %s", s)
        )
    except (ForgetRefused, BadSelector, DataVersionError) as e:
        log.error("%s", e)
        return Failed(message=f"forget refused: {e}", data=str(e))
    log.info(
        "forgot %d row(s) of %s: data version %s -> %s; record %s",
        len(result.removed),
        result.selector.describe(),
        result.version_before,
        result.version_after,
        result.record,
    )
    if result.changed:
        announce(cfg, result.version_before, result.version_after, KIND, None, 0, forgotten=len(result.removed))
        log.info("emitted %s (data version %s)", DATA_UPDATED, result.version_after)
    return Completed(data=result, message=f"forgot {len(result.removed)} row(s) of {result.selector.describe()}")
