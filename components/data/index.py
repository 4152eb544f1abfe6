"""What an ingest checks a batch against, without reading the data set again (issue 40).

A batch is validated against the data already there: ids and content keys of its kind (duplicates), the eval prompts
(leakage into training) and the training prompts (leakage into eval). Those come from a per-shard index under
`<state>/index/`: one JSON file per shard, written the first time the shard is read and trusted only while the shard
is the same file made by the same key code (size, mtime, ctime, inode: a shard is written once; `dvc checkout` of another version, a forget or a
hand edit gives it another stamp, and the index of it is built again). So an ingest reads the shards that are new
since the last one, not every row ever collected, and a refused batch leaves nothing behind to go stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.data.schemas import KINDS, TRAINING_KINDS, frame_of, normalise_text, read_jsonl, shard_files

INDEX_VERSION = 2  # bumped when what an entry holds changes (the key code is in every stamp too: key_code)


@dataclass
class Existing:
    """The keys of a data set that a batch of `kind` is checked against."""

    ids: set[str] = field(default_factory=set)  # id keys of `kind`'s rows
    keys: dict[str, set[str]] = field(default_factory=dict)  # frame -> content keys of `kind`'s rows
    eval_prompts: set[str] = field(default_factory=set)  # normalised
    training_prompts: set[str] = field(default_factory=set)  # normalised, every training kind


def shard_entry(path: Path, kind: str, id_key, content_key_of) -> dict[str, Any]:
    """One shard's keys: its rows' id keys, content keys per frame and normalised prompts."""
    ids: list[str] = []
    keys: dict[str, list[str]] = {}
    prompts: list[str] = []
    for _, obj in read_jsonl(path, kind).rows:
        if (k := id_key(obj.get("id"))) is not None:
            ids.append(k)
        if (frame := frame_of(kind, obj)) is not None:
            keys.setdefault(frame, []).append(content_key_of(frame, obj))
        if isinstance(prompt := obj.get("prompt"), str):
            prompts.append(normalise_text(prompt))
    return {"ids": ids, "keys": keys, "prompts": prompts}


def key_code(*functions) -> str:
    """A hash of the code keys are computed by (this module, schemas.py's normalisation and `functions`): an entry
    made by other code is made again, whoever forgot to bump INDEX_VERSION."""
    import hashlib
    import inspect
    import sys

    from components.data import schemas

    h = hashlib.sha256(str(INDEX_VERSION).encode())
    for source in (inspect.getsource(sys.modules[__name__]), inspect.getsource(schemas), *map(inspect.getsource, functions)):
        h.update(source.encode())
    return h.hexdigest()[:12]


def _stamp(path: Path, code: str) -> list:
    """The shard as a file: its size, mtime, ctime (which no tool sets back) and inode, and the key code."""
    st = path.stat()
    return [code, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def existing(data_dir: Path, kind: str, index_dir: Path | None, id_key, content_key_of) -> Existing:
    """The keys of every shard under `data_dir` that a batch of `kind` is checked against, from the index under
    `index_dir` (built for the shards it lacks or that changed; None: read every shard, keep nothing)."""
    out = Existing()
    code = key_code(id_key, content_key_of)
    for shard_kind in KINDS:
        for shard in shard_files(data_dir / shard_kind):
            entry = _entry(shard, shard_kind, index_dir, id_key, content_key_of, code)
            if shard_kind == kind:
                out.ids.update(entry["ids"])
                for frame, keys in entry["keys"].items():
                    out.keys.setdefault(frame, set()).update(keys)
            if shard_kind == "eval":
                out.eval_prompts.update(entry["prompts"])
            elif shard_kind in TRAINING_KINDS and kind == "eval":  # only an eval batch is checked against them
                out.training_prompts.update(entry["prompts"])
    return out


def _entry(shard: Path, kind: str, index_dir: Path | None, id_key, content_key_of, code: str) -> dict[str, Any]:
    if index_dir is None:
        return shard_entry(shard, kind, id_key, content_key_of)
    at = index_dir / kind / f"{shard.name}.json"
    stamp = _stamp(shard, code)
    try:
        doc = json.loads(at.read_text())
        if doc["stamp"] == stamp:
            return doc
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    doc = {"stamp": stamp, **shard_entry(shard, kind, id_key, content_key_of)}
    if _stamp(shard, code) == stamp:  # not rewritten while it was read
        from components.data.versioning import _write_durably

        try:
            at.parent.mkdir(parents=True, exist_ok=True)
            _write_durably(at, json.dumps(doc))
        except OSError:  # a cache: a state dir that cannot be written costs the next ingest a read, nothing else
            pass
    return doc
