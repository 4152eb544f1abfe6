"""Data validation with Great Expectations 1.x: one suite per data frame.

Frames: demonstrations, preferences_pairwise, preferences_ranked, prompts, eval, feedback (a
preference shard may hold both shapes; rows are split by shape). Every expectation
carries `meta = {rule, message, fix}` so a failed one becomes a `Finding` naming the
rule, the rows (file and line, from the `_file`/`_line` columns), the values, and
what to do. Checks against data outside the frame (ids and pairs already in data/,
eval leakage) are membership columns computed in pandas before the suite runs (`MEMBERSHIP`): GX copies an
expectation's value set every time it reads its configuration, so a value set of the data set's keys made the
check grow with the data (a 1k batch against 100k rows: 36.8 s, 5.2 s without; docs/benchmarks.md).

Data Docs HTML are written under <state_dir>/gx/uncommitted/data_docs/local_site: the site
(index.html) lists every past result; `ValidationReport.docs_pages` are this run's own result
pages (one self-contained HTML file per frame validated, under the site's validations/ dir).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd

from components.config import DataConfig
from components.data.index import Existing, existing
from components.data.schemas import (
    FRAMES,
    KINDS,
    OPTIONAL_KINDS,
    REQUIRED_FIELDS,
    TRAINING_KINDS,
    Finding,
    ParsedFile,
    content_key,
    frame_of,
    normalise_text,
    read_jsonl,
    shard_files,
    short,
)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

TEXT_FIELDS = {
    "demonstrations": ("prompt", "response"),
    "preferences_pairwise": ("prompt", "chosen", "rejected"),
    "preferences_ranked": ("prompt",),
    "prompts": ("prompt",),
    "eval": ("prompt",),
    "feedback": ("prompt", "response"),
}
# Derived columns are reported as the user's own fields.
_SHOWN = {
    "_id_key": ("id",),
    "_prompt_norm": ("prompt",),
    "_k": ("responses",),
    "_n_distinct": ("responses",),
    "_responses_valid": ("responses",),
    "_key": ("prompt",),
    "_label_ok": ("label",),
    "_rating_ok": ("rating",),
    "_rating_num": ("rating",),
    "_label_agrees": ("label", "rating"),
    "_id_in_data": ("id",),
    "_key_in_data": ("prompt",),
    "_prompt_in_eval": ("prompt",),
    "_prompt_in_training": ("prompt",),
}
# what a frame is checked against from outside it -> (the column looked up, the boolean column the suite checks)
MEMBERSHIP = {
    "existing_ids": ("_id_key", "_id_in_data"),
    "existing_keys": ("_key", "_key_in_data"),
    "eval_prompts": ("_prompt_norm", "_prompt_in_eval"),
    "training_prompts": ("_prompt_norm", "_prompt_in_training"),
}


# ----------------------------------------------------------------------------------------
# Frames: parsed rows -> DataFrame with the derived columns the suites check
# ----------------------------------------------------------------------------------------
def _id_key(value: Any) -> str | None:
    if value is None or isinstance(value, float) and pd.isna(value):
        return None
    return (
        str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else json.dumps(value, default=str)
    )


def _text_ok(value: Any, cfg: DataConfig) -> bool:
    return (
        isinstance(value, str)
        and bool(value.strip())
        and cfg.min_response_chars <= len(value) <= cfg.max_response_chars
    )


def _feedback_columns(obj: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """Derived columns of a feedback row: the label is exactly the integer 1 or 0 (JSON true/false, "1", 0.5 are
    not); a rating, when given, is a finite number; the label agrees with the rating's side of the middle.
    None where the check does not apply (a missing label is its own rule), so the expectation skips the row."""
    label, rating = obj.get("label"), obj.get("rating")
    label_ok = None if label is None else (type(label) is int and label in (0, 1))
    rating_ok = None if rating is None else (type(rating) in (int, float) and math.isfinite(rating))
    agrees = None
    if label_ok and rating_ok:
        assert rating is not None  # rating_ok is None without a rating
        mid = (cfg.min_rating + cfg.max_rating) / 2
        agrees = rating == mid or (label == 1) == (rating > mid)
    return {
        "rating": rating,
        "_label_ok": label_ok,
        "_rating_ok": rating_ok,
        "_rating_num": float(rating) if rating is not None and rating_ok else None,
        "_label_agrees": agrees,
    }


def _content_key(frame: str, obj: dict[str, Any]) -> str:
    """The key duplicates are found by: the row's content fields (all required fields but the id), normalised."""
    content = [obj.get(f) for f in REQUIRED_FIELDS[frame][1:]]
    return content_key(*[c if isinstance(c, (str, list)) else json.dumps(c, default=str) for c in content])


