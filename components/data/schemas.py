"""Data contracts (docs/architecture.md) and a JSONL reader that never raises on bad input.

Reading turns every problem a file can have - missing, empty, not UTF-8, a line that
is not JSON or not an object, text that is not valid Unicode (a lone `\\ud800` escape),
a preference row that is neither pairwise nor ranked -
into a `Finding` that names the file, the lines, the rule and the fix. Rows that
parse are returned with their 1-based line numbers for the Great Expectations suites.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("demonstrations", "preferences", "prompts", "eval", "feedback")
TRAINING_KINDS = ("demonstrations", "preferences", "prompts", "feedback")
OPTIONAL_KINDS = ("feedback",)  # a data dir may have none (the reward model needs preferences or feedback)
INGESTIBLE_KINDS = TRAINING_KINDS  # grow with every batch; eval prompts are frozen: one batch starts them, never trained on

# The frames Great Expectations validates: preferences split by shape.
FRAMES = ("demonstrations", "preferences_pairwise", "preferences_ranked", "prompts", "eval", "feedback")

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "demonstrations": ("id", "prompt", "response"),
    "preferences_pairwise": ("id", "prompt", "chosen", "rejected"),
    "preferences_ranked": ("id", "prompt", "responses"),
    "prompts": ("id", "prompt"),
    "eval": ("id", "prompt"),
    "feedback": ("id", "prompt", "response", "label"),
}


@dataclass
class Finding:
    """One broken rule in one source: how many rows, which lines, what to do."""

    source: str  # file path (or a data set description)
    rule: str  # short stable name, e.g. "chosen_differs_from_rejected"
    message: str  # what is wrong
    fix: str  # what to do about it
    count: int = 0  # offending rows (or 1 for a file-level problem)
    examples: list[str] = field(default_factory=list)  # "line 4: chosen='x' rejected='x'"
    locations: list[tuple[str, int]] = field(default_factory=list)  # every (file, line) at fault

    def format(self, max_examples: int = 5) -> str:
        rows = "" if self.count <= 1 and not self.locations else f" ({self.count} row{'s' * (self.count != 1)})"
        out = [f"  ✗ [{self.rule}] {self.message}{rows}"]
        for ex in self.examples[:max_examples]:
            out.append(f"      {ex}")
        if len(self.examples) > max_examples or self.count > max(len(self.examples), max_examples):
            out.append(f"      ... and {self.count - min(len(self.examples), max_examples)} more")
        out.append(f"      fix: {self.fix}")
        return "\n".join(out)


@dataclass
class ParsedFile:
    path: Path
    rows: list[tuple[int, dict[str, Any]]]  # (line number, object)
    raw: dict[int, str]  # line number -> raw text, for quarantine
    findings: list[Finding]


def short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\n", "\\n")
    return repr(text[: width - 3] + "...") if len(text) > width else repr(text)


def normalise_text(text: Any) -> str:
    """Case- and whitespace-insensitive form used for duplicate and leakage checks."""
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def content_key(*parts: Any) -> str:
    """Stable short hash of normalised content (duplicate pairs / rankings across shards)."""
    blob = json.dumps([normalise_text(p) if not isinstance(p, list) else [normalise_text(x) for x in p] for p in parts])
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def frame_of(kind: str, row: dict[str, Any]) -> str | None:
    """Which frame a row of `kind` belongs to; None for a preference row of no known shape."""
    if kind != "preferences":
        return kind
    pairwise = "chosen" in row or "rejected" in row
    ranked = "responses" in row
    if pairwise and not ranked:
        return "preferences_pairwise"
    if ranked and not pairwise:
        return "preferences_ranked"
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, what) for the first string or key holding a lone UTF-16 surrogate, e.g. ("field 'prompt'",
    "\\ud83d at character 14"); None when all text is valid Unicode. JSON allows the escape `"\\ud800"`, Python
    parses it to a str, and only encoding it to UTF-8 later fails."""

    def at(text: str) -> str | None:
        m = _SURROGATE.search(text)
        return f"\\u{ord(m.group()):04x} at character {m.start() + 1}" if m else None

    if isinstance(value, str):
        return (f"field '{path}'" if path else "value", what) if (what := at(value)) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        sub = f"{path}[{k}]" if isinstance(value, list) else f"{path}.{k}" if path else str(k)
        if isinstance(k, str) and (what := at(k)):
            return (f"a field name{f' in {path!r}' if path else ''}", what)
        if (found := lone_surrogate(v, sub)) is not None:
            return found
    return None


