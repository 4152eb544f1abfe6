"""Checkpoints for our own training loops (reward model, PPO): atomic step dirs, resume by fingerprint.

Layout: <root>/step-0000050/{meta.json, trainer_state.pt, ...whatever `write` puts there}.
A checkpoint is written to a hidden tmp dir and renamed, so a kill mid-write leaves the
previous checkpoint intact. `latest` only returns a checkpoint whose fingerprint (the
stage config minus its length/interval fields, plus the inputs) equals the current one:
a changed config starts fresh instead of resuming into a different run.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

import torch

META = "meta.json"
STATE = "trainer_state.pt"
# Fields that may change between a run and its resumption (a longer run continues a shorter one).
RESUMABLE_FIELDS = ("max_steps", "steps", "save_steps", "save_every", "log_steps", "sample_every")


def fingerprint(cfg: Any, **inputs: Any) -> str:
    body = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    body = {k: v for k, v in body.items() if k not in RESUMABLE_FIELDS}
    blob = json.dumps({"cfg": body, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save(root: Path, step: int, fp: str, write: Callable[[Path], None], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    (tmp / META).write_text(json.dumps({"step": step, "fingerprint": fp}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path, fp: str) -> tuple[Path, int] | None:
    """The newest complete checkpoint written with this fingerprint, and its step."""
    if not root.is_dir():
        return None
    for d in sorted(root.glob("step-*"), reverse=True):
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") == fp:
            return d, int(meta["step"])
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(directory: Path, **objects: Any) -> None:
    """Optimizer/scheduler state dicts and plain values (loaded back with weights_only=True)."""
    torch.save({k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in objects.items()}, directory / STATE)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE, weights_only=True)


def batch_for_step(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices for a step: a fresh seeded permutation per epoch, so a resumed run sees the
    same batches as an uninterrupted one."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch_size: (k + 1) * batch_size]
