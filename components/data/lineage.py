"""Incremental retraining's lineage: what a champion was trained on, and whether today's data only adds to it.

A registered model carries a warm-start bundle (`warm_start/` among its artifacts, components/models/warm_start.py)
whose `lineage.json` records the shards of the data version it was trained on, each with its md5, the hash of the
config it trained from and its chain of parents. DVC md5s have no parent link and a project may have no git history, so "today's data
contains the champion's" is decided on these shard sets: every shard of the champion's is in today's, unchanged.

    manifest(data_dir)                      {"preferences/00001.jsonl": md5, ...}
    decide(mode, parent, manifest, hash)    -> Decision: incremental or full, and the one sentence why

Pure apart from reading files: no MLflow, no Prefect.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from components.data.schemas import KINDS, shard_files

MODES = ("auto", "incremental", "full")


def manifest(data_dir: Path) -> dict[str, str]:
    """Every shard of a data version, by `<kind>/<file name>`, with the md5 of its bytes."""
    out = {}
    for kind in KINDS:
        for shard in shard_files(data_dir / kind):
            h = hashlib.md5(usedforsecurity=False)
            with shard.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f"{kind}/{shard.name}"] = h.hexdigest()
    return out


@dataclass
class Parent:
    """The champion an incremental retrain would continue from: its version and its bundle's lineage.json (None: it
    was registered without a warm-start bundle)."""

    version: str
    lineage: dict | None


@dataclass
class Decision:
    incremental: bool
    reason: str  # one sentence: why incremental, or why full
    new: list[str] = field(default_factory=list)  # incremental: the shards new since the parent's data


def decide(mode: str, parent: Parent | None, today: dict[str, str], training_hash: str, pool: bool = False) -> Decision:
    """`retrain.mode` against the champion: incremental when asked for (or `auto`) and possible, full otherwise. A
    Decision whose reason says why; `mode=incremental` when it is not possible is the caller's to refuse.
    `training_hash`: what the stages train from (flows/caching.training_hash: the config without the gate, the
    incremental settings and where results go), compared with the champion's."""
    if mode not in MODES:
        raise ValueError(f"retrain.mode={mode!r}: expected {' | '.join(MODES)}")
    if mode == "full":
        return Decision(False, "retrain.mode=full")
    if parent is None:
        return Decision(False, "no champion to continue from")
    v = f"champion v{parent.version}"
    if pool:
        return Decision(False, "incremental retraining runs stages in this process only (infra.training_pool is set)")
    if parent.lineage is None:
        return Decision(False, f"{v} has no warm-start bundle (registered before incremental retraining)")
    if parent.lineage.get("training_hash") != training_hash:
        return Decision(False, f"the config differs from {v}'s")
    theirs: dict[str, str] = parent.lineage.get("manifest", {})
    gone = sorted(s for s in theirs if s not in today)
    changed = sorted(s for s in theirs if s in today and today[s] != theirs[s])
    if gone or changed:
        what = f"shard {(gone or changed)[0]} {'is gone' if gone else 'changed'}"
        more = len(gone) + len(changed) - 1
        return Decision(
            False, f"{v}'s data is not contained in today's ({what}{f', and {more} more' if more else ''})"
        )
    new = sorted(set(today) - set(theirs))
    if not new:
        return Decision(False, f"no shard is new since {v}'s data")
    for kind in ("demonstrations", "eval"):
        if any(s.startswith(kind + "/") for s in new):
            why = (
                "SFT changes, and every adapter trained above it is then stale"
                if kind == "demonstrations"
                else "the prompts the gate compares on changed"
            )
            return Decision(False, f"new {kind} since {v}'s data: {why}")
    return Decision(True, f"{v}'s data is contained in today's; {len(new)} new shard(s): {', '.join(new[:3])}", new)