def build_frame(frame: str, rows: Iterable[tuple[str, int, dict[str, Any]]], cfg: DataConfig) -> pd.DataFrame:
    """rows: (file, line, object). Required fields always exist as columns (missing -> None)."""
    records = []
    for file, line, obj in rows:
        rec = {f: obj.get(f) for f in REQUIRED_FIELDS[frame]}
        rec["_file"], rec["_line"] = file, line
        rec["_id_key"] = _id_key(obj.get("id"))
        prompt = obj.get("prompt")
        rec["_prompt_norm"] = normalise_text(prompt) if isinstance(prompt, str) else None
        rec["_key"] = _content_key(frame, obj)
        if frame == "preferences_ranked":
            rs = obj.get("responses")
            if isinstance(rs, list):
                rec["_k"] = len(rs)
                rec["_n_distinct"] = len({normalise_text(r) for r in rs})
                rec["_responses_valid"] = all(_text_ok(r, cfg) for r in rs)
            else:
                rec["_k"] = rec["_n_distinct"] = None
                rec["_responses_valid"] = False
        if frame == "feedback":
            rec.update(_feedback_columns(obj, cfg))
        records.append(rec)
    columns = list(REQUIRED_FIELDS[frame]) + ["_file", "_line", "_id_key", "_prompt_norm", "_key"]
    if frame == "preferences_ranked":
        columns += ["_k", "_n_distinct", "_responses_valid"]
    if frame == "feedback":
        columns += ["rating", "_label_ok", "_rating_ok", "_rating_num", "_label_agrees"]
    df = pd.DataFrame.from_records(records, columns=columns)
    return df.astype(object).where(df.notna(), None) if len(df) else df


# ----------------------------------------------------------------------------------------
# Suites: one per frame, each expectation tagged with its rule, message and fix
# ----------------------------------------------------------------------------------------
def _e(expectation_cls, rule: str, message: str, fix: str, **kwargs):
    return expectation_cls(meta={"rule": rule, "message": message, "fix": fix}, **kwargs)


def build_suite_expectations(frame: str, cfg: DataConfig) -> list:
    """One frame's suite, in order: ids, text fields, the frame's shape, duplicates, the eval split."""
    ex = _id_expectations()
    for f in TEXT_FIELDS[frame]:
        ex += _text_field_expectations(f, cfg)
    if frame == "preferences_pairwise":
        ex += _pairwise_expectations()
    if frame == "preferences_ranked":
        ex += _ranking_expectations(cfg)
    if frame == "feedback":
        ex += _feedback_expectations(cfg)
    ex += _duplicate_expectations(frame)
    ex += _eval_split_expectations(frame)
    return ex


def _id_expectations() -> list:
    """Every row has an id, of a usable type, unique in the batch and new to data/."""
    import great_expectations.expectations as gxe

    return [
        _e(
            gxe.ExpectColumnValuesToNotBeNull,
            "id_present",
            "field 'id' is missing or null",
            "give every row a unique 'id' (string or integer)",
            column="id",
        ),
        _e(
            gxe.ExpectColumnValuesToBeInTypeList,
            "id_type",
            "field 'id' must be a string or an integer",
            "use a string or integer id",
            column="id",
            type_list=["str", "int"],
        ),
        _e(
            gxe.ExpectColumnValuesToBeUnique,
            "ids_unique",
            "duplicate 'id' values",
            "make ids unique within a kind (e.g. prefix with the batch name)",
            column="_id_key",
        ),
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "id_new",
            "'id' already exists in data/",
            "ids must be new: rename them, or drop rows that are already ingested",
            column="_id_in_data",
            value_set=[False],
        ),
    ]


def _text_field_expectations(f: str, cfg: DataConfig) -> list:
    """Text field `f` is present, a string, not blank, and within the configured length."""
    import great_expectations.expectations as gxe

    max_chars = {"prompt": cfg.max_prompt_chars}
    min_chars = {"prompt": cfg.min_prompt_chars}
    lo, hi = min_chars.get(f, cfg.min_response_chars), max_chars.get(f, cfg.max_response_chars)
    return [
        _e(
            gxe.ExpectColumnValuesToNotBeNull,
            f"{f}_present",
            f"field '{f}' is missing or null",
            f"every row needs a non-empty '{f}' string",
            column=f,
        ),
        _e(
            gxe.ExpectColumnValuesToBeInTypeList,
            f"{f}_type",
            f"field '{f}' must be a string",
            f"write '{f}' as a JSON string",
            column=f,
            type_list=["str"],
        ),
        _e(
            gxe.ExpectColumnValuesToNotMatchRegex,
            f"{f}_not_blank",
            f"field '{f}' is empty or whitespace only",
            f"fill in '{f}' or drop the row",
            column=f,
            regex=r"^\s*$",
        ),
        _e(
            gxe.ExpectColumnValueLengthsToBeBetween,
            f"{f}_length",
            f"'{f}' length outside {lo}..{hi} characters",
            f"shorten or drop these rows, or change data.{'max_prompt_chars' if f == 'prompt' else 'max_response_chars'}",
            column=f,
            min_value=lo,
            max_value=hi,
        ),
    ]


def _pairwise_expectations() -> list:
    """A pairwise comparison has two different responses."""
    import great_expectations.expectations as gxe

    return [
        _e(
            gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord,
            "chosen_differs_from_rejected",
            "'chosen' and 'rejected' are identical",
            "a comparison needs two different responses: fix or drop the row",
            column_list=["chosen", "rejected"],
        )
    ]


def _ranking_expectations(cfg: DataConfig) -> list:
    """A ranking is a list of K allowed, valid and distinct response strings."""
    import great_expectations.expectations as gxe

    return [
        _e(
            gxe.ExpectColumnValuesToNotBeNull,
            "responses_present",
            "field 'responses' is missing or null",
            "give 'responses' as a list of response strings, best first",
            column="responses",
        ),
        _e(
            gxe.ExpectColumnValuesToBeOfType,
            "responses_type",
            "field 'responses' must be a list",
            "give 'responses' as a JSON list of strings, best first",
            column="responses",
            type_="list",
        ),
        _e(
            gxe.ExpectColumnValuesToBeBetween,
            "ranking_size",
            f"a ranking needs K in {cfg.min_rank_k}..{cfg.max_rank_k_allowed} responses",
            f"rank between {cfg.min_rank_k} and {cfg.max_rank_k_allowed} responses per prompt (split longer rankings)",
            column="_k",
            min_value=cfg.min_rank_k,
            max_value=cfg.max_rank_k_allowed,
        ),
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "responses_text",
            f"every ranked response must be a non-blank string of {cfg.min_response_chars}..{cfg.max_response_chars} characters",
            "fix or remove the bad responses in these rankings",
            column="_responses_valid",
            value_set=[True],
        ),
        _e(
            gxe.ExpectColumnPairValuesToBeEqual,
            "responses_distinct",
            "a ranking repeats the same response",
            "each response in a ranking must be different: remove the repeats",
            column_A="_k",
            column_B="_n_distinct",
        ),
    ]


def _feedback_expectations(cfg: DataConfig) -> list:
    """A thumbs up/down is the integer 1 or 0; an optional rating is a number in range that agrees with it."""
    import great_expectations.expectations as gxe

    lo, hi = cfg.min_rating, cfg.max_rating
    return [
        _e(
            gxe.ExpectColumnValuesToNotBeNull,
            "label_present",
            "field 'label' is missing or null",
            "give every row a 'label': 1 for thumbs up, 0 for thumbs down",
            column="label",
        ),
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "label_values",
            "field 'label' must be the integer 1 (thumbs up) or 0 (thumbs down)",
            "write 1 for thumbs up and 0 for thumbs down (not true/false, not a string, not a score: a graded "
            "score goes in 'rating')",
            column="_label_ok",
            value_set=[True],
        ),
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "rating_type",
            "field 'rating', when given, must be a number",
            "write 'rating' as a JSON number (e.g. 4), or leave it out",
            column="_rating_ok",
            value_set=[True],
        ),
        _e(
            gxe.ExpectColumnValuesToBeBetween,
            "rating_range",
            f"'rating' outside {lo:g}..{hi:g}",
            f"rescale the ratings to {lo:g}..{hi:g}, or set data.min_rating / data.max_rating to your scale",
            column="_rating_num",
            min_value=lo,
            max_value=hi,
        ),
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "label_matches_rating",
            f"'label' disagrees with 'rating' (above the middle {(lo + hi) / 2:g} of {lo:g}..{hi:g} is a thumbs up, "
            "below it a thumbs down)",
            "fix the label or the rating of these rows (the middle of the range goes with either label)",
            column="_label_agrees",
            value_set=[True],
        ),
    ]