# Line-level rules: rule -> (message, fix). A bad line gets (rule, example) and is grouped per rule.
_LINE_RULES: dict[str, tuple[str, str]] = {
    "utf8": (
        "line is not valid UTF-8",
        "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)",
    ),
    "json": (
        "line is not valid JSON",
        "fix the line so it is one complete JSON object (JSONL: one object per line)",
    ),
    "not_object": (
        "line is JSON but not an object",
        'each line must be an object like {"id": ..., "prompt": ...}',
    ),
    "valid_unicode": (
        "text has a lone surrogate escape (\\ud800-\\udfff without its pair): "
        "not valid Unicode, it cannot be saved as UTF-8",
        "fix the text at the source (often an emoji cut in half): use the whole pair, e.g. \\ud83d\\ude00, "
        "the character itself, or drop the escape",
    ),
    "preference_shape": (
        "preference row is neither pairwise (chosen, rejected) nor ranked (responses)",
        'give either "chosen" and "rejected", or "responses" as a list best first - not both',
    ),
}


def read_jsonl(path: Path, kind: str) -> ParsedFile:
    """Parse one JSONL file; every problem becomes a Finding, never an exception."""
    if not path.exists():
        return _file_problem(
            path,
            "file_missing",
            "file does not exist",
            "check the path (relative paths are from the current directory)",
        )
    if path.is_dir():
        return _file_problem(
            path,
            "not_a_file",
            "expected a .jsonl file, got a directory",
            "pass the file, or the directory without --kind to validate a data dir",
        )
    data = path.read_bytes()
    if not data.strip():
        return _file_problem(
            path, "file_empty", "file is empty (no JSON lines)", "write one JSON object per line, or remove the file"
        )
    return _read_lines(path, kind, data)


def _file_problem(path: Path, rule: str, message: str, fix: str) -> ParsedFile:
    """No rows, and one file-level Finding that stopped the reading."""
    return ParsedFile(path, [], {}, [Finding(str(path), rule, message, fix, 1)])


def _read_lines(path: Path, kind: str, data: bytes) -> ParsedFile:
    """Parse the non-blank lines of `data`; bad lines become one Finding per rule, in order of first sight."""
    src = str(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    raw: dict[int, str] = {}
    bad: dict[str, Finding] = {}
    for lineno, chunk in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]  # tolerate a UTF-8 byte-order mark
        chunk = chunk.rstrip(b"\r")
        if not chunk.strip():
            continue
        raw[lineno], problem = _decode_line(chunk)
        obj: Any = None  # a dict once _parse_line finds no problem
        if problem is None:
            obj, problem = _parse_line(raw[lineno], kind)
        if problem is None:
            rows.append((lineno, obj))
            continue
        rule, example = problem
        f = bad.setdefault(rule, Finding(src, rule, *_LINE_RULES[rule]))
        f.count += 1
        f.locations.append((src, lineno))
        f.examples.append(f"line {lineno}: {example}")
    return ParsedFile(path, rows, raw, list(bad.values()))


def _decode_line(chunk: bytes) -> tuple[str, tuple[str, str] | None]:
    """(text, problem): the line as text (undecodable bytes replaced) and the utf8 problem, if any."""
    try:
        return chunk.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return chunk.decode("utf-8", errors="replace"), ("utf8", f"byte {chunk[e.start]:#04x} at column {e.start + 1}")


def _parse_line(text: str, kind: str) -> tuple[Any, tuple[str, str] | None]:
    """(object, problem): the parsed line and the first rule it breaks (json, then the row checks), if any."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, ("json", f"{e.msg} at column {e.colno}: {short(text)}")
    return obj, _row_problem(obj, kind)


def _row_problem(obj: Any, kind: str) -> tuple[str, str] | None:
    """(rule, example) for a parsed line that is not an object, not valid Unicode, or of no known shape."""
    if not isinstance(obj, dict):
        return "not_object", f"got {type(obj).__name__}: {short(obj)}"
    if (where := lone_surrogate(obj)) is not None:
        field_name, what = where
        return "valid_unicode", f"{field_name}: {what}"
    if frame_of(kind, obj) is None:
        return "preference_shape", f"fields: {sorted(obj)}"
    return None


def shard_files(kind_dir: Path) -> list[Path]:
    return sorted(kind_dir.glob("*.jsonl")) if kind_dir.is_dir() else []


def infer_kind(path: Path) -> str | None:
    """Kind from the folder name (data/<kind>/x.jsonl) or, failing that, from the first row's fields."""
    for part in (path.parent.name, path.name):
        if part in KINDS:
            return part
    try:
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    obj = json.loads(line.decode("utf-8-sig", errors="replace"))
                    break
            else:
                return None
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    if {"chosen", "rejected"} & obj.keys() or "responses" in obj:
        return "preferences"
    if "label" in obj or "rating" in obj:
        return "feedback"
    if "response" in obj:
        return "demonstrations"
    if "prompt" in obj:
        return "prompts"
    return None


def held_out(row_id: str, fraction: float) -> bool:
    """Deterministic train/held-out split by id hash: a row stays on its side as data grows."""
    return int(hashlib.sha1(str(row_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction
