"""The warm-start bundle a registered model carries (its `warm_start` artifact), so that an incremental retrain
continues from the champion without reading any stage dir (those may be pruned: `infra.keep_stage_outputs`):

    warm_start/lineage.json       what it was trained on (components/data/lineage.py) and its parents
    warm_start/reward/            the reward model: adapter/, head.safetensors, head.json, members/<k>/ (an ensemble)
    warm_start/policy/            the policy adapter
    warm_start/value/             PPO's value head (and adapter, ppo.value_model=adapter); absent for the other methods

Serving never reads it. A trainer given `warm_from` (this dir) starts from these weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.models.roles import HEAD_FILE, HEAD_META

LINEAGE = "lineage.json"


def stage(dest: Path, reward_dir: str | None, policy_dir: str, lineage: dict) -> Path:
    """Write the bundle to `dest` (a new dir) from the stages' outputs: the reward model without its checkpoints, the
    policy adapter and, beside it, PPO's value (`<final>/value`) when there is one."""
    dest.mkdir(parents=True)
    if reward_dir:
        _copy_reward(Path(reward_dir), dest / "reward")
    shutil.copytree(policy_dir, dest / "policy")
    value = Path(policy_dir).parent / "value"
    if value.is_dir():
        shutil.copytree(value, dest / "value")
    (dest / LINEAGE).write_text(json.dumps(lineage, indent=1, sort_keys=True))
    return dest


def _copy_reward(src: Path, dest: Path) -> None:
    """A reward model's adapter and head, and each ensemble member's: not the checkpoints."""
    dest.mkdir(parents=True)
    shutil.copytree(src / "adapter", dest / "adapter")
    for name in (HEAD_FILE, HEAD_META):
        shutil.copy2(src / name, dest / name)
    members = src / "members"
    for member in sorted(members.iterdir()) if members.is_dir() else []:
        _copy_reward(member, dest / "members" / member.name)


def lineage(warm_dir: str | Path) -> dict:
    """The bundle's lineage.json, with `version` (the registered version it came with) when the registry's fetch
    recorded it (`registered.json`)."""
    out = json.loads((Path(warm_dir) / LINEAGE).read_text())
    registered = Path(warm_dir) / "registered.json"
    if registered.is_file():
        out["version"] = json.loads(registered.read_text())["version"]
    return out


def reward_member(warm_dir: str | Path, index: int) -> Path:
    """The bundle's reward member `index` (0: the first), or the first when the bundle has fewer: a new member
    starts from the ensemble's first."""
    root = Path(warm_dir) / "reward"
    member = root / "members" / str(index)
    return member if index and member.is_dir() else root