def _duplicate_expectations(frame: str) -> list:
    """No row repeats another row of the batch or one already in data/ (by normalised content)."""
    import great_expectations.expectations as gxe

    dup = {
        "demonstrations": "duplicate (prompt, response) demonstrations",
        "preferences_pairwise": "duplicate (prompt, chosen, rejected) pairs",
        "preferences_ranked": "duplicate rankings (same prompt and responses)",
        "prompts": "duplicate prompts",
        "eval": "duplicate eval prompts",
        "feedback": "duplicate feedback (same prompt, response and label)",
    }[frame]
    return [
        _e(
            gxe.ExpectColumnValuesToBeUnique,
            "no_duplicates",
            dup,
            "drop the repeated rows (compared ignoring case and whitespace)"
            + (
                "; several votes on one response: keep one row and put the count into 'rating'"
                if frame == "feedback"
                else ""
            ),
            column="_key",
        ),
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "not_already_in_data",
            dup.replace("duplicate", "already in data/:"),
            "drop rows that are already ingested",
            column="_key_in_data",
            value_set=[False],
        ),
    ]


def _eval_split_expectations(frame: str) -> list:
    """Eval prompts and training prompts never meet, checked from whichever side `frame` is."""
    import great_expectations.expectations as gxe

    if frame == "eval":
        return [
            _e(
                gxe.ExpectColumnValuesToBeInSet,
                "eval_disjoint",
                "eval prompt also appears in training data",
                "eval prompts must never be trained on: remove the prompt from training data or from eval",
                column="_prompt_in_training",
                value_set=[False],
            )
        ]
    return [
        _e(
            gxe.ExpectColumnValuesToBeInSet,
            "no_eval_leakage",
            "prompt is one of the frozen eval prompts",
            "never train on eval prompts: drop these rows",
            column="_prompt_in_eval",
            value_set=[False],
        )
    ]


