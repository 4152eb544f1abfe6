"""Forget on request (issue 38, item 6): which rows leave the data, and what of the data's history held them.

Pure: text and listings in, decisions out; `flows/forget.py` reads the shards, asks MLflow which traces a selector
names, rewrites the shards as a new DVC version and purges. A row is dropped when its `id` is in the set (the feedback
rows of `rlhf ingest --from-traces` carry their trace id as their id); every other line of a shard is kept byte for
byte, a line that does not parse included (what cannot be read is never dropped by accident).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

SELECTORS = ("rater", "trace", "user")
# a selector's value goes into an MLflow search filter (--user) and into file names: a plain id, no quotes
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")


class BadSelector(ValueError):
    """The command line names no selector, two, or an id that cannot be one: one sentence (exit 2)."""


@dataclass(frozen=True)
class Selector:
    """Whose rows to forget: `rater` (their votes' traces), `trace` (these ids), `user` (trace tag `rlhf.user`)."""

    kind: str
    values: tuple[str, ...]

    def describe(self) -> str:
        """'rater alice', 'trace tr-1, tr-2', 'user u-7'."""
        return f"{self.kind} {', '.join(self.values)}"

    def as_dict(self) -> dict[str, object]:
        return {self.kind: list(self.values) if self.kind == "trace" else self.values[0]}


def selector(rater: str | None = None, traces: list[str] | None = None, user: str | None = None) -> Selector:
    """The one selector of `rlhf forget --rater ID | --trace ID [--trace ID ...] | --user ID`, or BadSelector."""
    named = (
        ("rater", [rater] if rater is not None else []),
        ("trace", traces or []),
        ("user", [user] if user is not None else []),
    )
    given = [(k, v) for k, v in named if v]
    if not given:
        raise BadSelector("rlhf forget: say whose rows to forget: --rater ID, --trace ID (repeatable) or --user ID")
    if len(given) > 1:
        raise BadSelector(
            f"rlhf forget: one selector at a time, got {' and '.join('--' + k for k, _ in given)}: run it once per selector"
        )
    kind, values = given[0]
    bad = [v for v in values if not _ID.match(v)]
    if bad:
        raise BadSelector(
            f"rlhf forget: {bad[0]!r} is not an id (letters, digits and . _ @ : + -, at most 128, no spaces or quotes)"
        )
    return Selector(kind, tuple(dict.fromkeys(values)))


# ---------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardEdit:
    """A shard that loses rows: the ids it loses, in file order, and its text without them (None: nothing is left,
    the shard is deleted)."""

    name: str
    removed: list[str]
    kept: str | None


def row_id(line: str) -> str | None:
    """The `id` of a JSONL line, or None for a line that is blank, not JSON, not an object or without a string id."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None


def quarantined_id(line: str) -> str | None:
    """The row id of a quarantine entry ({"file", "line", "rules", "raw": the row's line}), or None."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    raw = entry.get("raw") if isinstance(entry, dict) else None
    return row_id(raw) if isinstance(raw, str) else None


def drop_rows(
    shards: dict[str, str], ids: set[str] | frozenset[str], id_of: Callable[[str], str | None] = row_id
) -> list[ShardEdit]:
    """The shards (name -> text) that hold a row whose id (`id_of` a line) is in `ids`, each without those rows, in
    name order. Kept lines are unchanged and end in a newline; blank lines go. A shard that holds none is not listed."""
    edits = []
    for name in sorted(shards):
        kept, removed = [], []
        for line in shards[name].splitlines():
            if not line.strip():
                continue
            rid = id_of(line)
            if rid is not None and rid in ids:
                removed.append(rid)
            else:
                kept.append(line)
        if removed:
            edits.append(ShardEdit(name, removed, "".join(f"{ln}\n" for ln in kept) if kept else None))
    return edits


def ids_in(text: str, ids: set[str] | frozenset[str]) -> set[str]:
    """Which of `ids` the JSONL `text` holds as row ids (an old shard object of the DVC cache)."""
    if not any(i in text for i in ids):  # most objects hold none of them: skip parsing
        return set()
    return {rid for line in text.splitlines() if (rid := row_id(line)) is not None and rid in ids}


# ---------------------------------------------------------------------------------------------- history
@dataclass
class History:
    """What of the data's history held the forgotten rows: the shard objects (md5) and the data versions that list
    one of them (their `.dir` listings), the registered model versions trained on such a data version."""

    objects: set[str] = field(default_factory=set)
    versions: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # registered versions, "3", "5", oldest first
    listed: list[str] = field(default_factory=list)  # the data versions whose listings were read


def versions_holding(listings: dict[str, list[dict]], objects: set[str]) -> list[str]:
    """The data versions (the `.dir` md5 -> its entries {"md5", "relpath"}) that list one of `objects`, sorted."""
    return sorted(v for v, entries in listings.items() if any(e.get("md5") in objects for e in entries))


def shard_objects(listings: dict[str, list[dict]], kind: str = "feedback") -> set[str]:
    """The md5 of every `kind` shard any of the listings names (the objects to read for the forgotten ids)."""
    return {
        e["md5"]
        for entries in listings.values()
        for e in entries
        if isinstance(e.get("md5"), str) and str(e.get("relpath", "")).startswith(f"{kind}/")
    }


def version_range(versions: list[str]) -> str:
    """'v3', 'v3, v5', 'v3..v5' (consecutive), for the closing sentence."""
    nums = sorted(int(v) for v in versions)
    if len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"v{nums[0]}..v{nums[-1]}"
    return ", ".join(f"v{n}" for n in nums)
