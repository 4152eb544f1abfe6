"""The reward-model ensemble (`reward.ensemble`, issue 30): members trained on bootstrap samples, their disagreement
measured in training-reward stds, logged by PPO, gated, and optionally subtracted from the score PPO optimises."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.evaluation.gate import decide
from components.models.roles import RewardScale, reward_members
from components.training.reward import bootstrap_counts, feedback_loss, train_reward

SHORT = {"max_steps": 60, "save_steps": 1000, "stats_max_responses": 256}


# ---------------------------------------------------------------------------- hand-computed


def test_bootstrap_counts_draw_n_with_replacement_and_are_reproducible():
    c = bootstrap_counts(1000, seed=7)
    assert c.shape == (1000,) and c.sum().item() == 1000 and torch.equal(c, bootstrap_counts(1000, seed=7))
    assert 0.32 < (c == 0).float().mean().item() < 0.42  # about 1/e of the examples are left out
    assert not torch.equal(c, bootstrap_counts(1000, seed=8))
    assert bootstrap_counts(0, seed=7).shape == (0,)


def test_feedback_loss_weighs_each_row_by_its_count():
    scores, targets = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 1.0, 0.0])
    bias = torch.tensor(0.0)
    # BCE per row: log 2 = 0.6931, log(1 + e^-2) = 0.1269, log(1 + e^-1) = 0.3133
    counts = torch.tensor([2.0, 0.0, 1.0])  # row 0 drawn twice, row 1 left out
    expected = (2 * 0.693147 + 0 * 0.126928 + 1 * 0.313262) / 3
    assert feedback_loss(scores, bias, targets, counts).item() == pytest.approx(expected, abs=1e-5)
    assert feedback_loss(scores, bias, targets, torch.ones(3)).item() == pytest.approx(
        feedback_loss(scores, bias, targets).item(), abs=1e-6
    )


def test_reward_scale_normalises_the_mean_and_measures_disagreement_per_member():
    # two members: member 0 centred at 1 with std 2, member 1 at -1 with std 1; the mean score's stats 0 and 1.5
    scale = RewardScale(0.0, 1.5, (1.0, -1.0), (2.0, 1.0))
    members = torch.tensor([[3.0, 0.0], [1.0, -1.0]])  # (B=2, K=2)
    score, spread = scale.normalise(members)
    # row 0: mean 1.5 -> 1.0; standardised members (3-1)/2 = 1 and (0+1)/1 = 1: they agree, spread 0
    # row 1: mean 0 -> 0; standardised 0 and 0: spread 0
    torch.testing.assert_close(score, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(spread, torch.tensor([0.0, 0.0]))
    # row: member 0 says +1 std, member 1 says -1 std: population std of (1, -1) is 1
    _, spread = scale.normalise(torch.tensor([[3.0, -2.0]]))
    torch.testing.assert_close(spread, torch.tensor([1.0]))
    # one member (a head.json without an ensemble): no disagreement
    one = RewardScale.of({"reward_mean": 1.0, "reward_std": 2.0})
    score, spread = one.normalise(torch.tensor([[5.0]]))
    assert score.item() == 2.0 and spread.item() == 0.0


def test_the_gate_refuses_answers_the_ensemble_cannot_judge_and_names_the_measure():
    from components.config import GateConfig

    sft = {"reward_mean": 0.0, "kl": 0.0, "judge_mean": 0.0, "reward_disagreement": 0.2}
    cand = {"reward_mean": 1.0, "kl": 5.0, "judge_mean": 0.5, "reward_disagreement": 0.7}
    cfg = GateConfig(max_disagreement_ratio=2.0)
    verdict = decide(cand, sft, 0.8, "sft", cfg, sft=sft)
    assert not verdict.passed and verdict.reasons == ["disagreement_ratio_vs_sft 3.500 > 2"], verdict.summary()
    assert decide({**cand, "reward_disagreement": 0.3}, sft, 0.8, "sft", cfg, sft=sft).passed
    # a single reward model measures no disagreement: the check does not apply
    single = {k: v for k, v in cand.items() if k != "reward_disagreement"}
    assert decide(single, sft, 0.8, "sft", cfg, sft={**sft}).passed
    # issue 38: the operator configured an ensemble and no disagreement was measured (a remote reward.ensemble=1, a
    # member lost): the gate fails closed and says why, never a silent skip
    unmeasured = decide(single, sft, 0.8, "sft", cfg, sft={**sft}, ensemble=3)
    assert not unmeasured.passed and unmeasured.reasons == ["disagreement_measured 0.000 < 1"], unmeasured.summary()
    assert decide(cand | {"reward_disagreement": 0.3}, sft, 0.8, "sft", cfg, sft=sft, ensemble=3).passed
    assert decide(single, sft, 0.8, "sft", GateConfig(max_disagreement_ratio=None), sft=sft, ensemble=3).passed


# ---------------------------------------------------------------------------- trained


@pytest.fixture(scope="module")
def ensemble(stages, tmp_path_factory):
    """Two members on the demo, 60 steps each."""
    cfg = stages.cfg
    rm_cfg = replace(cfg.reward, ensemble=2, **SHORT)
    out = tmp_path_factory.mktemp("ensemble") / "rm"
    return train_reward(rm_cfg, cfg.model, stages.sft_dir, cfg.data_path, out, seed=cfg.seed, data_cfg=cfg.data)


def test_an_ensemble_trains_its_members_and_records_their_statistics(ensemble):
    out = Path(ensemble.head_dir)
    members = reward_members(out)
    assert members == [("reward", out), ("reward_1", out / "members" / "1")]
    heads = [load_file(str(d / "head.safetensors"))["linear.weight"] for _, d in members]
    assert not torch.equal(heads[0], heads[1])  # its own seed and bootstrap sample
    meta = json.loads((out / "head.json").read_text())["ensemble"]
    assert meta["members"] == ["members/1"] and len(meta["member_mean"]) == len(meta["member_std"]) == 2
    assert min(meta["member_std"]) > 0
    m = ensemble.metrics
    assert m["rm/ensemble"] == 2 and m["rm/ensemble_eval_accuracy"] > 0.7, m
    assert 0 < m["rm/eval_disagreement"] < m["rm/eval_disagreement_p90"] < 1.5, m  # in training-reward stds
    assert math.isfinite(m["rm/eval_accuracy"])  # the first member's own evaluation


def test_the_first_member_is_the_reward_model_without_an_ensemble(stages, ensemble, tmp_path):
    cfg = stages.cfg
    rm_cfg = replace(cfg.reward, ensemble=1, **SHORT)
    single = train_reward(rm_cfg, cfg.model, stages.sft_dir, cfg.data_path, tmp_path / "rm", seed=cfg.seed)
    a = load_file(str(Path(single.head_dir) / "head.safetensors"))
    b = load_file(str(Path(ensemble.head_dir) / "head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert reward_members(single.head_dir) == [("reward", Path(single.head_dir))]


def test_ppo_logs_the_disagreement_and_can_subtract_it(stages, ensemble, tmp_path):
    from components.data.readers import read_prompts
    from components.models.generation import sample
    from components.training.plots import ppo_curves
    from components.training.ppo import build_roles, scores_for, train_ppo

    cfg = stages.cfg
    ppo = replace(cfg.ppo, steps=3, eval_max_prompts=8, uncertainty_penalty=1.0, save_every=1000)
    result = train_ppo(ppo, cfg.model, stages.sft_dir, ensemble.head_dir, cfg.data_path, tmp_path / "ppo", seed=0)
    assert all(h["ppo/rm_disagreement"] > 0 for h in result.history), result.history
    assert result.metrics["ppo/eval_rm_disagreement"] > 0
    (panel,) = [ax for ax in ppo_curves(result.history).axes if "degeneration" in ax.get_title()]
    assert {line.get_label() for line in panel.get_lines()} == {"repeated_word_share", "distinct_2", "rm_disagreement"}

    roles = build_roles(ppo, cfg.model, stages.sft_dir, ensemble.head_dir, "cpu")
    assert roles.reward_members == 2
    prompts = read_prompts(cfg.data_path, "prompts")[:8]
    torch.manual_seed(0)
    ro = sample(roles.model, roles.tok, prompts, 12, 1.0)
    plain = scores_for(roles, ro, prompts, replace(ppo, uncertainty_penalty=0.0))
    conservative = scores_for(roles, ro, prompts, replace(ppo, uncertainty_penalty=2.0))
    assert (plain.disagreement > 0).all()
    torch.testing.assert_close(conservative.score, plain.score - 2.0 * plain.disagreement)
    assert roles.model.active_adapter == "policy"  # scoring by each member switched back to the policy


def test_the_evaluation_measures_the_disagreement_on_each_policys_answers(stages, ensemble):
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies

    cfg = stages.cfg
    gate = replace(cfg.gate, max_prompts=16)
    prompts = read_prompts(cfg.data_path, "eval")
    evals = evaluate_policies(
        [PolicySpec("sft", stages.sft_dir)], stages.sft_dir, ensemble.head_dir, prompts, gate, cfg.model
    )
    assert 0 < evals["sft"].metrics["reward_disagreement"] < 1.5
