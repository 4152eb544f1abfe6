"""One demo project per test session with the trained stages the RM and PPO tests build on:
the full default demo data, the tiny base, SFT and the reward model with default settings (CPU, ~1.5 min)."""
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.config import Config, compose
from components.data.demo import write_demo
from components.models.demo_base import build_demo_base
from components.training.reward import RewardResult, train_reward
from components.training.sft import train_sft


@dataclass
class Stages:
    cfg: Config
    root: Path
    base_dir: str
    sft_dir: str  # merged SFT weights: the base of every later role


@pytest.fixture(scope="session")
def stages(tmp_path_factory) -> Stages:
    root = tmp_path_factory.mktemp("stages")
    cfg = compose([f"root={root}"])  # default stage settings: what `make run` trains
    write_demo(cfg.data, cfg.data_path)
    base = build_demo_base(cfg.model, cfg.data_path, "v1", cfg.state_path / "models")
    sft = train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, root / "sft", seed=cfg.seed)
    return Stages(cfg, root, base.path, sft.merged_dir)


@pytest.fixture(scope="session")
def reward(stages) -> RewardResult:
    return train_reward(stages.cfg.reward, stages.cfg.model, stages.sft_dir, stages.cfg.data_path,
                        stages.root / "rm", seed=stages.cfg.seed)
