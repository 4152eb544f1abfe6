"""GRPO and RLOO (components/training/group_rl.py): the group advantages and the loss by hand; on the demo the
policy's held-out reward rises over SFT's with the KL bounded, only its LoRA adapter trains against the SFT model as
the reference, the outputs take PPO's layout, and a run killed and resumed ends where an uninterrupted one does, with
the same draws."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import GroupRLConfig
from components.training import checkpoint, group_rl, policy_run
from components.training.direct import device_of, encode_responses
from components.training.group_rl import check_config, train_group_rl
from components.training.ppo import policy_logits, reference_logprobs
from components.training.ppo_math import group_policy_loss, grpo_advantages, logprobs_of, rloo_advantages
from tests.training.test_direct import Killed, keeping_roles, killed_at, untimed


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
    built: list = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(policy_run, "build_policy_roles", keeping_roles(policy_run, built))
        result = train_group_rl(
            algorithm, settings, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, out
        )
    return algorithm, out, result, built[0]


def test_the_held_out_reward_rises_over_sft_with_the_kl_bounded(trained):
    algorithm, _, result, _ = trained
    m = result.metrics
    assert len(result.history) == SETTINGS["steps"]
    first, last = result.history[0], result.history[-1]
    assert last[f"{algorithm}/score_mean"] > first[f"{algorithm}/score_mean"], "the samples improve"
    assert m[f"{algorithm}/eval_reward"] > m[f"{algorithm}/eval_reward_ref"] + 0.2, m
    assert 0 < m[f"{algorithm}/eval_kl"] < 30, m
    assert m[f"{algorithm}/samples"] == 16 * 8 * 4


def test_only_the_policy_adapter_trains_against_the_sft_model_and_the_outputs_take_ppos_layout(stages, trained):
    """On the model the stage trained: its trainable parameters are exactly the policy adapter it saved, every base
    weight is still the SFT file's, and the reference's log-probs are those of the SFT model loaded on its own, from
    which the policy has moved."""
    _, out, result, roles = trained
    assert checkpoint.is_complete(out) and Path(result.policy_dir) == out / "final" / "policy"
    assert (Path(result.policy_dir) / "tokenizer.json").exists() and not (out / "final" / "value").exists()
    adapter = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    trainable = {n.replace(".policy.", "."): p for n, p in roles.model.named_parameters() if p.requires_grad}
    assert adapter and trainable.keys() == adapter.keys() and all("lora_" in k for k in adapter)
    assert all(torch.equal(p.detach().cpu(), adapter[k]) for k, p in trainable.items()), "the trained adapter, saved"
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B starts at zero: it must move"
    sft = load_file(str(Path(stages.sft_dir) / "model.safetensors"))
    base = {
        n.replace(".base_layer", ""): p for n, p in roles.model.get_base_model().named_parameters() if "lora_" not in n
    }
    assert base.keys() == sft.keys()
    # to float rounding: each step samples with the LoRA folded into the base and out again (`lora_merged`), which
    # leaves fp32 weights within a few ulp; a training step would move them by ~ the learning rate
    changed = [k for k, p in base.items() if not torch.allclose(p.detach().cpu(), sft[k], rtol=0, atol=1e-6)]
    assert not changed, f"SFT weights changed in training: {changed}"

    from components.models.loading import load_causal_lm

    device, T = device_of(roles), stages.cfg.ppo.temperature
    ro = encode_responses(roles.tok, ["The film was", "The kettle"], ["great fun", "broke"], 64, 16, device)
    q_len = ro.query.shape[1]
    with torch.no_grad():
        reference = reference_logprobs(roles, ro, T)
        policy = logprobs_of(policy_logits(roles, ro.sequence, ro.sequence_mask, q_len), ro.response, T)
        sft_model = load_causal_lm(stages.sft_dir, stages.cfg.model, device).eval()
        sft_logits = sft_model(input_ids=ro.sequence, attention_mask=ro.sequence_mask).logits[:, q_len - 1 : -1]
    mask = ro.response_mask.bool()
    assert torch.allclose(reference[mask], logprobs_of(sft_logits, ro.response, T)[mask], atol=1e-4), "the SFT model"
    assert (policy[mask] - reference[mask]).abs().max() > 0.05, "the policy moved from the reference"


def test_a_run_killed_and_resumed_ends_where_an_uninterrupted_run_does(stages, reward, tmp_path, monkeypatch):
    """A run killed in its second step, run again in its dir, resumes from its own step-1 checkpoint and ends where an
    uninterrupted run does: the same history (times aside) and adapter, so the same draws. Each run computes its own
    steps, so the first row is compared between two runs, not copied from one into the other."""
    cfg = stages.cfg
    short = replace(cfg.policy.grpo, steps=2, prompts_per_step=4, samples_per_prompt=2, minibatch_size=8, save_every=1)
    ppo = replace(cfg.ppo, eval_max_prompts=0)  # no held-out sampling: the adapters compared say more, in less time
    args = ("grpo", short, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path)
    full = train_group_rl(*args, tmp_path / "full", seed=1)
    with monkeypatch.context() as m:
        killed_at(m, group_rl, "update", call=2)
        with pytest.raises(Killed):
            train_group_rl(*args, tmp_path / "run", seed=1)
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir() and not checkpoint.is_complete(tmp_path / "run")
    resumed = train_group_rl(*args, tmp_path / "run", seed=1)
    assert resumed.metrics["grpo/resumed_from_step"] == 1 and full.metrics["grpo/resumed_from_step"] == 0
    assert len(resumed.history) == len(full.history) == 2
    for got, want in zip(untimed(resumed.history), untimed(full.history), strict=True):
        assert got == pytest.approx(want, abs=1e-4, nan_ok=True)
    (got,), (want,) = (untimed([{k: v for k, v in r.metrics.items() if "resumed" not in k}]) for r in (resumed, full))
    assert got == pytest.approx(want, abs=1e-4, nan_ok=True)
    adapters = [load_file(str(Path(r.policy_dir) / "adapter_model.safetensors")) for r in (resumed, full)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0]), "the same adapter"
