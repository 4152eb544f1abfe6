"""Checkpoints for our own training loops (reward model, PPO): atomic step dirs, resume by fingerprint;
completion markers for HF Trainer checkpoints (SFT) and for a stage's output dir.

Layout: <root>/step-0000050/{meta.json, trainer_state.pt, ...whatever `write` puts there}.
A checkpoint is written to a hidden tmp dir (`.tmp-step-*`), fsynced, and renamed into place, so a
kill mid-write leaves the previous checkpoint intact. Re-saving an existing step moves the old dir
aside (`.old-step-*`) before the new one is renamed in and deletes it only afterwards; `save` and
`latest` finish or undo whatever a kill left half done (leftover tmp dirs are removed, a dir left
aside with nothing in its place is renamed back). `latest` only returns a checkpoint whose
fingerprint (the stage config minus its length/interval fields, plus the inputs) equals the
current one: a changed config starts fresh instead of resuming into a different run.

HF Trainer (SFT) writes `checkpoint-N` in place, so a kill mid-save leaves a partial dir that
`transformers.trainer_utils.get_last_checkpoint` would pick: `CheckpointCompleteCallback`
(callbacks.py) writes `CHECKPOINT_MARKER` into each checkpoint once saved, and
`last_complete_checkpoint` resumes only from marked ones (removing the rest).

A stage's output dir (`out_dir` of train_sft / train_reward / train_ppo) is complete only when it
holds `COMPLETE.json`, written atomically as the stage's last step by `mark_complete`; the stage
removes it first thing (`mark_incomplete`), so a recompute into the same dir is not complete until
it finishes. Callers check `is_complete(out_dir)`, not that the dir exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

META = "meta.json"
STATE = "trainer_state.pt"
CHECKPOINT_MARKER = "checkpoint_complete.json"  # in an HF `checkpoint-N` dir once it is fully saved
COMPLETE = "COMPLETE.json"  # in a stage's output dir once all its outputs are written
# Fields that may change between a run and its resumption (a longer run continues a shorter one).
RESUMABLE_FIELDS = ("max_steps", "steps", "save_steps", "save_every", "log_steps", "sample_every")
_HF_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------- durable writes


def fsync_dir(directory: Path) -> None:
    """Make renames/creations in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every regular file under `path` (or `path` itself) and the directories holding them."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def write_json_durable(path: Path, obj: Any) -> None:
    """Write JSON to `path` atomically: a tmp file written, flushed and fsynced, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------- our step checkpoints


def fingerprint(cfg: Any, **inputs: Any) -> str:
    body = asdict(cfg) if is_dataclass(cfg) and not isinstance(cfg, type) else dict(cfg)
    body = {k: v for k, v in body.items() if k not in RESUMABLE_FIELDS}
    blob = json.dumps({"cfg": body, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recover(root: Path) -> None:
    """Finish or undo what a kill during `save` left in `root`.

    `.old-step-N` (an existing step-N moved aside while re-saving it): if step-N is back in place the
    kill came after the new dir was renamed in, so the old one goes; if not, it came between the two
    renames, so the old one is renamed back. `.tmp-step-*` (a checkpoint being written) is removed.
    """
    if not root.is_dir():
        return
    for old in sorted(root.glob(".old-step-*")):
        final = root / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
            fsync_dir(root)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save(root: Path, step: int, fp: str, write: Callable[[Path], None], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    recover(root)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    old = root / f".old-step-{step:07d}"
    tmp.mkdir()
    write(tmp)
    fsync_tree(tmp)  # the checkpoint's files are on disk before meta.json says it is complete
    with open(tmp / META, "w") as f:
        f.write(json.dumps({"step": step, "fingerprint": fp}))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # re-saving a step: old aside, new in, then old deleted (`recover` handles a kill between)
        final.rename(old)
        tmp.rename(final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
        fsync_dir(root)
    for stale in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(root: Path, fp: str) -> tuple[Path, int] | None:
    """The newest complete checkpoint written with this fingerprint, and its step."""
    if not root.is_dir():
        return None
    recover(root)
    for d in sorted(root.glob("step-*"), reverse=True):
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") == fp:
            return d, int(meta["step"])
    return None


# ---------------------------------------------------------------------------- HF Trainer checkpoints (SFT)


def mark_checkpoint_complete(checkpoint_dir: Path, step: int) -> None:
    """Called once HF has finished saving `checkpoint_dir`: its files to disk, then the marker."""
    fsync_tree(checkpoint_dir)
    write_json_durable(checkpoint_dir / CHECKPOINT_MARKER, {"step": step})


def last_complete_checkpoint(directory: Path | str) -> Path | None:
    """The HF `checkpoint-N` dir with the highest N that holds the completion marker, or None.

    `checkpoint-N` dirs without the marker (a save killed midway, or written before markers
    existed) are removed: HF would otherwise pick them (`get_last_checkpoint`), fail to load them, and
    its checkpoint rotation would count them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    complete: list[tuple[int, Path]] = []
    for d in directory.iterdir():
        m = _HF_CHECKPOINT.match(d.name)
        if not m or not d.is_dir():
            continue
        if (d / CHECKPOINT_MARKER).is_file():
            complete.append((int(m.group(1)), d))
        else:
            shutil.rmtree(d, ignore_errors=True)
    return max(complete)[1] if complete else None


# ---------------------------------------------------------------------------- stage output dirs


def mark_incomplete(out_dir: Path) -> None:
    """Remove a stage's completion marker (first thing a stage does before writing into `out_dir`)."""
    marker = Path(out_dir) / COMPLETE
    if marker.exists():
        marker.unlink()
        fsync_dir(marker.parent)


def mark_complete(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Declare `out_dir` complete: the LAST step of a stage. `manifest["outputs"]` lists the output
    paths relative to `out_dir`; they are fsynced, then `COMPLETE.json` (the manifest) is written
    atomically (tmp + fsync + os.replace). Returns the marker's path."""
    out_dir = Path(out_dir)
    for rel in manifest.get("outputs", []):
        fsync_tree(out_dir / rel)
    marker = out_dir / COMPLETE
    write_json_durable(marker, manifest)
    return marker


def is_complete(out_dir: Path | str) -> bool:
    """True when `out_dir` holds a readable COMPLETE.json and every output it lists exists."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    return all((out_dir / rel).exists() for rel in manifest.get("outputs", []))


# ---------------------------------------------------------------------------- trainer state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
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


def resume(root: Path, fp: str, restore: Callable[[Path], None], **stateful: Any) -> tuple[int, dict[str, Any]]:
    """Continue from the newest checkpoint under `root` written with fingerprint `fp`, if there is one (the
    reward model and PPO both resume this way): `restore(ckpt)` loads the weights in place (so the optimizer
    keeps its parameters), each object in `stateful` (optimizer=..., scheduler=...) gets its saved state_dict
    back, and the RNG state is restored. -> (the checkpoint's step, its trainer state, for the caller's plain
    values); (0, {}) when there is none."""
    found = latest(root, fp)
    if found is None:
        return 0, {}
    ckpt, step = found
    state = load_trainer_state(ckpt)
    restore(ckpt)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return step, state


def load_adapter_weights(model, adapter_dir: Path, adapter_name: str = "default") -> None:
    """A peft adapter's saved weights (`adapter_dir/adapter_model.safetensors`), in place, into `adapter_name`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(
        model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")), adapter_name=adapter_name
    )


def batch_for_step(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices for a step: a fresh seeded permutation per epoch, so a resumed run sees the
    same batches as an uninterrupted one."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch_size : (k + 1) * batch_size]
