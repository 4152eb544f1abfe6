"""The RL math of PPO-RLHF as pure functions on tensors (no models, no I/O), each tested against
hand-computed values. Shapes: B = rollouts, T = response tokens. `mask` marks the response
tokens up to and including EOS (1) versus padding after it (0).

References: Ziegler et al. 2019 (adaptive KL), Schulman et al. 2016 (GAE), 2017 (PPO);
Schulman's "Approximating KL divergence" note (k1, k3); Huang et al. 2024, "The N+ implementation
details of RLHF with PPO" (masking, whitening, reward at the last token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Shared with evaluation, so defined with the other model-scoring helpers; part of the PPO math all the same.
from components.models.scoring import kl_k1, logprobs_of, row_chunks  # noqa: F401


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1: (B, T) -> scalar, or (B,) with dim=1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x where mask is 1 (Bessel-corrected by default): (B, T) -> scalar."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding positions come back as 0. (B, T) -> (B, T)"""
    return whiten_with(x, mask, masked_mean(x, mask), masked_var(x, mask), shift_mean, eps)


def whiten_with(
    x: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """`whiten` with a given mean and variance (scalars; e.g. those of a batch spread over several processes):
    (B, T) -> (B, T), 0 where mask is 0."""
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator: (r - 1) - log r with r = q/p. Unbiased, always >= 0, lower variance. (B, T)"""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def rewards_with_kl(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL at every response token, plus the sequence score at the last one.

    scores: (B,), kl: (B, T), mask: (B, T) -> rewards (B, T), non_score_reward (B, T)
    """
    non_score = -beta * kl * mask
    rewards = non_score.clone()
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last response token (EOS if emitted)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; no bootstrap past the last token.

    rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T) (= advantages + values); 0 on padding.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def lols_mix(own: torch.Tensor, guided: torch.Tensor, cut_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """LOLS's mixture (Chang et al. 2015, "Learning to Search Better than Your Teacher"), as RLGF's D2LOLS uses
    it: on the tokens the policy wrote before the guide took over (cut_mask), beta * guided + (1 - beta) * own;
    elsewhere own. LOLS draws the roll-out policy per state (the guide with probability beta); this is that
    draw's expectation, for the advantage (or the return) of each token.
    beta = 1 with the loss cut to cut_mask is AggreVaTeD (the guide's advantage alone, on the policy's part).

    own, guided, cut_mask: (B, T) -> (B, T)
    """
    w = beta * cut_mask
    return own * (1.0 - w) + guided * w


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (to minimise). (B, T) x4 -> loss, clipfrac, approx_kl (all scalars).

    approx_kl = 0.5 * mean((log ratio)^2), the estimator used to stop an epoch early.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2). (B, T) x4 -> loss, clipfrac."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-position entropy of softmax(logits / temperature), in fp32, a few positions at a time without autograd
    (`scoring.row_chunks`): (B, T, V) -> (B, T)."""
    out = []
    for c in row_chunks(logits, chunk_rows):
        logp = torch.log_softmax(c.float() / temperature, dim=-1)  # (n, V)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon).

    `target=None` keeps beta fixed. `kl` is the mean summed KL per sequence of the batch; n the batch size.
    """

    value: float
    target: float | None = 6.0
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class PIDKLController:
    """The KL coefficient as the Lagrange multiplier of the constraint KL <= target, set by PID control
    (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID Lagrangian Methods", Alg. 2).

        e_t    = KL_t / target - 1                                   (the constraint's violation, relative)
        I_t    = clip(I_{t-1} + ki * e_t, 0, beta_max)                (integral: gradient ascent on the multiplier)
        D_t    = max(0, KL_t - KL_{t-1}) / target                     (derivative: only a rising KL)
        beta_t = clip(kp * e_t + I_t + kd * D_t, beta_min, beta_max)

    The integral alone is the plain Lagrangian update (and, in log space, Ziegler et al.'s controller): it
    lags, so the KL overshoots and oscillates (Stooke et al., Fig. 1). The proportional term answers the
    KL of this batch at once. I_0 = the initial coefficient. `kl` is the batch's mean summed KL per response.
    """

    value: float
    target: float = 6.0
    kp: float = 0.1
    ki: float = 0.005
    kd: float = 0.0
    beta_min: float = 0.0
    beta_max: float = 1.0
    integral: float | None = None  # None: starts at `value`
    last_kl: float | None = None

    def update(self, kl: float, n_steps: int = 0) -> float:
        error = kl / self.target - 1.0
        start = self.value if self.integral is None else self.integral
        self.integral = min(max(start + self.ki * error, 0.0), self.beta_max)
        rise = 0.0 if self.last_kl is None else max(0.0, kl - self.last_kl) / self.target
        self.last_kl = kl
        self.value = min(max(self.kp * error + self.integral + self.kd * rise, self.beta_min), self.beta_max)
        return self.value


@dataclass
class RunningMoments:
    """Running mean/std over all values seen (Chan et al. parallel update), for score whitening."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-8

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))


# ---------------------------------------------------------------------------- critic-free group RL (GRPO, RLOO)


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2): each sample's score normalised within its prompt's
    group, A_i = (s_i - mean(s)) / (std(s) + eps), std with Bessel's correction (as TRL's GRPOTrainer).
    scores: [P, k] (prompt, sample) -> [P, k]. A group whose scores are all equal has advantages 0."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True) if scores.shape[1] > 1 else torch.zeros_like(mean)
    return (scores - mean) / (std + eps)


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"): each sample's score minus the mean of the
    other k - 1 samples of its prompt, A_i = s_i - (sum(s) - s_i) / (k - 1) = k / (k - 1) * (s_i - mean(s)).
    scores: [P, k], k >= 2 -> [P, k]."""
    k = scores.shape[1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (its baseline is the mean of the others)")
    return scores - (scores.sum(dim=1, keepdim=True) - scores) / (k - 1)


def group_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate of a sequence-level advantage, plus kl_coef x the k3 KL to the reference in the loss
    (GRPO; RLOO passes kl_coef = 0, its KL is in the score), both averaged over every response token of the batch:

        loss = mean_t[ max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) ] + kl_coef * mean_t[ k3_t ],  r_t = exp(lp_t - old_t)

    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B] -> loss, clipfrac, kl (k3, mean per token)."""
    pg, clipfrac, _ = policy_loss(logprobs, old_logprobs, advantages[:, None].expand_as(logprobs), mask, cliprange)
    kl = masked_mean(kl_k3(logprobs, ref_logprobs), mask)
    return pg + kl_coef * kl, clipfrac, kl