# ----------------------------------------------------------------------------------------
# Running suites
# ----------------------------------------------------------------------------------------
class GXValidator:
    """A file-backed GX context under `gx_root` that validates frames and writes Data Docs."""

    def __init__(self, gx_root: Path, cfg: DataConfig):
        import great_expectations as gx

        self.gx = gx
        self.cfg = cfg
        gx_root.mkdir(parents=True, exist_ok=True)
        self.context = gx.get_context(mode="file", project_root_dir=str(gx_root))
        bars = {"globally": False, "metric_calculations": False}  # a mapping, as in GX's config file
        self.context.variables.progress_bars = bars
        self.source = self.context.data_sources.add_or_update_pandas("rlhf")

    def _batch_definition(self, frame: str):
        try:
            asset = self.source.get_asset(frame)
        except LookupError:
            asset = self.source.add_dataframe_asset(frame)
        try:
            return asset.get_batch_definition("all")
        except (KeyError, LookupError):
            return asset.add_batch_definition_whole_dataframe("all")

    def validate(
        self, frame: str, df: pd.DataFrame, params: dict[str, list], source: str
    ) -> tuple[list[Finding], list]:
        """Findings, and the identifiers of the validation results this run stored (for their Data Docs pages)."""
        gx = self.gx
        suite = gx.ExpectationSuite(name=f"rlhf.{frame}", expectations=build_suite_expectations(frame, self.cfg))
        suite = self.context.suites.add_or_update(suite)
        vd = self.context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"rlhf.{frame}", data=self._batch_definition(frame), suite=suite)
        )
        checkpoint = self.context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=f"rlhf.{frame}",
                validation_definitions=[vd],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_file", "_line"]},
            )
        )
        for param, (looked_up, column) in MEMBERSHIP.items():  # what this frame is not checked against: False
            df[column] = df[looked_up].isin(params[param]) if params.get(param) else False
        result = checkpoint.run(batch_parameters={"dataframe": df})
        findings = []
        for run in result.run_results.values():
            for er in run.results:
                if er.success:
                    continue
                findings.append(self._finding(er, df, source))
        return findings, list(result.run_results)

    def _finding(self, er, df: pd.DataFrame, source: str) -> Finding:
        meta = er.expectation_config.meta or {}
        rule, message, fix = meta.get("rule", er.expectation_config.type), meta.get("message", ""), meta.get("fix", "")
        if er.exception_info and er.exception_info.get("raised_exception"):
            return Finding(
                source,
                rule,
                f"{message} (check could not run: {er.exception_info.get('exception_message')})",
                fix,
                count=len(df),
            )
        idx = er.result.get("unexpected_index_list") or []
        locations = [(str(d["_file"]), int(d["_line"])) for d in idx]
        by_loc = {(str(f), int(n)): i for i, (f, n) in enumerate(zip(df["_file"], df["_line"], strict=True))}
        examples = []
        for file, line in locations[: self.cfg.report_max_examples]:
            row = df.iloc[by_loc[(file, line)]]
            checked = [c for c in er.expectation_config.kwargs.get("column_list", [])] or [
                er.expectation_config.kwargs.get(k) for k in ("column", "column_A")
            ]
            fields = dict.fromkeys(f for c in checked if c for f in _SHOWN.get(c, (c,)))
            values = " ".join(f"{f}={short(row[f])}" for f in fields if f in row)
            where = f"line {line}" if file == source else f"{file}:{line}"
            examples.append(f"{where}: {values}")
        count = er.result.get("unexpected_count") or len(locations)
        return Finding(source, rule, message, fix, count=count, examples=examples, locations=locations)

    def build_docs(self) -> Path | None:
        """Build the whole site; the path of its index.html (None without a local site)."""
        self.context.build_data_docs()
        return self._local_page(None)

    def docs_page(self, result_id) -> Path | None:
        """The built HTML page of one validation result (`validations/<suite>/<run>/<time>/<batch>.html`)."""
        page = self._local_page(result_id)
        return page if page is not None and page.is_file() else None

    def _local_page(self, resource_id) -> Path | None:
        for site in self.context.get_docs_sites_urls(resource_identifier=resource_id):
            url = site.get("site_url") or ""
            if url.startswith("file://"):
                path = Path(url[len("file://") :])
                return path if path.exists() else Path(unquote(str(path)))  # GX %-quotes the part under the site
        return None


@lru_cache(maxsize=4)
def _validator(gx_root: str, cfg_json: str) -> GXValidator:
    return GXValidator(Path(gx_root), DataConfig(**json.loads(cfg_json)))


def get_validator(gx_root: Path, cfg: DataConfig) -> GXValidator:
    from dataclasses import asdict

    return _validator(str(gx_root), json.dumps(asdict(cfg), sort_keys=True))


# ----------------------------------------------------------------------------------------
# Reports and entry points
# ----------------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    findings: list[Finding] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # frame -> rows checked
    files: list[str] = field(default_factory=list)
    docs_index: Path | None = None  # the Data Docs site (index.html): every result ever validated here
    # This run's own result page per frame validated: self-contained HTML (styles inline, scripts from CDNs);
    # its only local links are back to the site (index, suite pages, favicon), not needed to read it.
    docs_pages: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def bad_locations(self) -> dict[tuple[str, int], list[str]]:
        """(file, line) -> rules it breaks."""
        out: dict[tuple[str, int], list[str]] = {}
        for f in self.findings:
            for loc in f.locations:
                out.setdefault(loc, []).append(f.rule)
        return out

    def format(self, title: str, max_examples: int = 5) -> str:
        checked = ", ".join(f"{n} {k}" for k, n in self.rows.items() if n)
        if self.ok:
            return f"✓ {title}: all rules pass ({checked or 'no rows'})"
        lines = [f"✗ {title}: {len(self.findings)} problem(s) ({checked or 'no rows parsed'})"]
        by_source: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_source.setdefault(f.source, []).append(f)
        for source, fs in by_source.items():
            lines.append(f"  {source}")
            lines.extend(f.format(max_examples) for f in fs)
        return "\n".join(lines)


