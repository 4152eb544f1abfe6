"""GRPO and RLOO (components/training/group_rl.py): the group advantages and the loss by hand; on the demo the
policy's held-out reward rises over SFT's with the KL bounded, only its LoRA adapter trains, the outputs take PPO's
layout, and a resumed run continues from its checkpoint with the same draws."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import GroupRLConfig
from components.training import checkpoint
from components.training.group_rl import check_config, train_group_rl
from components.training.ppo_math import group_policy_loss, grpo_advantages, rloo_advantages


# ---- the math, by hand
def test_grpo_advantages_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 4.0, 2.0]])
    # row 0: mean 2, std (Bessel) 1 -> (-1, 0, 1) / (1 + 1e-4); row 1: no signal; row 2: mean 2, std 2 -> (-1, 1, 0)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])
    expected[0] /= 1 + 1e-4
    expected[2] = expected[2] * 2 / (2 + 1e-4)
    assert torch.allclose(grpo_advantages(scores), expected, atol=1e-7)


def test_rloo_advantages_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]])
    # each minus the mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5; 4 - 1, 0 - 3, 2 - 2
    assert torch.equal(rloo_advantages(scores), torch.tensor([[-1.5, 0.0, 1.5], [3.0, -3.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.ones(3, 1))


def test_group_policy_loss_by_hand():
    """Two rows of two tokens, the second row's last token padding. Row 0: ratio e^0.5 (1.6487) clipped to 1.2 for
    A = +1 -> max(-1.6487, -1.2) = -1.2 per token; row 1: ratio 1, A = -2 -> 2. Token mean over 3 tokens:
    (-1.2 - 1.2 + 2) / 3 = -0.1333. k3 with ref - new = -0.5 on row 0 (e^-0.5 - 1 + 0.5 = 0.10653), 0 on row 1:
    mean (0.10653 * 2 + 0) / 3 = 0.071020; with kl_coef 0.5 the loss adds 0.035510."""
    new = torch.tensor([[0.0, 0.0], [-1.0, -1.0]])
    old = torch.tensor([[-0.5, -0.5], [-1.0, -1.0]])
    ref = torch.tensor([[-0.5, -0.5], [-1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, clipfrac, kl = group_policy_loss(new, old, ref, adv, mask, cliprange=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx(-0.4 / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert kl.item() == pytest.approx(2 * (torch.exp(torch.tensor(-0.5)).item() - 1 + 0.5) / 3, abs=1e-6)
    with_kl, _, _ = group_policy_loss(new, old, ref, adv, mask, cliprange=0.2, kl_coef=0.5)
    assert with_kl.item() == pytest.approx(-0.4 / 3 + 0.5 * kl.item(), abs=1e-6)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"policy.rloo.samples_per_prompt must be at least 2 \(a group\), got 1"):
        check_config("rloo", GroupRLConfig(samples_per_prompt=1))
    with pytest.raises(ValueError, match=r"minibatch_size must be in 1..8"):
        check_config("grpo", GroupRLConfig(prompts_per_step=4, samples_per_prompt=2, minibatch_size=16))


# ---- on the demo
SETTINGS = {"steps": 16, "prompts_per_step": 8, "samples_per_prompt": 4, "save_every": 8}


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def trained(request, stages, reward, tmp_path_factory):
    algorithm, cfg = request.param, stages.cfg
    settings = replace(getattr(cfg.policy, algorithm), **SETTINGS)
    out = tmp_path_factory.mktemp(algorithm)
    ppo = replace(cfg.ppo, eval_max_prompts=32)
    result = train_group_rl(algorithm, settings, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, out)
    return algorithm, out, result


def test_the_held_out_reward_rises_over_sft_with_the_kl_bounded(trained):
    algorithm, _, result = trained
    m = result.metrics
    assert len(result.history) == SETTINGS["steps"]
    first, last = result.history[0], result.history[-1]
    assert last[f"{algorithm}/score_mean"] > first[f"{algorithm}/score_mean"], "the samples improve"
    assert m[f"{algorithm}/eval_reward"] > m[f"{algorithm}/eval_reward_ref"] + 0.2, m
    assert 0 < m[f"{algorithm}/eval_kl"] < 30, m
    assert m[f"{algorithm}/samples"] == 16 * 8 * 4


def test_only_the_policy_adapter_trains_and_the_outputs_take_ppos_layout(stages, trained):
    _, out, result = trained
    assert checkpoint.is_complete(out) and Path(result.policy_dir) == out / "final" / "policy"
    adapter = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B starts at zero: it must move"
    assert (Path(result.policy_dir) / "tokenizer.json").exists() and not (out / "final" / "value").exists()
    sft = load_file(str(Path(stages.sft_dir) / "model.safetensors"))
    from components.models.loading import load_causal_lm

    for k, v in load_causal_lm(stages.sft_dir, stages.cfg.model).state_dict().items():
        assert torch.equal(v, sft.get(k, v)), f"SFT weight {k} changed"


def test_a_resumed_run_continues_from_its_checkpoint(stages, reward, tmp_path):
    cfg = stages.cfg
    short = replace(cfg.policy.grpo, steps=2, prompts_per_step=4, samples_per_prompt=2, minibatch_size=8, save_every=1)
    ppo = replace(cfg.ppo, eval_max_prompts=4)
    args = ("grpo", short, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path)
    full = train_group_rl(*args, tmp_path / "full", seed=1)
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000001"
    assert ckpt.is_dir()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / ckpt.name)
    resumed = train_group_rl(*args, tmp_path / "resumed", seed=1)
    assert resumed.metrics["grpo/resumed_from_step"] == 1 and full.metrics["grpo/resumed_from_step"] == 0
    assert resumed.history[0] == full.history[0]
    assert resumed.history[1]["grpo/score_mean"] == pytest.approx(full.history[1]["grpo/score_mean"], abs=1e-4)
