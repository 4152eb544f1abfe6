"""Shared fixtures: real tools everywhere - a git + DVC repo in a tmp dir, SQLite MLflow,
one Prefect test server per session (prefect_test_harness), Great Expectations file contexts."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from service.env import PROCESS_ENV  # noqa: E402  (imports no Prefect: its settings are read at import)

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
for key, value in {**PROCESS_ENV, "PREFECT_HOME": str(_SESSION_DIR / "prefect")}.items():
    os.environ[key] = value

from dataclasses import dataclass  # noqa: E402

from components.config import Config, compose  # noqa: E402

# Flow tests exercise the wiring, not the learning (tests/training covers that): a few steps per stage.
FAST_STAGES = (
    "model.pretrain_steps=30",
    "sft.max_steps=10",
    "sft.save_steps=10",
    "reward.max_steps=10",
    "reward.save_steps=10",
    "reward.stats_max_responses=64",
    "ppo.steps=2",
    "ppo.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.eval_max_prompts=8",
)

# A gate every candidate passes: flow tests exercise registration and promotion, not model quality.
OPEN_GATE = (
    "gate.min_reward_gain=-100",
    "gate.min_win_rate=0",
    "gate.min_judge_gain=null",
    "gate.max_kl=1e9",
    "gate.max_prompts=8",
    "gate.max_repeated_word_gain=null",  # the guard on 8 prompts: one answer is 0.125 of the share
    "gate.min_distinct_2_ratio=null",
    "gate.max_disagreement_ratio=null",
    "gate.min_new_accuracy_gain=null",
)


def make_project(root: Path, *overrides: str) -> Config:
    """A fresh project dir: a git repo (as a clone would be) with the small demo config and fast stages."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return compose([f"root={root}", "data=demo_small", *FAST_STAGES, *overrides])


@pytest.fixture
def project(tmp_path: Path) -> Config:
    return make_project(tmp_path / "proj")


@pytest.fixture(scope="session", autouse=True)
def _stop_temporary_prefect_servers():
    """Stop any temporary Prefect server a test started (a flow run without `prefect_server`) at the last test's
    teardown, where its output is captured like the test's. Prefect stops it at exit otherwise, after pytest's
    summary, and its "Stopping temporary server" line then hits a closed stream with a logging traceback."""
    yield
    import inspect
    import sys

    server = sys.modules.get("prefect.server.api.server")
    running = [s for s in set(server.SubprocessASGIServer._instances.values()) if s.running] if server else []
    if not running:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():  # what prefect_test_harness does before it stops its server: logs and events sent first
        for result in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())
    for instance in running:
        instance.stop()


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---- trained stages on the full demo (session-scoped: built once, only when a test asks) ----
@dataclass
class Stages:
    cfg: Config
    root: Path
    base_dir: str
    sft_dir: str  # merged SFT weights: the base of every later role


@pytest.fixture(scope="session")
def stages(tmp_path_factory) -> Stages:
    """Default demo data, the tiny base, SFT with default settings (what `make run` trains)."""
    from components.data.demo import write_demo
    from components.models.demo_base import build_demo_base
    from components.training.sft import train_sft

    root = tmp_path_factory.mktemp("stages")
    cfg = compose([f"root={root}"])  # default stage settings: what `make run` trains
    write_demo(cfg.data, cfg.data_path)
    base = build_demo_base(cfg.model, cfg.data_path, "v1", cfg.state_path / "models")
    sft = train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, root / "sft", seed=cfg.seed)
    return Stages(cfg, root, base.path, sft.merged_dir)


@pytest.fixture(scope="session")
def reward(stages):
    from components.training.reward import train_reward

    return train_reward(
        stages.cfg.reward,
        stages.cfg.model,
        stages.sft_dir,
        stages.cfg.data_path,
        stages.root / "rm",
        seed=stages.cfg.seed,
    )
