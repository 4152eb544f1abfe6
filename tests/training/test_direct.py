"""DPO and KTO (components/training/direct.py): the losses by hand; the data each needs, refused in one sentence; on
the demo the policy's held-out reward rises over SFT's with the KL small, only its LoRA adapter trains, the outputs take
PPO's layout, and a resumed run continues from its checkpoint."""

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import DPOConfig, KTOConfig
from components.training import checkpoint
from components.training.direct import check_config, data_problem, encode_responses, planned_steps, train_direct
from components.training.direct_math import dpo_pair_losses, kto_losses, kto_reference_point, weighted_mean


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log(1 + math.exp(x))


# ---- the losses, by hand
def test_dpo_losses_by_hand():
    """Log-ratios chosen (1, 0), rejected (0, 0.5), beta 0.5: beta d = (0.5, -0.25)."""
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    sigmoid = dpo_pair_losses(c, r, 0.5, "sigmoid")
    assert sigmoid.tolist() == pytest.approx([softplus(-0.5), softplus(0.25)], abs=1e-6)  # 0.4741, 0.8259
    assert dpo_pair_losses(c, r, 0.5, "hinge").tolist() == pytest.approx([0.5, 1.25])
    # ipo: per-token log-ratios (chosen 2 and 4 tokens, rejected 1 and 5): 1/2 - 0/1 = 0.5, 0/4 - 0.5/5 = -0.1;
    # minus 1/(2 beta) = 1, squared: 0.25, 1.21
    ipo = dpo_pair_losses(
        c, r, 0.5, "ipo", chosen_tokens=torch.tensor([2.0, 4.0]), rejected_tokens=torch.tensor([1.0, 5.0])
    )
    assert ipo.tolist() == pytest.approx([0.25, 1.21])
    # robust, e = 0.1: (0.9 * softplus(-0.5) - 0.1 * softplus(0.5)) / 0.8 = (0.42667 - 0.09741) / 0.8 = 0.41158
    robust = dpo_pair_losses(c, r, 0.5, "robust", label_smoothing=0.1)
    assert robust[0].item() == pytest.approx((0.9 * softplus(-0.5) - 0.1 * softplus(0.5)) / 0.8, abs=1e-6)
    assert robust[0].item() == pytest.approx(0.41158, abs=1e-5)
    assert torch.allclose(dpo_pair_losses(c, r, 0.5, "robust", label_smoothing=0.0), sigmoid)
    with pytest.raises(ValueError, match="ipo loss needs each response's token count"):
        dpo_pair_losses(c, r, 0.5, "ipo")


def test_a_rankings_pairs_weigh_as_one_example():
    """A ranking of 3 (its 3 pairs at 1/3) and one pairwise example (weight 1): the ranking's mean loss and the
    pair's, averaged: ((1 + 2 + 3) / 3 + 6) / 2 = 4."""
    losses, weights = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert weighted_mean(losses, weights).item() == pytest.approx(4.0)


def test_kto_loss_by_hand():
    """Log-ratios (1, -1, 0.5), thumbs (up, down, down), mismatched log-ratios (0.2, -0.4, 0.8): z = 0.2. beta 1:
    up 1 - s(1 - 0.2) = 0.31003; down 1 - s(0.2 + 1) = 0.23148; down 1 - s(0.2 - 0.5) = 0.57444."""
    z = kto_reference_point(torch.tensor([0.2, -0.4, 0.8]))
    assert z.item() == pytest.approx(0.2)
    assert kto_reference_point(torch.tensor([-1.0, -2.0])).item() == 0.0, "z is at least 0"
    ratio, up = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([True, False, False])
    assert kto_losses(ratio, up, z, 1.0).tolist() == pytest.approx([0.31003, 0.23148, 0.57444], abs=1e-5)
    weighted = kto_losses(ratio, up, z, 1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert weighted.tolist() == pytest.approx([0.31003, 0.46295, 1.14889], abs=1e-5)
    assert ratio.requires_grad is False and z.requires_grad is False


# ---- what each needs, refused in one sentence
def test_each_method_needs_its_data_kind_and_names_the_other():
    only_pairs = {"preferences_pairwise": 80, "preferences_ranked": 20, "feedback": 0}
    assert data_problem("dpo", only_pairs) is None
    message = data_problem("kto", only_pairs)
    assert message == (
        "policy=kto trains on thumbs up/down (data/feedback/) and this data version has 0 such rows: ingest some with "
        "`rlhf ingest FILE --kind feedback`, or use policy=dpo, which trains on the 100 rows it has"
    )
    only_thumbs = {"feedback": 300}
    assert data_problem("kto", only_thumbs) is None
    assert "or use policy=kto, which trains on the 300 rows it has" in data_problem("dpo", only_thumbs)
    assert data_problem("ppo", {}) is None and "or use" not in data_problem("dpo", {})


def test_small_data_caps_the_steps_at_max_epochs_passes():
    assert planned_steps(DPOConfig(steps=200, max_epochs=10, batch_size=16), 90) == 57  # ceil(10 * 90 / 16)
    assert planned_steps(DPOConfig(steps=200, max_epochs=10, batch_size=16), 1800) == 200
    assert planned_steps(KTOConfig(steps=200, max_epochs=0.01, batch_size=16), 10) == 1


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"policy.dpo.loss_type must be one of sigmoid, ipo, hinge, robust, got 'x'"):
        check_config("dpo", DPOConfig(loss_type="x"))
    with pytest.raises(ValueError, match=r"policy.dpo.label_smoothing must be in \[0, 0.5\), got 0.5"):
        check_config("dpo", DPOConfig(loss_type="robust", label_smoothing=0.5))
    with pytest.raises(ValueError, match=r"policy.kto.beta must be above 0, got 0.*undesirable_weight must be above"):
        check_config("kto", KTOConfig(beta=0.0, undesirable_weight=-1.0))


