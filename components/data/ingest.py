"""Ingest a batch of new examples: validate (alone and against data/), append a shard, version it.

A refused batch changes nothing under data/ or data.dvc. With `quarantine=True` the
good rows are ingested and every bad row is written, with its line number and the
rules it breaks, to <state_dir>/quarantine/ (outside data/): nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.config import Config
from components.data.demo import write_jsonl
from components.data.schemas import INGESTIBLE_KINDS, KINDS
from components.data.validation import ValidationReport, validate_batch
from components.data.versioning import commit_shard, count_rows, data_lock, demo_mark, open_repo, require_clean


class IngestRefused(Exception):
    def __init__(self, message: str, report: ValidationReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class IngestResult:
    kind: str
    source: str
    n_good: int
    n_bad: int
    version_before: str
    version_after: str
    shard: str | None = None
    quarantine: str | None = None
    docs_index: str | None = None
    report: str = ""
    rules_broken: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.version_after != self.version_before


def ingest(cfg: Config, file: Path, kind: str, quarantine: bool = False, on_step=lambda step: None) -> IngestResult:
    if kind not in KINDS:
        raise IngestRefused(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    file = Path(file).expanduser().resolve()
    # one writer at a time: a second ingest waits here, then validates against what the first one added
    with data_lock(cfg, f"ingest {file.name}", say=on_step):
        return _ingest(cfg, file, kind, quarantine, on_step)


def _ingest(cfg: Config, file: Path, kind: str, quarantine: bool, on_step) -> IngestResult:
    on_step("check data/ matches data.dvc")
    dvc = open_repo(cfg)
    before = require_clean(cfg, dvc)
    if not cfg.data.demo and demo_mark(cfg.root_path) is not None:
        raise IngestRefused(
            f"{cfg.root_path / 'data.dvc'} pins the generated demo data set, and a project's own rows are never mixed "
            "with the demo's: start your data in a project of its own (`rlhf init DIR`), or grow the demo with data=demo"
        )
    if kind not in INGESTIBLE_KINDS and (held := count_rows(cfg.data_path)[kind]):
        raise IngestRefused(
            f"eval prompts are frozen: {cfg.data_path / kind} already holds {held}, and the gate compares every "
            "candidate with the champion on the same ones; the eval set is set once, by the first --kind eval batch"
        )

    on_step("validate batch")
    report, parsed = validate_batch(
        file, kind, cfg.data, cfg.state_path / "gx", cfg.data_path, index_dir=cfg.state_path / "index"
    )
    title = f"{file} ({kind})"
    file_level = [f for f in report.findings if not f.locations]
    if file_level or (not report.ok and not quarantine):
        hint = (
            ""
            if file_level
            else "\n  Nothing was ingested. Fix the rows above, or ingest the good rows with --quarantine."
        )
        raise IngestRefused(report.format(title, cfg.data.report_max_examples) + hint, report)

    bad = report.bad_locations()
    good = [obj for line, obj in parsed.rows if (str(file), line) not in bad]
    result = IngestResult(
        kind,
        str(file),
        n_good=len(good),
        n_bad=len({ln for _, ln in bad}),
        version_before=before,
        version_after=before,
        docs_index=str(report.docs_index) if report.docs_index else None,
        report=report.format(title, cfg.data.report_max_examples),
        rules_broken={f.rule: f.count for f in report.findings},
    )
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    if bad:
        qfile = cfg.state_path / "quarantine" / f"{file.stem}-{stamp}.jsonl"
        write_jsonl(
            qfile,
            [
                {"file": f, "line": ln, "rules": rules, "raw": parsed.raw.get(ln)}
                for (f, ln), rules in sorted(bad.items())
            ],
        )
        result.quarantine = str(qfile)
    if not good:
        return result

    on_step("write shard")
    body = [json.dumps(o, ensure_ascii=False, sort_keys=True) for o in good]
    digest = hashlib.sha1("\n".join(body).encode("utf-8")).hexdigest()[:8]
    staging = cfg.state_path / "staging"
    shutil.rmtree(staging, ignore_errors=True)  # only an ingest under the data lock stages: leftovers are a dead one's
    staged = staging / f"ingest-{stamp}-{digest}.jsonl"
    write_jsonl(staged, good)
    dest = cfg.data_path / kind / staged.name
    result.version_after = commit_shard(cfg, dvc, staged, dest, on_step)
    result.shard = str(dest)
    return result
