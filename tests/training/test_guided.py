"""Guided RL (RLGF): the shares of roll-ins and roll-outs, zero gradient at the guide's positions, and plain
PPO bit for bit when the guide takes no part. The tiny demo models on CPU (session fixtures `stages`, `reward`)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.data.readers import read_prompts
from components.models.guide import load_guide
from components.training import guided
from components.training.guided import POLICY, ROLLIN, ROLLOUT, assign_kinds, cut_points, rollin_lengths
from components.training.ppo import build_roles, ppo_update, score_rollout, train_ppo
from components.training.ppo_math import RunningMoments


# ---------------------------------------------------------------------------- the random choices
@pytest.mark.parametrize("n, rollin, rollout", [(32, 0.25, 0.5), (1000, 0.3, 0.2), (10, 0.25, 0.25), (7, 1.0, 0.0)])
def test_shares_match_their_probabilities_on_every_batch(n, rollin, rollout):
    for seed in range(50):
        kinds = assign_kinds(n, rollin, rollout, torch.Generator().manual_seed(seed))
        assert abs((kinds == ROLLIN).float().mean().item() - rollin) < 1 / n
        assert abs((kinds == ROLLOUT).float().mean().item() - rollout) < 1 / n


def test_shares_are_unbiased_when_n_times_p_is_not_whole():
    # 10 rows at 0.25 = 2.5 rows: 2 or 3 each batch, 2.5 on average (stochastic rounding, not round-half-even)
    counts = [
        (assign_kinds(10, 0.25, 0.0, torch.Generator().manual_seed(s)) == ROLLIN).sum().item() for s in range(4000)
    ]
    assert set(counts) == {2, 3} and sum(counts) / len(counts) == pytest.approx(2.5, abs=0.05)


def test_no_random_draw_without_guidance():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert (assign_kinds(16, 0.0, 0.0, g) == POLICY).all()
    assert torch.equal(g.get_state(), state)


def test_rollin_lengths_and_cut_points_stay_in_range():
    g = torch.Generator().manual_seed(0)
    kinds = torch.tensor([ROLLIN] * 500 + [POLICY] * 10)
    h = rollin_lengths(kinds, 4, g)
    assert set(h[:500].tolist()) == {0, 1, 2, 3, 4} and (h[500:] == 0).all()
    allowed = torch.tensor([[False, True, False, True], [False, False, False, False], [False, True, True, True]])
    for _ in range(50):
        t = cut_points(allowed, torch.tensor([ROLLOUT, ROLLOUT, POLICY]), g)
        assert t[0].item() in (1, 3) and t[1].item() == 0 and t[2].item() == 0  # no allowed cut / not a roll-out


# ---------------------------------------------------------------------------- on the tiny demo models
@pytest.fixture(scope="module")
def roles(stages, reward):
    cfg = stages.cfg.ppo
    return build_roles(cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, torch.device("cpu"))


def guided_cfg(stages, **guide):
    cfg = stages.cfg.ppo
    return replace(cfg, guide=replace(cfg.guide, model="reference", **guide))


def test_a_batch_has_the_shares_asked_for_and_the_guide_writes(stages, roles):
    cfg = guided_cfg(stages, rollin_prob=0.25, rollout_prob=0.5, max_rollin_tokens=6)
    guide = load_guide(cfg.guide, roles, stages.cfg.model, cfg.max_prompt_tokens)
    prompts = read_prompts(stages.cfg.data_path, "prompts")[:32]
    ro, g = guided.rollouts(roles, guide, prompts, cfg, iteration=0, seed=0)
    assert (g.kinds == ROLLIN).sum().item() == 8  # 32 * 0.25
    # 16 asked; a response too short to cut (EOS first) stays the policy's own
    assert 14 <= (g.kinds == ROLLOUT).sum().item() <= 16
    assert g.guide_tokens[g.kinds == POLICY].sum() == 0 and g.guide_tokens[g.kinds != POLICY].sum() > 0
    tok = roles.tok
    for i in torch.nonzero(g.kinds == ROLLIN).squeeze(1).tolist():
        n = int(g.guide_tokens[i])  # the guide's prefix ends the query; the policy's budget shrinks by as much
        assert n <= 6 and ro.response_mask[i].sum() <= cfg.max_new_tokens - n
        prompt_ids = tok(prompts[i], add_special_tokens=False)["input_ids"]
        assert ro.query[i][ro.query_mask[i].bool()].tolist()[: len(prompt_ids)] == prompt_ids
    c = g.completed
    for j, i in enumerate(g.rows.tolist()):  # completion = the policy's first t tokens, then the guide's
        t = int(g.cut[i])
        assert 1 <= t < ro.response_mask[i].sum()
        assert torch.equal(c.response[j, :t], ro.response[i, :t])
        assert c.response_mask[j].sum() == t + g.guide_tokens[i] + int(c.ended[j])  # + its EOS when it stopped
        assert t + g.guide_tokens[i] <= cfg.max_new_tokens


@pytest.mark.parametrize("advantage", ["aggrevated", "d2lols"])
def test_the_loss_has_exactly_zero_gradient_at_guide_written_positions(stages, roles, advantage):
    cfg = guided_cfg(stages, rollin_prob=0.5, rollout_prob=0.5, max_rollin_tokens=6, rollout_advantage=advantage)
    cfg = replace(cfg, ppo_epochs=1, minibatch_size=16, vf_coef=0.0, max_approx_kl=None)
    guide = load_guide(cfg.guide, roles, stages.cfg.model, cfg.max_prompt_tokens)
    prompts = read_prompts(stages.cfg.data_path, "prompts")[32:48]
    ro, g = guided.rollouts(roles, guide, prompts, cfg, iteration=0, seed=0)
    traj = score_rollout(roles, ro, prompts, cfg, 0.1, RunningMoments(), guidance=g)

    captured = []  # the policy's logits at the response positions (the LM head runs on those only), with gradient

    def keep(module, inputs, out):
        out.retain_grad()
        captured.append(out)

    hook = roles.model.get_output_embeddings().register_forward_hook(keep)
    params = [p for p in roles.model.parameters() if p.requires_grad]
    try:
        ppo_update(roles, traj, torch.optim.SGD(params, lr=0.0), params, cfg, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    # [B, Tr]: column j predicts response token j; the prompt and the guide's roll-in prefix (the query) get no
    # logits at all, so no gradient
    assert captured[0].shape[1] == ro.response.shape[1]
    grad = captured[0].grad.abs().sum(-1)
    q = ro.query.shape[1]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))  # ppo_update's minibatch order
    grad = grad[order.argsort()]
    for i in range(16):
        own = traj.mask[i].bool()  # the tokens PPO trains on: the policy's own
        assert (grad[i][~own] == 0).all(), "padding / tokens the guide replaced: no gradient"
        assert (grad[i][own] > 0).any()
        if g.kinds[i] == ROLLIN and g.guide_tokens[i] > 0:
            assert ro.query_mask[i, q - int(g.guide_tokens[i]) :].all()  # the prefix sits right before the response
        if g.kinds[i] == ROLLOUT:
            t = int(g.cut[i])
            kept = own.sum().item()
            assert kept == (t if advantage == "aggrevated" else ro.response_mask[i].sum().item())


def test_reference_guide_at_zero_probabilities_is_plain_ppo_bit_for_bit(stages, reward, tmp_path):
    cfg = replace(stages.cfg.ppo, steps=3, batch_size=8, minibatch_size=4, eval_max_prompts=8, save_every=2)
    runs = {}
    for name, ppo_cfg in (("plain", cfg), ("guided", replace(cfg, guide=replace(cfg.guide, model="reference")))):
        runs[name] = train_ppo(
            ppo_cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, tmp_path / name, seed=3
        )
    a, b = (load_file(str(Path(runs[n].policy_dir) / "adapter_model.safetensors")) for n in ("plain", "guided"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [
        [{k: v for k, v in row.items() if "time" not in k and "second" not in k} for row in runs[n].history]
        for n in ("plain", "guided")
    ]
    assert untimed[0] == untimed[1]
    assert json.dumps(untimed[0]).count("guide_rollin_share") == 3


def test_a_guide_config_that_cannot_work_is_refused_before_loading(stages, reward, tmp_path):
    base = replace(stages.cfg.ppo, steps=1, eval_max_prompts=4)  # (should one not be refused: a short run)
    for guide, match in (
        ({"rollin_prob": 0.5}, "ppo.guide.model is not"),
        ({"model": "reference", "rollin_prob": 0.7, "rollout_prob": 0.5}, "> 1"),
        ({"model": "reference", "rollin_prob": 0.5, "max_rollin_tokens": base.max_new_tokens}, "max_rollin_tokens"),
        ({"model": "reference", "rollout_advantage": "dagger"}, "rollout_advantage"),
        ({"model": str(tmp_path / "nowhere"), "rollin_prob": 0.5}, "not `reference`"),
    ):
        cfg = replace(base, guide=replace(base.guide, **guide))
        with pytest.raises(Exception, match=match):
            train_ppo(cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, tmp_path / "x")