def test_responses_are_encoded_as_generation_reads_them(stages):
    from components.models.chat import prompt_and_response
    from components.models.loading import load_tokenizer

    tok = load_tokenizer(stages.sft_dir, stages.cfg.model)
    prompts, responses = ["The film was", "A longer prompt about the kettle"], ["great fun", "it broke after a week"]
    ro = encode_responses(tok, prompts, responses, 64, 64, "cpu")
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = ro.sequence[i][ro.sequence_mask[i].bool()].tolist()
        assert ids == tok(prompt_and_response(tok, p, r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ro.ended.all() and ro.query_mask[0, 0] == 0, "prompts left-padded, responses end with EOS"
    cut = encode_responses(tok, prompts, responses, 64, 2, "cpu")
    assert cut.response.shape[1] == 2 and not cut.ended.any(), "a cut response has no EOS"


# ---- on the demo
STEPS = {"dpo": 100, "kto": 100}


@pytest.fixture(scope="module", params=["dpo", "kto"])
def trained(request, stages, reward, tmp_path_factory):
    method, cfg = request.param, stages.cfg
    settings = replace(getattr(cfg.policy, method), steps=STEPS[method], save_every=50)
    out = tmp_path_factory.mktemp(method)
    ppo = replace(cfg.ppo, eval_max_prompts=32)
    result = train_direct(
        method, settings, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, out, cfg.reward.eval_fraction
    )
    return method, out, result


def test_the_held_out_reward_rises_over_sft_with_the_kl_small(trained):
    method, _, result = trained
    m = result.metrics
    assert len(result.history) == STEPS[method]
    assert m[f"{method}/chosen_logratio"] > m[f"{method}/rejected_logratio"], "the judgements are learned"
    assert m[f"{method}/eval_reward"] > m[f"{method}/eval_reward_ref"] + 0.15, m
    assert 0 < m[f"{method}/eval_kl"] < 5, m
    if method == "dpo":
        assert m["dpo/eval_accuracy"] > 0.75, "held-out comparisons ordered as the people did"
    else:
        assert m["kto/eval_auc"] > 0.85, "held-out thumbs separated by the implicit reward"


def test_only_the_policy_adapter_trains_and_the_outputs_take_ppos_layout(stages, trained):
    _, out, result = trained
    assert checkpoint.is_complete(out) and Path(result.policy_dir) == out / "final" / "policy"
    adapter = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B starts at zero: it must move"
    assert (Path(result.policy_dir) / "tokenizer.json").exists()
    sft = load_file(str(Path(stages.sft_dir) / "model.safetensors"))
    from components.models.loading import load_causal_lm

    for k, v in load_causal_lm(stages.sft_dir, stages.cfg.model).state_dict().items():
        assert torch.equal(v, sft.get(k, v)), f"SFT weight {k} changed"


def test_a_resumed_run_continues_from_its_checkpoint(stages, reward, tmp_path):
    cfg = stages.cfg
    short = replace(cfg.policy.kto, steps=2, batch_size=4, save_every=1, eval_max_examples=8)
    ppo = replace(cfg.ppo, eval_max_prompts=4)
    args = ("kto", short, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path)
    full = train_direct(*args, tmp_path / "full", seed=1)
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000001"
    assert ckpt.is_dir()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / ckpt.name)
    resumed = train_direct(*args, tmp_path / "resumed", seed=1)
    assert resumed.metrics["kto/resumed_from_step"] == 1 and full.metrics["kto/resumed_from_step"] == 0
    assert resumed.history[0] == full.history[0]
    assert resumed.history[1]["kto/loss"] == pytest.approx(full.history[1]["kto/loss"], abs=1e-5)
