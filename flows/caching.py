"""Stage caching and output dirs: what makes a stage "unchanged", where its output lives, what is pruned.

SFT, the reward model and PPO are Prefect-cached tasks (`CACHED`). A stage's key hashes the data version,
the config sections it reads, its upstream stages' outputs, the seed, the components' code and the
project, so an unchanged stage is skipped on the next run and any change upstream recomputes everything
downstream. The key also names the stage's output dir `<state>/stages/<stage>-<key>`: a killed run
restarted with the same inputs resumes the stage there from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
from prefect import get_run_logger

from components import tracking
from components.config import Config, to_dict
from components.data.versioning import DataState
from components.training.checkpoint import is_complete
from flows.contracts import StageOutput
from flows.locations import available, is_uri

# The config sections each cached stage reads.
STAGE_CONFIG = {
    "base": ("model",),
    "sft": ("sft", "model"),
    "reward-model": ("reward", "model", "data"),  # data: the feedback rating range
    "ppo": ("ppo", "model"),
    "rejection-sampling": ("policy", "ppo", "model"),  # ppo: its sampling, reward and LoRA settings
    "grpo": ("policy", "ppo", "model"),
    "rloo": ("policy", "ppo", "model"),
    "dpo": ("policy", "ppo", "model", "data"),  # data: the rating range of the feedback it reads
    "kto": ("policy", "ppo", "model", "data"),
}
# Bumped when a cached task's result record changes shape, so older records are not read back.
RESULT_SCHEMA = 2

# Results are small JSON records (flows.contracts.StageOutput) in Prefect's local result storage,
# <PREFECT_HOME>/storage, i.e. <state>/prefect/storage for a project.


@functools.cache  # the loaded code cannot change within a process
def code_version() -> str:
    """Hash of the components' source: changed training code invalidates every stage's outputs."""
    import components

    h = hashlib.sha256()
    for path in sorted(Path(components.__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def stage_key(stage: str, cfg: Config, data: DataState, **upstream: Any) -> str:
    return _key(
        stage,
        **_built_from(stage, cfg, data),
        project=str(cfg.state_path),
        where=cfg.infra.training_pool or "here",  # local paths vs URIs of a pool's runs: never mixed
        **upstream,
    )


def reuse_key_of(stage: str, cfg: Config, data: DataState) -> str:
    """The key under which a built demo base is found again by a later retrain on the pool (dispatch's
    `rlhf.reuse_key` tag): what the base is built from, and no path, so that the orchestrator (to look it up) and
    the worker (from the config and data it actually used) compute the same key. A request never carries it."""
    return _key(stage, **_built_from(stage, cfg, data))


def _built_from(stage: str, cfg: Config, data: DataState) -> dict[str, Any]:
    """What a stage's result depends on besides its upstream outputs: data version, seed, code, the config sections
    it reads."""
    return {
        "data": data.version,
        "seed": cfg.seed,
        "code": code_version(),
        "schema": RESULT_SCHEMA,
        **{s: asdict(getattr(cfg, s)) for s in STAGE_CONFIG[stage]},
    }


def validation_key(cfg: Config, data: DataState) -> str:
    """What a data version's validation result depends on: its content (the version is its md5), the data config (the
    rules' parameters), the validation code (components/) and the versions of Great Expectations and pandas."""
    from importlib.metadata import version

    libs = {lib: version(lib) for lib in ("great_expectations", "pandas")}  # the checks run in both
    return _key("validate", data=data.version, code=code_version(), rules=asdict(cfg.data), libs=libs)


def _key(stage: str, **blob: Any) -> str:
    body = json.dumps({"stage": stage, **blob}, sort_keys=True, default=str).encode()
    return f"{stage}-{hashlib.sha256(body).hexdigest()[:16]}"


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: a task whose key has a stored result is not run again (state Cached)."""
    # an input left None (a full retrain's `warm_from`) is not one: the keys stay what they were before it existed
    upstream = {k: v for k, v in parameters.items() if k not in ("cfg", "data", "parent_run_id") and v is not None}
    return stage_key(context.task.name, parameters["cfg"], parameters["data"], **upstream)


CACHED = {"cache_key_fn": stage_cache_key, "persist_result": True, "result_serializer": "json"}


def stage_dir(cfg: Config, stage: str, data: DataState, **upstream: Any) -> Path:
    return cfg.state_path / "stages" / stage_key(stage, cfg, data, **upstream)


class StageDirBusy(RuntimeError):
    """Another process is writing a stage's output dir (never retried)."""