def _frames_from(parsed: Iterable[tuple[str, ParsedFile]]) -> dict[str, list[tuple[str, int, dict]]]:
    frames: dict[str, list[tuple[str, int, dict]]] = {f: [] for f in FRAMES}
    for kind, pf in parsed:
        for line, obj in pf.rows:
            frames[frame_of(kind, obj)].append((str(pf.path), line, obj))  # type: ignore[index]
    return frames


def load_dataset(data_dir: Path) -> dict[str, list[ParsedFile]]:
    return {kind: [read_jsonl(p, kind) for p in shard_files(data_dir / kind)] for kind in KINDS}


def _prompts(parsed: Iterable[ParsedFile]) -> set[str]:
    return {normalise_text(o["prompt"]) for pf in parsed for _, o in pf.rows if isinstance(o.get("prompt"), str)}


def validate_dataset(data_dir: Path, cfg: DataConfig, gx_root: Path, kinds: Iterable[str] = KINDS) -> ValidationReport:
    """Validate a whole data dir (data/<kind>/*.jsonl): every shard, cross-shard duplicates, eval leakage."""
    dataset = load_dataset(data_dir)
    kinds = list(kinds)
    report = ValidationReport()
    for kind in kinds:
        if kind == "preferences" and not dataset[kind] and dataset["feedback"]:
            pass  # the reward model can learn from feedback alone
        elif not dataset[kind] and kind not in OPTIONAL_KINDS:
            report.findings.append(
                Finding(
                    str(data_dir / kind),
                    "no_shards",
                    f"no {kind} shards (*.jsonl) found"
                    + (" (nor feedback: the reward model needs one of them)" if kind == "preferences" else ""),
                    f"add data under {data_dir / kind}/ (`rlhf ingest FILE --kind {kind}`)"
                    + (" or feedback (`--kind feedback`)" if kind == "preferences" else "")
                    + " or regenerate the demo",
                    1,
                )
            )
        for pf in dataset[kind]:
            report.files.append(str(pf.path))
            report.findings.extend(pf.findings)
    training_prompts = set().union(*(_prompts(dataset[k]) for k in TRAINING_KINDS))
    frames = _frames_from((k, pf) for k in kinds for pf in dataset[k])
    _run_suites(
        report,
        frames,
        cfg,
        gx_root,
        params=lambda frame: {"training_prompts": training_prompts} if frame == "eval" else {},
        source=lambda frame: f"{data_dir}/{frame.split('_')[0]}",
    )
    return report


def _run_suites(
    report: ValidationReport, frames: dict[str, list], cfg: DataConfig, gx_root: Path, params, source
) -> None:
    """Validate every non-empty frame with its suite; `params(frame)` fills the suite parameters."""
    validator = get_validator(gx_root, cfg)
    result_ids: dict[str, list] = {}
    for frame, rows in frames.items():
        if not rows:
            continue
        df = build_frame(frame, rows, cfg)
        report.rows[frame] = len(df)
        findings, result_ids[frame] = validator.validate(frame, df, params(frame), source=source(frame))
        report.findings.extend(findings)
    report.docs_index = validator.build_docs()
    for frame, ids in result_ids.items():
        pages = [p for p in map(validator.docs_page, ids) if p is not None]
        if pages:
            report.docs_pages[frame] = pages[0]  # one validation definition per frame: one result


def validate_batch(
    path: Path, kind: str, cfg: DataConfig, gx_root: Path, data_dir: Path | None, index_dir: Path | None = None
) -> tuple[ValidationReport, ParsedFile]:
    """Validate a new batch on its own and against the data already in `data_dir` (duplicates, ids, eval leakage):
    its keys from the per-shard index under `index_dir` (components/data/index.py; None: read every shard)."""
    pf = read_jsonl(path, kind)
    report = ValidationReport(files=[str(path)], findings=list(pf.findings))
    old = (
        existing(data_dir, kind, index_dir, _id_key, _content_key)
        if data_dir is not None and data_dir.is_dir()
        else Existing()
    )
    frames = _frames_from([(kind, pf)])

    def params(frame: str) -> dict[str, set]:
        return {
            "existing_ids": old.ids,
            "existing_keys": old.keys.get(frame, set()),
            "eval_prompts": old.eval_prompts,
            "training_prompts": old.training_prompts,
        }

    _run_suites(report, frames, cfg, gx_root, params=params, source=lambda frame: str(path))
    return report, pf
