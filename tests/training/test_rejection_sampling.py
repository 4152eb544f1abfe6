"""Rejection-sampling fine-tuning: the selection by hand; exactly the configured fraction kept; on the demo the
policy's held-out reward rises, only its LoRA adapter trains, and the outputs take PPO's layout."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import RejectionSamplingConfig
from components.training import checkpoint
from components.training.rejection_sampling import (
    check_config,
    keep_count,
    select_best,
    train_rejection_sampling,
)


def test_select_best_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, -1.0, 2.0, 0.0]])
    assert select_best(scores, 0.25).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert select_best(scores, 0.5).tolist() == [[False, True, True, False], [True, False, True, False]]
    # a threshold drops kept samples below it (row 1 keeps none)
    assert select_best(scores, 0.5, min_score=0.6).tolist() == [[False, True, False, False], [True, False, True, False]]
    assert select_best(scores, 0.5, min_score=5.0).sum() == 0
    assert [keep_count(f, n) for f, n in ((0.25, 4), (0.5, 3), (0.01, 8), (1.0, 5), (0.3, 10))] == [1, 2, 1, 5, 3]


@pytest.mark.parametrize("prompts,n,fraction", [(10, 4, 0.25), (7, 8, 0.5), (3, 5, 0.4), (16, 2, 1.0)])
def test_keeps_exactly_the_configured_fraction_and_the_best(prompts, n, fraction):
    g = torch.Generator().manual_seed(prompts * n)
    scores = torch.randn(prompts, n, generator=g)
    kept = select_best(scores, fraction)
    assert kept.sum().item() == prompts * round(fraction * n)  # these fractions x n are whole numbers
    assert (kept.sum(1) == round(fraction * n)).all()
    for row, k in zip(scores, kept, strict=True):  # each prompt's kept samples outscore its dropped ones
        if (~k).any():
            assert row[k].min() >= row[~k].max()


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(
        ValueError, match=r"rounds must be at least 1, got 0; .*keep_fraction must be in \(0, 1\], got 0.0"
    ):
        check_config(RejectionSamplingConfig(keep_fraction=0.0, rounds=0))


@pytest.fixture(scope="module")
def rs(stages, reward, tmp_path_factory):
    cfg = stages.cfg
    out = tmp_path_factory.mktemp("rs")
    result = train_rejection_sampling(
        cfg.policy.rejection_sampling, cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, out, seed=0
    )
    return out, result


def test_rejection_sampling_raises_held_out_reward(stages, rs):
    _, result = rs
    m, rs_cfg = result.metrics, stages.cfg.policy.rejection_sampling
    assert len(result.history) == rs_cfg.rounds
    for row in result.history:  # one kept sample per prompt (0.25 of 4), the best, so above the mean
        assert row["rs/kept"] == rs_cfg.prompts_per_round
        assert row["rs/score_kept_mean"] == pytest.approx(row["rs/score_best_mean"])
        assert row["rs/score_kept_mean"] > row["rs/score_mean"]
    assert result.history[-1]["rs/score_mean"] > result.history[0]["rs/score_mean"], "the samples improve"
    assert m["rs/eval_reward"] > m["rs/eval_reward_ref"] + 0.2, m
    assert 0 < m["rs/eval_kl"] < 30, m
    assert m["rs/samples"] == stages.cfg.ppo.steps * stages.cfg.ppo.batch_size, "as many samples as PPO's defaults"


def test_only_the_policy_adapter_trains_and_outputs_take_ppos_layout(stages, rs):
    out, result = rs
    assert checkpoint.is_complete(out) and Path(result.policy_dir) == out / "final" / "policy"
    adapter = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B starts at zero: it must move"
    assert (Path(result.policy_dir) / "tokenizer.json").exists()
    assert not (out / "final" / "value").exists() and not (out / "trainer").exists()
    sft = load_file(str(Path(stages.sft_dir) / "model.safetensors"))
    from components.models.loading import load_causal_lm

    for k, v in load_causal_lm(stages.sft_dir, stages.cfg.model).state_dict().items():
        assert torch.equal(v, sft.get(k, v)), f"SFT weight {k} changed"


def test_a_resumed_run_continues_from_its_last_round(stages, reward, tmp_path):
    cfg = stages.cfg
    short = replace(cfg.policy.rejection_sampling, rounds=2, prompts_per_round=8, samples_per_prompt=2)
    ppo = replace(cfg.ppo, eval_max_prompts=4, batch_size=16)
    args = (short, ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path)
    full = train_rejection_sampling(*args, tmp_path / "full", seed=1)
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000001"
    assert ckpt.is_dir()
    resumed_dir = tmp_path / "resumed" / "checkpoints" / ckpt.name
    import shutil

    shutil.copytree(ckpt, resumed_dir)
    resumed = train_rejection_sampling(*args, tmp_path / "resumed", seed=1)
    assert resumed.metrics["rs/resumed_from_round"] == 1 and full.metrics["rs/resumed_from_round"] == 0
    assert resumed.history[0] == full.history[0]
    assert resumed.history[1]["rs/score_mean"] == pytest.approx(full.history[1]["rs/score_mean"], abs=1e-4)
