"""PPO-ptx (ppo.ptx_coef): the language-model loss on demonstrations mixed into PPO's (InstructGPT's PPO-ptx). The
loss is transformers' own causal-LM loss; PPO logs it each iteration and it pulls the policy back towards the
demonstrations; a config it cannot serve is refused before any model loads."""

import math
import shutil
from dataclasses import replace

import pytest
import torch

from components.models.loading import resolve_device
from components.training.ppo import build_roles, language_model_loss, load_demonstrations, train_ppo


def test_the_language_model_loss_is_transformers_own(stages, reward):
    """The same number as the model's forward with labels (padding labelled -100), on a padded batch."""
    cfg = stages.cfg
    roles = build_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, resolve_device(cfg.model.device))
    demos = replace(load_demonstrations(cfg.ppo, cfg.data_path, None), tok=roles.tok)
    ids, mask = demos.batch(6, torch.Generator().manual_seed(0))
    assert (mask == 0).any(), "the batch has padding: the test checks it is left out"
    with torch.no_grad():
        ours = language_model_loss(roles, ids, mask)
        labels = ids.masked_fill(mask == 0, -100)
        theirs = roles.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def small(cfg, **kw):
    return replace(cfg, steps=6, batch_size=8, minibatch_size=4, ppo_epochs=2, eval_max_prompts=8, **kw)


def test_ppo_logs_the_ptx_loss_and_it_holds_the_policy_to_the_demonstrations(stages, reward, tmp_path):
    """Same seed, same rollouts at the start: with ptx_coef the run logs ppo/ptx_loss every iteration, and its
    policy's language-model loss on demonstrations ends lower than the plain run's (which only the KL holds)."""
    cfg = stages.cfg
    args = (cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path)
    plain = train_ppo(small(cfg.ppo, learning_rate=5e-3, ptx_coef=0.0), *args, tmp_path / "plain", seed=0)
    ptx = train_ppo(small(cfg.ppo, learning_rate=5e-3, ptx_coef=1.0), *args, tmp_path / "ptx", seed=0)
    assert "ppo/ptx_loss" not in plain.history[0]
    losses = [h["ppo/ptx_loss"] for h in ptx.history]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses

    def demo_loss(policy_dir: str) -> float:
        roles = build_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, resolve_device(cfg.model.device))
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(
            roles.model, load_file(f"{policy_dir}/adapter_model.safetensors"), adapter_name="policy"
        )
        demos = replace(load_demonstrations(cfg.ppo, cfg.data_path, None), tok=roles.tok)
        with torch.no_grad():
            return language_model_loss(roles, *demos.batch(64, torch.Generator().manual_seed(1))).item()

    assert demo_loss(ptx.policy_dir) < demo_loss(plain.policy_dir)


def test_ptx_without_demonstrations_is_refused_in_one_sentence(stages, reward, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stages.cfg.data_path, data, ignore=shutil.ignore_patterns("demonstrations"))
    with pytest.raises(ValueError, match=r"ppo.ptx_coef=0.5 mixes .* has none: ingest some") as e:
        train_ppo(small(stages.cfg.ppo, ptx_coef=0.5), stages.cfg.model, "no-such-sft", None, data, tmp_path / "o")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"ppo.ptx_coef=-1.*must be >= 0"):
        train_ppo(small(stages.cfg.ppo, ptx_coef=-1.0), stages.cfg.model, "no-such-sft", None, data, tmp_path / "o")
