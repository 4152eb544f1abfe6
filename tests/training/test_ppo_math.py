"""PPO math against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from components.models.generation import response_mask
from components.training.ppo_math import (
    AdaptiveKLController,
    PIDKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k3,
    logprobs_of,
    lols_mix,
    masked_mean,
    policy_loss,
    rewards_with_kl,
    value_loss,
    whiten,
)

T = torch.tensor


def test_gae_hand_computed():
    # gamma 1, lambda 0.5, V = 0.5 everywhere, reward 1 at the end:
    # t2: delta = 1 - 0.5 = 0.5 -> A = 0.5; t1: delta = 0 + 0.5 - 0.5 = 0 -> A = 0.5 * 0.5 = 0.25; t0: A = 0.125
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert ret[0].tolist() == pytest.approx([0.625, 0.75, 1.0])


def test_gae_ignores_padding_and_does_not_bootstrap_past_the_end():
    # mask [1, 1, 0]: the padded reward 5 and value 7 must not leak in.
    # t1: delta = 2 + 0 - 1 = 1 -> A = 1; t0: delta = 0 + 1 - 1 = 0 -> A = 0 + 1 * 1 = 1; returns = A + V = [2, 2, 0]
    adv, ret = gae(T([[0.0, 2.0, 5.0]]), T([[1.0, 1.0, 7.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([2.0, 2.0, 0.0])


def test_gae_discount():
    # gamma 0.9, lambda 1, V = 0, reward 1 at t1: A1 = 1, A0 = 0.9 * 1 = 0.9
    adv, _ = gae(T([[0.0, 1.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.9, 1.0])


def test_kl_estimators_hand_computed():
    # p = 0.5, q = 0.25: k1 = log(p/q) = log 2 = 0.693147; k3 = (q/p - 1) - log(q/p) = -0.5 + log 2 = 0.193147
    lp, ref = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    assert kl_k1(lp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_k3(lp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    # identical distributions: both zero; k3 is never negative, k1 can be
    assert kl_k3(lp, lp).item() == 0.0 and kl_k1(ref, lp).item() < 0 < kl_k3(ref, lp).item()


def test_kl_estimators_are_unbiased_in_expectation():
    # samples from p = softmax(logits_p); both estimators average to KL(p || q)
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (p * (p / q).log()).sum().item()  # 0.7 ln1.75 + 0.2 ln0.5 + 0.1 ln0.5 = 0.183781
    assert exact == pytest.approx(0.183781, abs=1e-5)
    x = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[x], q.log()[x]
    assert kl_k1(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_k3(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)


def test_whiten_hand_computed():
    # masked [1, 2, 3]: mean 2, unbiased var ((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]; padding -> 0
    out = whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    kept = whiten(T([[1.0, 2.0, 3.0]]), T([[1.0, 1.0, 1.0]]), shift_mean=False)
    assert kept[0].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)  # (x - 2) / 1 + 2


def test_policy_loss_hand_computed():
    # ratios 1.5 and 0.5, advantages 1, clip 0.2:
    #   token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5 (not clipped)
    #   loss = (-1.2 - 0.5) / 2 = -0.85; clipfrac = 1/2; approx_kl = 0.5 * (ln1.5^2 + ln0.5^2) / 2 = 0.161214
    new, old = T([[math.log(1.5), math.log(0.5)]]), T([[0.0, 0.0]])
    loss, clipfrac, approx_kl = policy_loss(new, old, T([[1.0, 1.0]]), T([[1.0, 1.0]]), cliprange=0.2)
    assert loss.item() == pytest.approx(-0.85)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.161214, abs=1e-6)
    # negative advantage: ratio 0.5 is clipped at 0.8 -> max(0.5, 0.8) = 0.8
    loss, clipfrac, _ = policy_loss(T([[math.log(0.5)]]), T([[0.0]]), T([[-1.0]]), T([[1.0]]), cliprange=0.2)
    assert (loss.item(), clipfrac.item()) == pytest.approx((0.8, 1.0))


def test_value_loss_hand_computed():
    # old 0, clip 0.2:
    #   v=1,    R=0.5: v_clip=0.2; max(0.25, 0.09) = 0.25
    #   v=-0.1, R=0:   inside the clip; 0.01
    #   v=1,    R=1.1: v_clip=0.2; max(0.01, 0.81) = 0.81 (clipped counts)
    #   loss = 0.5 * (0.25 + 0.01 + 0.81) / 3 = 0.178333; clipfrac = 1/3
    loss, clipfrac = value_loss(
        T([[1.0, -0.1, 1.0]]), T([[0.0, 0.0, 0.0]]), T([[0.5, 0.0, 1.1]]), T([[1.0, 1.0, 1.0]]), 0.2
    )
    assert loss.item() == pytest.approx(0.178333, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_rewards_put_the_score_on_the_last_response_token():
    # beta 0.5, KL [0.1, 0.2, (pad)]: non-score [-0.05, -0.1, 0]; score 2 lands on token 1 (the EOS)
    rewards, non_score = rewards_with_kl(T([2.0]), T([[0.1, 0.2, 0.3]]), T([[1.0, 1.0, 0.0]]), beta=0.5)
    assert non_score[0].tolist() == pytest.approx([-0.05, -0.1, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 1.9, 0.0])


def test_adaptive_kl_controller_hand_computed():
    # error = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + error * n / horizon  (n = 32, horizon = 10000)
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert up.update(12.0, 32) == pytest.approx(0.1 * 1.00064)  # error 1 clipped to 0.2
    small = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert small.update(6.6, 32) == pytest.approx(0.1 * 1.00032)  # error 0.1
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert down.update(3.0, 32) == pytest.approx(0.1 * 0.99936)  # error -0.5 clipped to -0.2
    fixed = AdaptiveKLController(0.1, target=None)
    assert fixed.update(100.0, 32) == 0.1


def test_pid_kl_controller_hand_computed():
    # target 6, kp 0.05, ki 0.005, kd 0.1; I_0 = beta_0 = 0.1
    c = PIDKLController(0.1, target=6.0, kp=0.05, ki=0.005, kd=0.1)
    # KL 3: e = -0.5; I = 0.1 - 0.0025 = 0.0975; no earlier KL: D = 0; beta = -0.025 + 0.0975 = 0.0725
    assert c.update(3.0) == pytest.approx(0.0725)
    # KL 9: e = 0.5; I = 0.0975 + 0.0025 = 0.1; D = (9 - 3) / 6 = 1; beta = 0.025 + 0.1 + 0.1 = 0.225
    assert c.update(9.0) == pytest.approx(0.225)
    # KL 6 (on target): e = 0, I stays 0.1; falling KL: D = 0; beta = 0.1
    assert c.update(6.0) == pytest.approx(0.1)
    # far below target the coefficient is held at beta_min (0), the integral at 0: no negative penalty
    low = PIDKLController(0.01, target=6.0, kp=0.05, ki=0.005)
    assert low.update(0.0) == 0.0 and low.integral == pytest.approx(0.005)
    assert PIDKLController(0.5, target=6.0, kp=1.0, beta_max=1.0).update(60.0) == 1.0  # and at beta_max above


def test_lols_mix_hand_computed():
    own, guided = T([[1.0, 2.0, 3.0, 4.0]]), T([[10.0, 20.0, 0.0, 0.0]])
    cut = T([[1.0, 1.0, 0.0, 0.0]])  # the policy wrote 2 tokens before the guide took over
    # D2LOLS, beta 0.25: 0.25 * 10 + 0.75 * 1 = 3.25; 0.25 * 20 + 0.75 * 2 = 6.5; own after the cut
    assert lols_mix(own, guided, cut, 0.25)[0].tolist() == pytest.approx([3.25, 6.5, 3.0, 4.0])
    # AggreVaTeD (beta 1): the guide's advantage on the policy's part (the loss is cut there as well)
    assert lols_mix(own, guided, cut, 1.0)[0].tolist() == pytest.approx([10.0, 20.0, 3.0, 4.0])
    assert lols_mix(own, guided, cut, 0.0)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0])  # PPO's own


def test_running_moments_match_the_whole_sample():
    m = RunningMoments()
    m.update(T([1.0, 2.0, 3.0]))
    m.update(T([4.0, 5.0]))
    assert (m.mean, m.var) == pytest.approx((3.0, 2.0))  # population variance of 1..5


def test_logprobs_entropy_and_masks():
    logits = T([[[0.0, math.log(3.0)]]])  # probs 0.25, 0.75
    assert logprobs_of(logits, T([[1]])).item() == pytest.approx(math.log(0.75))
    # temperature 2 halves the logits: p1 = sqrt(3) / (1 + sqrt(3))
    assert logprobs_of(logits, T([[1]]), temperature=2.0).exp().item() == pytest.approx(3**0.5 / (1 + 3**0.5))
    assert entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    assert masked_mean(T([[1.0, 3.0], [5.0, 100.0]]), T([[1.0, 1.0], [1.0, 0.0]]), dim=1).tolist() == [2.0, 5.0]
    mask, ended = response_mask(T([[5, 2, 9, 9], [5, 6, 7, 8]]), eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


def test_log_probs_and_entropy_are_fp32_and_the_same_a_few_positions_at_a_time():
    """bf16 logits give fp32 log-probs and entropies; without autograd the vocabulary is upcast a chunk of positions
    at a time (scoring.row_chunks), with the very same numbers; with autograd one piece, and gradients flow."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=g)).to(torch.bfloat16)  # (B, T, V)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    whole = logprobs_of(logits, tokens, 0.7, chunk_rows=15)
    assert whole.dtype == torch.float32 and whole.shape == (3, 5)
    expected = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(whole, expected, atol=1e-6)
    assert torch.equal(logprobs_of(logits, tokens, 0.7, chunk_rows=4), whole)  # 4 + 4 + 4 + 3 positions
    entropy = entropy_from_logits(logits, 0.7, chunk_rows=15)
    assert entropy.dtype == torch.float32 and torch.equal(entropy_from_logits(logits, 0.7, chunk_rows=2), entropy)
    p = torch.softmax(logits.float() / 0.7, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)
    trained = logits.float().requires_grad_()
    logprobs_of(trained, tokens).sum().backward()
    assert trained.grad is not None and torch.isfinite(trained.grad).all()
