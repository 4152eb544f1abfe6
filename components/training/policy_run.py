"""One set-up for every critic-free policy stage (rejection sampling, GRPO, RLOO, DPO, KTO): `start_policy_run`.

    start_policy_run(...) -> PolicyRun   roles (the champion's policy with `warm_from`), optimizer, final dir,
                                         fingerprint, checkpoints, and the step and history to resume from
    write_policy_outputs(...)            the outputs in PPO's layout, `final/` renamed in whole, then COMPLETE.json

A method's loop reads the run's `start` and `history`, saves with `run.checkpoints.save(step, history)` and ends
with `write_policy_outputs`. PPO has its own (a critic, a KL controller), on the same roles (`ppo.build_roles`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from components.config import ModelConfig, PPOConfig
from components.models.loading import resolve_device
from components.models.roles import Roles
from components.training import checkpoint
from components.training.ppo import build_roles


@dataclass
class PolicyRun:
    roles: Roles
    params: list[torch.nn.Parameter]  # the trainable ones (the policy adapter's)
    optimizer: torch.optim.Optimizer | None
    final: Path  # out_dir/final: written in whole by write_policy_outputs
    checkpoints: PolicyCheckpoints
    start: int  # the step (or round) to start from: 0, or the last checkpoint's
    history: list[dict[str, float]]  # the metrics per step so far


def start_policy_run(
    settings: dict[str, Any],
    ppo_cfg: PPOConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    reward_dir: str | None,
    data_dir: Path,
    out_dir: Path,
    seed: int,
    warm_from: str | None,
    learning_rate: float | None,
    inputs: dict[str, Any],
    adam_eps: float = 1e-8,
    prepare=lambda roles: None,
) -> PolicyRun:
    """Seed the global RNG (peft's LoRA init draws from it), build the roles (`build_policy_roles`; `prepare(roles)`
    then, e.g. dropout off), AdamW over the trainable parameters (`learning_rate`; None: the method makes its own),
    clear `out_dir/final`, fingerprint the run - `settings` ({method: asdict(cfg)}), PPO's config, the SFT model, the
    data, the seed, the base, the warm start and the method's `inputs` (e.g. the reward dir, the number of prompts) -
    and resume from the last checkpoint of that fingerprint."""
    device = resolve_device(model_cfg.device)
    torch.manual_seed(seed)
    roles = build_policy_roles(ppo_cfg, model_cfg, sft_dir, reward_dir, device, warm_from)
    prepare(roles)
    params = [p for p in roles.model.parameters() if p.requires_grad]
    optimizer = None
    if learning_rate is not None:
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, eps=adam_eps)
    final = out_dir / "final"
    shutil.rmtree(final, ignore_errors=True)  # never leave an older policy where this run's belongs
    fp = checkpoint.fingerprint(
        {**settings, "ppo": asdict(ppo_cfg)},
        sft_dir=str(sft_dir),
        data=str(data_dir),
        seed=seed,
        model=model_cfg.name_or_path,
        **inputs,
        **({"warm_from": str(warm_from)} if warm_from else {}),
    )
    checkpoints = PolicyCheckpoints(roles, out_dir, fp, optimizer)
    start, history = checkpoints.resume()
    return PolicyRun(roles, params, optimizer, final, checkpoints, start, history)


def build_policy_roles(
    cfg: PPOConfig, model_cfg: ModelConfig, sft_dir: str, reward_dir: str | None, device, warm_from: str | None = None
) -> Roles:
    """PPO's roles without a critic, for the policy stages that need none (rejection sampling, GRPO, RLOO, DPO, KTO):
    the policy adapter (trainable, active; the champion's with `warm_from`), the reward model, the reference as the
    adapters disabled."""
    critic_free = replace(cfg, value_init="fresh", value_model="adapter")
    roles = build_roles(critic_free, model_cfg, sft_dir, reward_dir, device, warm_from)
    roles.model.delete_adapter("value")
    roles.value_head, roles.trainable = None, frozenset({"policy"})  # in place: a reward built on roles keeps them
    roles.model.set_adapter("policy")
    return roles


def write_policy_outputs(
    roles: Roles, final: Path, stage: str, metrics: dict[str, float], history: list[dict[str, float]]
) -> str:
    """A critic-free policy stage's outputs in PPO's layout: everything to a tmp dir, one rename to `final/`, then
    `COMPLETE.json` in the stage's out_dir. -> the policy adapter's dir (`final/policy`)."""
    tmp = final.with_name(".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    roles.model.save_pretrained(tmp, selected_adapters=["policy"], safe_serialization=True)  # tmp/policy
    roles.tok.save_pretrained(tmp / "policy")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "history.json").write_text(json.dumps(history))
    tmp.rename(final)
    checkpoint.mark_complete(final.parent, {"stage": stage, "outputs": [final.name], "metrics": metrics})
    return str(final / "policy")


class PolicyCheckpoints:
    """A critic-free policy stage's checkpoints (rejection sampling, GRPO, RLOO, DPO, KTO) under
    `out_dir/checkpoints`: the policy adapter and the trainer state (the optimizer if any, the history, the RNG),
    resumed when the fingerprint matches."""

    def __init__(self, roles: Roles, out_dir: Path, fp: str, optimizer: torch.optim.Optimizer | None = None):
        self.roles, self.root, self.fp = roles, out_dir / "checkpoints", fp
        self.stateful = {"optimizer": optimizer} if optimizer is not None else {}
        checkpoint.recover(self.root)  # what a kill left mid-save, put right before anything reads a checkpoint

    def resume(self) -> tuple[int, list[dict[str, float]]]:
        """-> (the step to start from, the history so far); (0, []) without a checkpoint of this fingerprint."""
        start, state = checkpoint.resume(self.root, self.fp, self._restore, **self.stateful)
        return start, list(state.get("history", []))

    def save(self, step: int, history: list[dict[str, float]]) -> None:
        checkpoint.save(self.root, step, self.fp, lambda d: self._write(d, history))

    def _restore(self, ckpt: Path) -> None:
        checkpoint.load_adapter_weights(self.roles.model, ckpt / "adapters" / "policy", adapter_name="policy")

    def _write(self, d: Path, history: list[dict[str, float]]) -> None:
        self.roles.model.save_pretrained(str(d / "adapters"), selected_adapters=["policy"], safe_serialization=True)
        checkpoint.save_trainer_state(d, **self.stateful, history=history, rng=checkpoint.rng_state())