@contextmanager
def stage_dir_lock(out: Path) -> Iterator[Path]:
    """`out` locked for this process while a stage writes it: an exclusive flock on `<state>/locks/<dir>.lock`,
    taken at once or refused in one sentence (StageDirBusy), so two retrains never write one stage dir even if the
    retrain slot failed them. The kernel drops the lock when its holder dies, SIGKILL included; pruning skips a
    locked dir."""
    fh = _lock_file(out).open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        who = fh.read().strip() or "another process"
        fh.close()
        raise StageDirBusy(
            f"stage dir {out} is being written by {who}: two retrains never write one stage dir; wait for that "
            "one to finish (`rlhf status` names the retrain slot's holder)"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield out
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _lock_path(out: Path) -> Path:
    return out.parent.parent / "locks" / f"{out.name}.lock"  # <state>/locks beside <state>/stages


def _lock_file(out: Path) -> Path:
    _lock_path(out).parent.mkdir(parents=True, exist_ok=True)
    return _lock_path(out)


def _locked(d: Path) -> bool:
    """A stage dir some process holds `stage_dir_lock` on."""
    path = _lock_path(d)
    if not path.exists():
        return False
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def stage_root(cfg: Config, path: str) -> Path:
    """The `<state>/stages/<stage>-<key>` dir that holds a stage output path."""
    stages = cfg.state_path / "stages"
    return stages / Path(path).resolve().relative_to(stages.resolve()).parts[0]


def prune_stage_outputs(stages: Path, keep: int | None, in_use: set[Path]) -> list[Path]:
    """Delete all but the `keep` most recently used output dirs of each stage (never one in `in_use`).
    Registered models are self-contained in MLflow, so stage dirs only serve caching and resume; a cached
    result whose dir was pruned is recomputed when next needed. Returns the deleted dirs."""
    if keep is None or not stages.is_dir():
        return []
    by_stage: dict[str, list[Path]] = {}
    for d in stages.iterdir():
        if d.is_dir():
            by_stage.setdefault(d.name.rsplit("-", 1)[0], []).append(d)
    removed = []
    for dirs in by_stage.values():
        dirs.sort(key=lambda d: (d.resolve() in in_use, d.stat().st_mtime), reverse=True)  # in use, then newest
        n_in_use = sum(d.resolve() in in_use for d in dirs)
        for d in dirs[max(keep, 0, n_in_use) :]:
            if _locked(d):  # another retrain is writing it
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def config_hash(cfg: Config) -> str:
    """What the pipeline trains from, besides the data: the resolved config minus where results go and how
    (`retrain.mode`: a full and an incremental retrain of one config are the same config)."""
    return _digest({k: v for k, v in to_dict(cfg).items() if k not in WHERE_AND_HOW})


WHERE_AND_HOW = ("tracking", "infra", "root", "overrides", "retrain")  # not what a model is trained from


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_hash(cfg: Config) -> str:
    """What the stages train from: `config_hash` without the gate and the settings of an incremental retrain itself
    (`*incremental_*`, `reward.replay_ratio`). A champion can be continued from (flows/incremental.py) while this is
    its own: a gate threshold or an incremental step count changed since does not force a full retrain."""

    def strip(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        return {k: strip(v) for k, v in node.items() if not (k.startswith("incremental_") or k == "replay_ratio")}

    return _digest(strip({k: v for k, v in to_dict(cfg).items() if k not in (*WHERE_AND_HOW, "gate")}))


def log_on_parent(metrics: dict[str, float]) -> None:
    """The stages' final metrics also go on the parent run (cached or not), so that retrains of different
    data versions and configs compare side by side in the MLflow UI's run table."""
    mlflow.log_metrics(tracking.finite(metrics))


def output_available(cfg: Config, location: str) -> bool:
    """A cached stage's output can still be read: its local dir complete, or its MLflow run finished (a URI)."""
    if is_uri(location):
        return available(location)
    return Path(location).exists() and is_complete(stage_root(cfg, location))


def run_stage(stage_task, cfg: Config, *args: Any, **kwargs: Any) -> StageOutput:
    """Run a cached stage task. A cache hit adds no child run: the parent run gets the tag
    `cached.<stage>` = the run that computed it. A hit whose output is gone (pruned) or incomplete (a killed
    recompute into the same dir) is recomputed there, resuming from its checkpoints."""
    args = (cfg, *args)
    state = stage_task(*args, **kwargs, return_state=True)
    out: StageOutput = state.result()  # raises the task's exception (e.g. PPODivergence) on failure
    out.cached = state.name == "Cached"
    if out.cached and not output_available(cfg, out.dir):
        get_run_logger().warning(
            "%s: cached output %s is gone or incomplete; recomputing (resumes from its checkpoints)",
            stage_task.name,
            out.dir,
        )
        out = stage_task.with_options(refresh_cache=True)(*args, **kwargs)
    if out.cached:
        get_run_logger().info("%s: unchanged inputs, reusing run %s (%s)", stage_task.name, out.run_id, out.dir)
        mlflow.set_tag(f"cached.{stage_task.name}", out.run_id)
    log_on_parent(out.metrics)
    return out
