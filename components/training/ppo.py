"""PPO stage: LoRA PPO with policy, reference, value and reward on ONE shared base model.

Entry: `train_ppo(cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir)` -> PPOResult.

The SFT weights (merged) are loaded once. On them, as peft adapters:

    policy     trainable LoRA adapter "policy"              -> LM head      (starts equal to SFT: LoRA B = 0)
    reference  the same model with adapters disabled         -> LM head      (= the SFT policy)
    value      a scalar head on the policy's hidden states   -> per token    (ppo.value_model=shared, the default)
               or a LoRA adapter "value" of its own + head   -> per token    (ppo.value_model=adapter)
    reward     frozen adapter "reward" + head from the RM    -> per sequence (normalised with the RM's mean/std)

plus an optional reward callable by import path (`ppo.reward_fn`), added to the RM score. The value head (and the
value adapter) start from the RM's (`ppo.value_init=reward`, as InstructGPT) or fresh.

The value function, a trade-off (benchmarks/results/ppo_vs_rloo.md): `shared` (as TRL's old PPOTrainer's
value head) reads the policy's own forward, so scoring and every minibatch run one forward, not two, and the
value loss (scaled by vf_coef) also trains the policy's LoRA. `adapter` keeps policy and critic apart (no
coupling, an RM-initialised critic body) at the cost of a second forward and backward per minibatch.

One iteration reads top to bottom (CleanRL style), each step a function the loop, the tests and
benchmarks/ppo_bench.py call (as torchtune's PPO recipe does):
    1. generate   `sample`: a batch of responses from the policy (KV cache, left padding, stop at EOS), its
                  LoRA folded into the base weights meanwhile (`roles.lora_merged`: one matmul per layer)
    2. score      `score_rollout` -> Trajectory: log-probs (policy, reference), values, sequence scores;
                  per-token rewards r_t = -beta * KL_t (+ score at the last token); GAE; whitened advantages
    3. train      `ppo_update` -> stats: PPO epochs over minibatches: clipped policy loss + vf_coef * clipped
                  value loss + ptx_coef * the language-model loss on a few demonstrations (PPO-ptx), gradient
                  clipping, early stop on approx-KL
    4. adapt      the KL coefficient (PID or Ziegler et al. 2019), log `ppo/*`, checkpoint every N, and
                  every `ppo.eval_every` iterations the held-out reward and KL (a curve against
                  `ppo/train_elapsed_seconds`, the training clock without the evals)
The phases are torch.profiler ranges ppo/generate, ppo/score, ppo/train (benchmarks/ppo_profile.py).
A restarted run continues from its last checkpoint (`checkpoint.resume`, shared with the reward model).
Roles switch with `with roles.use("value"):` (components/models/roles.py), which always switches back.
The math lives in `ppo_math.py` as pure, hand-tested functions.

Data parallel (`infra.num_processes` > 1, components/training/distributed.py): each rank samples and scores its own
slice of the global batch (`ppo.batch_size`, `ppo.minibatch_size` stay global), advantages are whitened with the
moments of the whole batch, gradients are averaged over the ranks after each backward, the KL controller steers
the ranks' mean KL, the `ppo/*` rows are averaged (throughputs summed) and rank 0 alone evaluates, logs, writes
checkpoints and outputs. A run resumes from its checkpoints on any number of processes (rollout draws are seeded
per iteration and rank, not restored).

Divergence (NaN/inf in logits or loss, or KL above `kl_ceiling`) raises `PPODivergence` before
anything is written to `out_dir/final`, so no later stage can take a diverged policy for a valid one.
`out_dir/COMPLETE.json` is written after `final/` (`checkpoint.is_complete(out_dir)`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from components.config import ModelConfig, PPOConfig
from components.data.readers import read_demonstrations, read_prompts
from components.evaluation.degeneration import distinct_n, repeated_word_share, repeats_a_word
from components.models.generation import CACHES, Rollout, sample
from components.models.guide import load_guide
from components.models.loading import load_causal_lm, load_tokenizer, resolve_device
from components.models.roles import (
    HEAD_FILE,
    REFERENCE,
    REWARD,
    RewardScale,
    Roles,
    ScalarHead,
    activate,
    attach_reward_members,
    hidden_states,
    lm_logits,
    lora_config,
    lora_merged,
    member_scores,
    reward_members,
)
from components.models.scoring import encode, load_reward_fn
from components.training import checkpoint, distributed, guided
from components.training.callbacks import log_table_to_active_run, log_to_active_run
from components.training.ppo_math import (
    KL_ESTIMATORS,
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
    whiten_with,
)
from components.training.precision import LossScaler


class PPODivergence(RuntimeError):
    """Training diverged; no policy was written."""


@dataclass
class PPOResult:
    policy_dir: str  # peft adapter "policy" on the SFT weights (+ tokenizer)
    value_dir: str  # value adapter + value head
    merged_dir: str | None  # policy merged into the SFT weights (ppo.merge=true)
    metrics: dict[str, float]  # final: eval on held-out prompts (policy vs reference) and the last iteration
    history: list[dict[str, float]] = field(default_factory=list)  # ppo/* per iteration (curves)


# ---------------------------------------------------------------------------- the four roles


def build_roles(
    cfg: PPOConfig, model_cfg: ModelConfig, sft_dir: str, reward_dir: str | None, device, warm_from: str | None = None
) -> Roles:
    """The policy (a LoRA adapter on the SFT model), the reference (the adapters disabled), the reward model's members
    (frozen) and the value function. `warm_from`: a champion's warm-start bundle (components/models/warm_start.py):
    the policy starts as the champion's and, when the bundle has one, the value function as the champion's."""
    from peft import get_peft_model

    if cfg.use_reward_model and not reward_dir:
        raise ValueError("ppo.use_reward_model is true but no reward model dir was given")
    if not cfg.use_reward_model and not cfg.reward_fn:
        raise ValueError("PPO needs a reward: set ppo.use_reward_model=true and/or ppo.reward_fn")
    if cfg.value_init == "reward" and not cfg.use_reward_model:
        raise ValueError("ppo.value_init=reward needs the reward model; use ppo.value_init=fresh")
    tok = load_tokenizer(sft_dir, model_cfg, padding_side="left")
    lora = lora_config(cfg.lora)
    model = get_peft_model(load_causal_lm(sft_dir, model_cfg, device), lora, adapter_name="policy")
    reward_heads: dict[str, ScalarHead] = {}
    scale = RewardScale(0.0, 1.0)
    if cfg.use_reward_model:
        assert reward_dir is not None  # checked above: the reward model needs its dir
        rm_adapter = str(Path(reward_dir) / "adapter")  # the first member's: the value function may start from it
        # one, or each member of an ensemble (reward.ensemble), frozen beside the policy
        model, reward_heads, scale = attach_reward_members(model, reward_members(reward_dir), device)
    if cfg.value_init not in ("reward", "fresh"):
        raise ValueError(f"ppo.value_init={cfg.value_init!r}: expected reward | fresh")
    if cfg.value_model not in ("adapter", "shared"):
        raise ValueError(f"ppo.value_model={cfg.value_model!r}: expected adapter | shared")
    # the value head starts as the reward model's head (InstructGPT) or fresh; with value_model=adapter it reads
    # the hidden states of its own LoRA adapter (the RM's adapter, or a new one), with shared those of the policy
    trainable = frozenset({"policy"})
    if cfg.value_model == "adapter":
        if cfg.value_init == "reward":
            model.load_adapter(rm_adapter, adapter_name="value", is_trainable=True)
        else:
            model.add_adapter("value", lora)
        trainable = frozenset({"policy", "value"})
    if cfg.value_init == "reward":
        assert reward_heads  # checked above: value_init=reward needs the reward model
        value_head = copy.deepcopy(reward_heads[REWARD]).requires_grad_(True)
    else:
        value_head = ScalarHead(model.config.hidden_size).to(device)
    if warm_from is not None:
        warm = Path(warm_from)
        checkpoint.load_adapter_weights(model, warm / "policy", adapter_name="policy")
        if (warm / "value" / HEAD_FILE).is_file():
            value_head.load_state_dict(ScalarHead.load(warm / "value", device)[0].state_dict())
        if "value" in trainable and (warm / "value" / "adapter_model.safetensors").is_file():
            checkpoint.load_adapter_weights(model, warm / "value", adapter_name="value")
    activate(model, "policy", trainable)  # the policy is the resting role: `Roles.use` switches back to it
    roles = Roles(model, tok, value_head, reward_heads, scale, None, trainable)
    reward_fn = load_reward_fn(cfg.reward_fn)
    # a reward that needs the model (the self-evaluation reward's judge `reference`) is built on these roles
    if reward_fn is not None and hasattr(reward_fn, "build"):
        roles.reward_fn = reward_fn.build(cfg, model_cfg, roles)
    else:
        roles.reward_fn = reward_fn
    return roles


def kl_controller(cfg: PPOConfig) -> AdaptiveKLController | PIDKLController:
    """The KL coefficient's controller (`ppo.kl_controller`): pid | ziegler | fixed."""
    if cfg.kl_controller == "pid":
        beta_max = max(1.0, cfg.init_kl_coef)
        return PIDKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_kp, cfg.kl_ki, cfg.kl_kd, beta_max=beta_max)
    if cfg.kl_controller in ("ziegler", "fixed"):
        target = cfg.target_kl if cfg.kl_controller == "ziegler" else None
        return AdaptiveKLController(cfg.init_kl_coef, target, cfg.kl_horizon)
    raise ValueError(f"ppo.kl_controller={cfg.kl_controller!r}: expected pid | ziegler | fixed")


def forward_response(
    roles: Roles, seq: torch.Tensor, mask: torch.Tensor, q_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward with the active adapter: the logits that predict the response tokens (B, Tq + Tr) -> (B, Tr, V)
    and the last hidden states they come from (B, Tr, H). The LM head runs on the response positions only."""
    h = hidden_states(roles.model, seq, mask)[:, q_len - 1 : -1]
    return lm_logits(roles.model, h), h


def policy_logits(roles: Roles, seq: torch.Tensor, mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Logits that predict the response tokens: (B, Tq + Tr) -> (B, Tr, V). Active adapter decides the role."""
    return forward_response(roles, seq, mask, q_len)[0]


def reference_logprobs(roles: Roles, ro: Rollout, temperature: float) -> torch.Tensor:
    """The reference is the policy's base with all adapters disabled (= the SFT model). -> (B, Tr)"""
    with roles.use(REFERENCE):
        logits = policy_logits(roles, ro.sequence, ro.sequence_mask, ro.query.shape[1])
    return logprobs_of(logits, ro.response, temperature)


def token_values(
    roles: Roles, seq: torch.Tensor, mask: torch.Tensor, q_len: int, policy_hidden: torch.Tensor
) -> torch.Tensor:
    """V(prefix) before each response token: -> (B, Tr). ppo.value_model=shared: the value head on the policy's
    own hidden states `policy_hidden` (B, Tr, H), no second forward; adapter: on the value adapter's (a forward)."""
    assert roles.value_head is not None  # PPO's roles have a critic (rejection sampling's alone have none)
    if "value" not in roles.trainable:
        return roles.value_head(policy_hidden)
    with roles.use("value"):
        return roles.value_head(hidden_states(roles.model, seq, mask)[:, q_len - 1 : -1])


def rm_scores(roles: Roles, ro: Rollout) -> torch.Tensor:
    """Raw reward-model scores of prompt + response, read at the last token, one per ensemble member: -> (B, K)."""
    assert roles.reward_heads  # called only with a reward model (scores_for)
    with roles.use(REWARD):  # switches back to the active role after the members' turns
        return member_scores(roles.model, roles.reward_heads, ro.sequence, ro.sequence_mask)


class Scores(NamedTuple):
    raw: torch.Tensor  # (B,) the reward model's raw score (its ensemble's mean; zeros without an RM)
    score: torch.Tensor  # (B,) what the policy optimises
    disagreement: torch.Tensor  # (B,) the ensemble's spread in training-reward stds (zeros with one member)


@torch.no_grad()
def scores_for(roles: Roles, ro: Rollout, prompts: list[str], cfg: PPOConfig) -> Scores:
    """The score a policy stage optimises: the RM score normalised with the RM's training statistics, less
    `ppo.uncertainty_penalty` x the ensemble's disagreement (a conservative reward: mean - lambda * std, Coste et
    al. 2023), plus reward_fn_weight * reward_fn, less `ppo.repeated_word_penalty` for an answer repeating a word
    back to back."""
    device = ro.response.device
    raw = torch.zeros(len(prompts), device=device)
    score = torch.zeros(len(prompts), device=device)
    disagreement = torch.zeros(len(prompts), device=device)
    if roles.reward_heads:
        members = rm_scores(roles, ro)  # (B, K)
        raw = members.mean(-1)
        score, disagreement = roles.reward_scale.normalise(members)
        score = score - cfg.uncertainty_penalty * disagreement
    if roles.reward_fn is not None:
        extra = torch.tensor([float(x) for x in roles.reward_fn(prompts, ro.texts)], device=device)
        score = score + cfg.reward_fn_weight * extra
    if cfg.repeated_word_penalty:
        repeats = torch.tensor([repeats_a_word(t) for t in ro.texts], device=device, dtype=score.dtype)
        score = score - cfg.repeated_word_penalty * repeats
    return Scores(raw, score, disagreement)


def penalise_missing_eos(score: torch.Tensor, ended: torch.Tensor, cfg: PPOConfig) -> torch.Tensor:
    """`ppo.missing_eos_penalty` off the score of each response that never emitted EOS: [B], [B] -> [B]."""
    if cfg.missing_eos_penalty is None:
        return score
    return torch.where(ended, score, score - cfg.missing_eos_penalty)


@torch.no_grad()
def response_kl(roles: Roles, ro: Rollout, temperature: float) -> torch.Tensor:
    """k1 KL of the active policy to the reference, summed over each response: -> [B]."""
    logits = policy_logits(roles, ro.sequence, ro.sequence_mask, ro.query.shape[1])
    kl = kl_k1(logprobs_of(logits, ro.response, temperature), reference_logprobs(roles, ro, temperature))
    return (kl * ro.response_mask).sum(1)


# ---------------------------------------------------------------------------- 2. score: rollout -> Trajectory


@dataclass
class Trajectory:
    """One rollout batch, scored: everything a PPO update trains on. B = rollouts, Tr = response tokens."""

    rollout: Rollout  # query [B, Tq] (a roll-in's guide prefix included), response [B, Tr], masks, ended [B], texts
    prompts: list[str]  # [B]
    mask: torch.Tensor  # [B, Tr] float: the tokens PPO trains on: the policy's response up to and including EOS
    # (AggreVaTeD roll-outs: up to the cut), 0 on padding
    logprobs: torch.Tensor  # [B, Tr] policy log-probs when sampled (PPO's "old" policy)
    ref_logprobs: torch.Tensor  # [B, Tr] reference (SFT) log-probs
    values: torch.Tensor  # [B, Tr] V(prefix) before each response token, 0 on padding
    raw_scores: torch.Tensor  # [B] reward-model scores (zeros without an RM)
    scores: torch.Tensor  # [B] the score optimised: normalised RM (+ reward_fn), whitened, EOS penalty applied
    rewards: torch.Tensor  # [B, Tr] per-token rewards: -beta * KL_t, plus the score at the last token
    non_score_rewards: torch.Tensor  # [B, Tr] the -beta * KL_t part
    advantages: torch.Tensor  # [B, Tr] GAE advantages, whitened over the response tokens
    returns: torch.Tensor  # [B, Tr] GAE returns (advantages before whitening + values)
    kl: torch.Tensor  # [B] k1 KL to the reference, summed over the policy's response
    entropy: float  # mean per-token entropy of the policy
    guidance: guided.Guidance | None = None  # what the guide did (None: no guide)
    guide_scores: torch.Tensor | None = None  # [R] RM scores of the guide's completions (roll-out rows)
    disagreement: torch.Tensor | None = None  # [B] the RM ensemble's spread on each response (0 with one member)

    @property
    def kl_mean(self) -> float:
        """Mean KL of the policy's whole responses: what the KL controller steers. Roll-in rows are left out
        (the policy wrote only their ends), unless every row is one."""
        if self.guidance is not None and (full := self.guidance.kinds != guided.ROLLIN).any():
            return self.kl[full.to(self.kl.device)].mean().item()
        return self.kl.mean().item()


def _at(iteration: int | None) -> str:
    return "" if iteration is None else f" at iteration {iteration}"


@torch.no_grad()
def score_rollout(
    roles: Roles,
    rollout: Rollout,
    prompts: list[str],
    cfg: PPOConfig,
    kl_coef: float,
    moments: RunningMoments,
    iteration: int | None = None,
    guidance: guided.Guidance | None = None,
) -> Trajectory:
    """Step 2: log-probs of policy and reference, values, scores, per-token rewards with the KL penalty
    `kl_coef`, GAE; with roll-outs, the guide's completions scored and credited (`credit_rollouts`). Updates
    `moments` when `cfg.whiten_scores`. Raises PPODivergence on NaN/inf logits or a KL above `cfg.kl_ceiling`."""
    ro, T = rollout, cfg.temperature
    seq, smask, q_len, mask = ro.sequence, ro.sequence_mask, ro.query.shape[1], ro.response_mask.float()
    logits, hidden = forward_response(roles, seq, smask, q_len)
    if not torch.isfinite(logits).all():
        raise PPODivergence(
            f"PPO diverged{_at(iteration)}: the policy's logits contain NaN/inf. "
            "No policy was written. Lower ppo.learning_rate or ppo.max_grad_norm."
        )
    logprobs = logprobs_of(logits, ro.response, T)
    entropy = masked_mean(entropy_from_logits(logits, T), mask).item()
    del logits
    ref_logprobs = reference_logprobs(roles, ro, T)
    values = token_values(roles, seq, smask, q_len, hidden) * mask
    del hidden
    raw, score, disagreement = scores_for(roles, ro, prompts, cfg)
    if cfg.whiten_scores:
        moments.update(distributed.gather_tensor(score))  # every rank's scores: the same moments on all
        score = (score - moments.mean) / moments.std
    score = penalise_missing_eos(score, ro.ended, cfg)
    kl = (kl_k1(logprobs, ref_logprobs) * mask).sum(1)  # (B,)
    kl_mean = mean_across_ranks(kl)  # all ranks stop together
    if not kl_mean <= cfg.kl_ceiling:  # also catches NaN
        raise PPODivergence(
            f"PPO diverged{_at(iteration)}: mean KL to the reference {kl_mean:.2f} exceeds "
            f"ppo.kl_ceiling={cfg.kl_ceiling}. No policy was written. Lower ppo.learning_rate, "
            "raise ppo.init_kl_coef, or lower ppo.target_kl."
        )
    kl_tokens = KL_ESTIMATORS[cfg.kl_estimator](logprobs, ref_logprobs) * mask
    rewards, non_score = rewards_with_kl(score, kl_tokens, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    guide_scores = None
    if guidance is not None and guidance.completed is not None:
        guide_scores, advantages, returns, mask = credit_rollouts(
            roles, guidance, prompts, cfg, kl_coef, moments, kl_tokens, values, advantages, returns, mask
        )
    return Trajectory(
        ro,
        list(prompts),
        mask,
        logprobs,
        ref_logprobs,
        values,
        raw,
        score,
        rewards,
        non_score,
        whiten_across_ranks(advantages, mask),
        returns,
        kl,
        entropy,
        guidance,
        guide_scores,
        disagreement if roles.reward_members > 1 else None,
    )


def mean_across_ranks(x: torch.Tensor) -> float:
    """The mean of a [B] tensor over every rank's rows (x.mean() in a single process)."""
    if distributed.world().size == 1:
        return x.mean().item()
    total, n = distributed.all_sum(
        torch.stack([x.sum().double(), torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    )
    return (total / n).item()


def whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`whiten` with the masked mean and (Bessel-corrected) variance of the whole global batch: [B, Tr] -> [B, Tr]."""
    if distributed.world().size == 1:
        return whiten(x, mask)
    m = mask.double()
    total, squares, n = distributed.all_sum(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])).unbind()
    mean = total / n
    var = (squares / n - mean**2) * n / (n - 1).clamp(min=1)
    return whiten_with(x, mask, mean.float().to(x.device), var.float().to(x.device))


def credit_rollouts(
    roles: Roles,
    guidance: guided.Guidance,
    prompts: list[str],
    cfg: PPOConfig,
    kl_coef: float,
    moments: RunningMoments,
    kl_tokens: torch.Tensor,
    values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll-out rows R (components/training/guided.py): the reward of prompt + policy[:t] + the guide's
    completion estimates the guide's Q of the policy's last kept token (position t - 1). Its GAE over the
    policy's tokens before the cut, positions 0..t-1 (KL penalty on those tokens only, the score at t - 1), is
    the guide's advantage A^{pi_g}; it replaces PPO's own there and the loss stops at the cut (AggreVaTeD),
    or mixes with it, LOLS's beta on the guide (D2LOLS).
    -> the guide's raw RM scores [R], and advantages, returns, training mask [B, Tr]."""
    r, g = guidance.rows.to(mask.device), cfg.guide
    completed = guidance.completed
    assert completed is not None  # score_rollout credits a batch with roll-outs only
    raw, score, _ = scores_for(roles, completed, [prompts[i] for i in r.tolist()], cfg)
    if cfg.whiten_scores:
        score = (score - moments.mean) / moments.std
    score = penalise_missing_eos(score, completed.ended, cfg)
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    cut_mask = (positions < guidance.cut.to(mask.device)[r, None]).float() * mask[r]  # [R, Tr] policy[:t]
    g_rewards, _ = rewards_with_kl(score, kl_tokens[r], cut_mask, kl_coef)
    g_adv, g_ret = gae(g_rewards, values[r], cut_mask, cfg.gamma, cfg.lam)
    beta = 1.0 if g.rollout_advantage == "aggrevated" else g.lols_beta
    advantages, returns, mask = advantages.clone(), returns.clone(), mask.clone()
    advantages[r] = lols_mix(advantages[r], g_adv, cut_mask, beta)
    returns[r] = lols_mix(returns[r], g_ret, cut_mask, beta)
    if g.rollout_advantage == "aggrevated":
        mask[r] = cut_mask
    return raw, advantages, returns, mask


# ---------------------------------------------------------------------------- 3. train: PPO epochs on a Trajectory


@dataclass
class Demonstrations:
    """PPO-ptx's text: the demonstrations (prompt, response), encoded a batch at a time as the reward model encodes
    a response (prompt + response + EOS, right-padded)."""

    prompts: list[str]
    responses: list[str]
    tok: object
    max_length: int

    def __bool__(self) -> bool:
        return bool(self.prompts)

    def batch(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """n demonstrations drawn without replacement (from `generator`): -> ids, mask (n, T) on the CPU
        (language_model_loss moves them to the model)."""
        picked = torch.randperm(len(self.prompts), generator=generator)[:n].tolist()
        return encode(
            self.tok, [self.prompts[i] for i in picked], [self.responses[i] for i in picked], self.max_length, "cpu"
        )


def load_demonstrations(cfg: PPOConfig, data_dir: Path, tok) -> Demonstrations:
    """PPO-ptx's demonstrations, encoded with `tok`: every one under data_dir (SFT's held-out share included: PPO
    is not scored on them), or a ValueError naming what is missing (`tok` None: only that check)."""
    demos, _ = read_demonstrations(data_dir, 0.0)
    if not demos:
        raise ValueError(
            f"ppo.ptx_coef={cfg.ptx_coef} mixes the language-model loss on demonstrations into PPO, but "
            f"{data_dir}/demonstrations has none: ingest some (`rlhf ingest FILE --kind demonstrations`) or set "
            "ppo.ptx_coef=0"
        )
    prompts, responses = [d["prompt"] for d in demos], [d["completion"].strip() for d in demos]
    return Demonstrations(prompts, responses, tok, cfg.max_prompt_tokens + cfg.max_new_tokens)


def language_model_loss(roles: Roles, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The active adapter's mean next-token NLL over the non-padding tokens of `ids`: (B, T) -> scalar."""
    ids, mask = ids.to(roles.model.device), mask.to(roles.model.device)
    logits = lm_logits(roles.model, hidden_states(roles.model, ids, mask)[:, :-1])  # (B, T-1, V)
    nll = -logprobs_of(logits, ids[:, 1:])  # (B, T-1)
    target = mask[:, 1:].to(nll.dtype)
    return (nll * target).sum() / target.sum()


def ppo_update(
    roles: Roles,
    traj: Trajectory,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    cfg: PPOConfig,
    generator: torch.Generator | None = None,
    iteration: int | None = None,
    scaler: LossScaler | None = None,
    ptx: Demonstrations | None = None,
) -> dict[str, float]:
    """Step 3: `cfg.ppo_epochs` passes over shuffled minibatches (order drawn from `generator`, a CPU
    torch.Generator): clipped policy loss + vf_coef * clipped value loss (+ ptx_coef * the language-model loss on a
    batch of `ptx`'s demonstrations, PPO-ptx), gradient clipping, early stop once approx-KL exceeds
    `cfg.max_approx_kl`; `scaler`: loss scaling on an fp16 base (precision.LossScaler; none: plain steps). -> the
    means of the losses and fractions, and the epochs run. Raises PPODivergence on a NaN/inf loss."""
    scaler = scaler or LossScaler("float32", "cpu")  # a pass-through
    ro, seq, smask, q_len = traj.rollout, traj.rollout.sequence, traj.rollout.sequence_mask, traj.rollout.query.shape[1]
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in STAT_NAMES + (("ptx_loss",) if ptx else ())}
    losses: list[torch.Tensor] = []  # without an approx-KL stop, checked once at the end (no per-minibatch sync)
    epochs = 0
    for _ in range(cfg.ppo_epochs):
        epochs += 1
        stop = False
        for mb in torch.randperm(len(traj.prompts), generator=generator).to(seq.device).split(cfg.minibatch_size):
            mb_mask = traj.mask[mb]
            logits, hidden = forward_response(roles, seq[mb], smask[mb], q_len)
            new_logprobs = logprobs_of(logits, ro.response[mb], cfg.temperature)
            new_values = token_values(roles, seq[mb], smask[mb], q_len, hidden)
            pg, clipfrac, approx_kl = policy_loss(
                new_logprobs, traj.logprobs[mb], traj.advantages[mb], mb_mask, cfg.cliprange
            )
            vf, vf_clipfrac = value_loss(new_values, traj.values[mb], traj.returns[mb], mb_mask, cfg.cliprange_value)
            loss = pg + cfg.vf_coef * vf
            if ptx:
                ptx_loss = language_model_loss(roles, *ptx.batch(cfg.ptx_batch_size, generator))
                loss = loss + cfg.ptx_coef * ptx_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.backward(loss)
            # the ranks' mean gradient (in place); the loss and approx-KL ride along so every rank decides alike
            total_loss, mean_approx_kl = distributed.all_reduce_gradients(params, loss, approx_kl)
            if cfg.max_approx_kl is not None:  # the early stop decides now: one sync for both numbers
                loss_value, kl_value = torch.stack([total_loss.detach(), mean_approx_kl.detach()]).tolist()
                check_loss(loss_value, iteration)
            else:
                losses.append(total_loss.detach())
            scaler.step(optimizer, params, cfg.max_grad_norm)
            for k, v in zip(
                stats, (pg, vf, clipfrac, vf_clipfrac, approx_kl, *((ptx_loss,) if ptx else ())), strict=True
            ):
                stats[k].append(v.detach())
            if cfg.max_approx_kl is not None and kl_value > cfg.max_approx_kl:
                stop = True
                break
        if stop:
            break
    if losses:  # a NaN step taken meanwhile does not matter: the run stops here and writes nothing
        for value in torch.stack(losses).tolist():
            check_loss(value, iteration)
    means = torch.stack([torch.stack(v).float().mean() for v in stats.values()]).tolist()  # one sync
    return {
        **{f"ppo/{name}": m for name, m in zip(stats, means, strict=True)},
        "ppo/epochs": float(epochs),
        **({"ppo/loss_scale": scaler.scaler.get_scale()} if scaler.enabled else {}),
    }


STAT_NAMES = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl")  # ppo_update's stats, in order


def check_loss(value: float, iteration: int | None) -> None:
    """PPODivergence on a NaN/inf loss."""
    if not math.isfinite(value):
        raise PPODivergence(
            f"PPO diverged{_at(iteration)}: the loss is {value}. No policy was written. Lower ppo.learning_rate."
        )


# ---------------------------------------------------------------------------- 4. metrics of one iteration


def iteration_metrics(
    traj: Trajectory, stats: dict[str, float], beta: float, times: tuple[float, float, float, float]
) -> dict[str, float]:
    """The `ppo/*` row of one iteration: scores, KL (k1 and k3), the update's stats, lengths, the degeneration of
    the batch's answers (repeated words, distinct-2: where reward rises while quality falls), timings.
    `times`: perf_counter before generate, after generate, after score, after train."""
    t0, t1, t2, t3 = times
    ro = traj.rollout
    mask = ro.response_mask.float()
    return {
        "ppo/score_mean": traj.raw_scores.mean().item(),
        "ppo/reward_mean": traj.scores.mean().item(),
        "ppo/reward_std": traj.scores.std().item(),
        "ppo/non_score_reward": traj.non_score_rewards.sum(1).mean().item(),
        "ppo/kl": traj.kl_mean,
        "ppo/kl_k3": (kl_k3(traj.logprobs, traj.ref_logprobs) * mask).sum(1).mean().item(),
        "ppo/beta": beta,
        "ppo/entropy": traj.entropy,
        **stats,
        "ppo/response_length": mask.sum(1).mean().item(),
        "ppo/eos_rate": ro.ended.float().mean().item(),
        "ppo/repeated_word_share": repeated_word_share(ro.texts),
        "ppo/distinct_2": distinct_n(ro.texts, 2),
        **({"ppo/rm_disagreement": traj.disagreement.mean().item()} if traj.disagreement is not None else {}),
        "ppo/time_generate": t1 - t0,
        "ppo/time_score": t2 - t1,
        "ppo/time_train": t3 - t2,
        "ppo/tokens_per_second": ro.sequence_mask.sum().item() / (t3 - t0),
        "ppo/generate_tokens_per_second": mask.sum().item() / (t1 - t0),
        **guide_metrics(traj),
    }


# metrics a rank may lack in an iteration (no guided or no unguided rows): averaged over the ranks that have them
OPTIONAL_METRICS = ("ppo/guided_score", "ppo/unguided_score")
THROUGHPUTS = ("ppo/tokens_per_second", "ppo/generate_tokens_per_second")  # summed over the ranks


def guide_metrics(traj: Trajectory) -> dict[str, float]:
    """`ppo/guide_*`: shares of roll-ins and roll-outs, guide-written tokens per rollout, and the RM score of
    guided rollouts (roll-in: the response; roll-out: the guide's completion) beside unguided ones."""
    n = len(traj.prompts)
    g = traj.guidance
    kinds = g.kinds if g is not None else torch.zeros(n, dtype=torch.long)
    credited = traj.raw_scores.clone()
    if g is not None and traj.guide_scores is not None:
        credited[g.rows.to(credited.device)] = traj.guide_scores
    is_guided = (kinds != guided.POLICY).to(credited.device)
    out = {
        "ppo/guide_rollin_share": (kinds == guided.ROLLIN).float().mean().item(),
        "ppo/guide_rollout_share": (kinds == guided.ROLLOUT).float().mean().item(),
        "ppo/guide_tokens": g.guide_tokens.float().mean().item() if g is not None else 0.0,
    }
    if is_guided.any():
        out["ppo/guided_score"] = credited[is_guided].mean().item()
    if (~is_guided).any():
        out["ppo/unguided_score"] = credited[~is_guided].mean().item()
    return out


# ---------------------------------------------------------------------------- checkpoints


def write_checkpoint(
    d: Path,
    roles: Roles,
    optimizer: torch.optim.Optimizer,
    kl_ctl: AdaptiveKLController | PIDKLController,
    moments: RunningMoments,
    history: list[dict[str, float]],
) -> None:
    """The trainable adapters, the value head and the trainer state (optimizer, KL coefficient, score moments,
    history, RNG) into checkpoint dir `d`."""
    assert roles.value_head is not None  # PPO's roles have a critic
    roles.model.save_pretrained(str(d / "adapters"), selected_adapters=sorted(roles.trainable), safe_serialization=True)
    roles.value_head.save(d / "value_head")
    checkpoint.save_trainer_state(
        d,
        optimizer=optimizer,
        kl_controller=asdict(kl_ctl),
        moments=asdict(moments),
        history=history,
        rng=checkpoint.rng_state(),
    )


def restore(ckpt: Path, roles: Roles) -> None:
    """The trainable adapters and the value head, in place, from a checkpoint."""
    assert roles.value_head is not None  # PPO's roles have a critic
    for name in roles.trainable:
        checkpoint.load_adapter_weights(roles.model, ckpt / "adapters" / name, adapter_name=name)
    head, _ = ScalarHead.load(ckpt / "value_head")
    roles.value_head.load_state_dict(head.state_dict())


# ---------------------------------------------------------------------------- stage


def train_ppo(
    cfg: PPOConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    reward_dir: str | None,
    data_dir: Path,
    out_dir: Path,
    seed: int = 0,
    warm_from: str | None = None,
) -> PPOResult:
    w = distributed.world()
    final = out_dir / "final"
    ckpt_root = out_dir / "checkpoints"
    if w.main:  # rank 0 alone writes: its outputs, checkpoints, MLflow
        checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
        shutil.rmtree(final, ignore_errors=True)  # never leave an older policy where this run's belongs
        checkpoint.recover(ckpt_root)  # what a kill left mid-save, put right before any rank reads a checkpoint
    distributed.barrier()
    # per rank: its share of each global batch (sizes that do not divide are an error, before anything is loaded)
    rank_cfg = replace(
        cfg,
        batch_size=distributed.per_rank(cfg.batch_size, "ppo.batch_size", w),
        minibatch_size=distributed.per_rank(cfg.minibatch_size, "ppo.minibatch_size", w),
    )
    rank_seed = seed + 1_000_003 * w.rank  # this rank's rollout draws (rank 0's are a single process's)
    prompts, eval_prompts = read_prompts(data_dir, "prompts"), read_prompts(data_dir, "eval")
    if not prompts:
        raise ValueError(f"PPO needs rollout prompts under {data_dir}/prompts")
    device = resolve_device(model_cfg.device)
    torch.manual_seed(seed)  # peft's LoRA init and a fresh value head's init draw from the global RNG
    guided.check_config(cfg)
    if cfg.ptx_coef < 0 or cfg.ptx_batch_size < 1:
        raise ValueError(
            f"ppo.ptx_coef={cfg.ptx_coef}, ppo.ptx_batch_size={cfg.ptx_batch_size}: the coefficient must be >= 0 "
            "(0: no PPO-ptx) and the batch at least 1 demonstration"
        )
    if cfg.generation_cache not in CACHES:
        raise ValueError(f"ppo.generation_cache={cfg.generation_cache!r}: expected one of {', '.join(CACHES)}")
    demonstrations = load_demonstrations(cfg, data_dir, None) if cfg.ptx_coef else None  # before any model loads
    roles = build_roles(cfg, model_cfg, sft_dir, reward_dir, device, warm_from)  # the champion's policy, if warm
    assert roles.value_head is not None  # build_roles gives PPO's roles a critic
    guide = load_guide(cfg.guide, roles, model_cfg, cfg.max_prompt_tokens + cfg.max_new_tokens)  # + a cut response
    demonstrations = replace(demonstrations, tok=roles.tok) if demonstrations else None
    params = [p for n, p in roles.model.named_parameters() if p.requires_grad] + list(roles.value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, eps=1e-5)
    scaler = LossScaler(model_cfg.dtype, device)  # fp16: loss scaling; fp32/bf16: a pass-through
    kl_ctl = kl_controller(cfg)
    moments = RunningMoments()
    history: list[dict[str, float]] = []

    fp = checkpoint.fingerprint(
        cfg,
        sft_dir=str(sft_dir),
        reward_dir=str(reward_dir),
        data=str(data_dir),
        seed=seed,
        n_prompts=len(prompts),
        model=model_cfg.name_or_path,
        **({"warm_from": str(warm_from)} if warm_from else {}),
    )
    start, state = checkpoint.resume(ckpt_root, fp, lambda ckpt: restore(ckpt, roles), optimizer=optimizer)
    if state:
        kl_ctl = type(kl_ctl)(**state["kl_controller"])
        moments, history = RunningMoments(**state["moments"]), list(state["history"])

    def save_checkpoint(d: Path) -> None:
        write_checkpoint(d, roles, optimizer, kl_ctl, moments, history)

    bar = tqdm(range(start, cfg.steps), desc="PPO", initial=start, total=cfg.steps, unit="iter", disable=not w.main)
    elapsed = history[-1].get("ppo/train_elapsed_seconds", 0.0) if history else 0.0  # training clock, evals left out
    for it in bar:
        t_start = time.perf_counter()
        # The same draws whether or not the run was resumed: transformers' generate samples from the global RNG
        # (it takes no generator), so that is seeded per iteration; the minibatch order has its own generator.
        torch.manual_seed(rank_seed * 100_003 + it)
        minibatch_order = torch.Generator().manual_seed(rank_seed * 100_003 + it)
        global_batch = [prompts[i] for i in checkpoint.batch_for_step(len(prompts), cfg.batch_size, it, seed)]
        batch = distributed.shard(global_batch, w)  # this rank's rollouts

        # 1. generate ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        with record_function("ppo/generate"):  # phases named for torch.profiler (benchmarks/ppo_profile.py)
            ro, guidance = guided.rollouts(roles, guide, batch, cfg, it, rank_seed)  # the guide's roll-ins/outs, if any
        t1 = time.perf_counter()

        # 2. score ------------------------------------------------------------------------------
        with record_function("ppo/score"):
            traj = score_rollout(roles, ro, batch, cfg, kl_ctl.value, moments, iteration=it, guidance=guidance)
        t2 = time.perf_counter()

        # 3. train ------------------------------------------------------------------------------
        with record_function("ppo/train"):
            stats = ppo_update(roles, traj, optimizer, params, rank_cfg, minibatch_order, it, scaler, demonstrations)
        t3 = time.perf_counter()

        # 4. adapt, log, checkpoint ------------------------------------------------------------
        beta = kl_ctl.value
        # the ranks' mean (throughputs: their sum); the KL controller steers the mean KL of the whole batch
        row = distributed.reduce_metrics(
            iteration_metrics(traj, stats, beta, (t0, t1, t2, t3)), OPTIONAL_METRICS, sum_keys=THROUGHPUTS
        )
        kl_ctl.update(row["ppo/kl"], len(global_batch))
        row["ppo/world_size"] = float(w.size)
        elapsed += time.perf_counter() - t_start
        row["ppo/train_elapsed_seconds"] = elapsed
        evaluate_now = cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.steps  # last: final eval
        if evaluate_now and w.main:  # rank 0 alone; the others wait for it in the next iteration's first collective
            ev = evaluate_policy_vs_reference(roles, eval_prompts[: cfg.eval_max_prompts], cfg, seed, reference=False)
            row.update({k: v for k, v in ev.items() if k != "ppo/eval_prompts"})
        history.append(row)
        log_to_active_run(row, it + 1)
        bar.set_postfix(score=f"{row['ppo/score_mean']:.2f}", kl=f"{row['ppo/kl']:.2f}", beta=f"{beta:.3f}")
        if cfg.sample_every and (it + 1) % cfg.sample_every == 0 and w.main:  # rank 0's rollouts
            log_table_to_active_run(
                {
                    "iteration": [it + 1] * len(batch),
                    "prompt": batch,
                    "response": ro.texts,
                    "score": traj.raw_scores.tolist(),
                    "kl": traj.kl.tolist(),
                },
                f"ppo/samples/iter_{it + 1:04d}.json",
            )
        t_save = time.perf_counter()
        if (it + 1) % cfg.save_every == 0 and it + 1 < cfg.steps and w.main:
            checkpoint.save(ckpt_root, it + 1, fp, save_checkpoint)
        elapsed += time.perf_counter() - t_save  # a checkpoint is part of training; logging and evals are not
    bar.close()

    # 5. evaluate on held-out prompts, write the outputs -----------------------------------------
    metrics = dict(history[-1]) if history else {}
    metrics["ppo/train_seconds"] = sum(
        h["ppo/time_generate"] + h["ppo/time_score"] + h["ppo/time_train"] for h in history
    )
    metrics["ppo/guide_tokens_mean"] = sum(h["ppo/guide_tokens"] for h in history) / max(1, len(history))
    metrics["ppo/resumed_from_iteration"] = float(start)
    distributed.check_replicas(params, "PPO")
    if not w.main:  # the policy is the same on every rank: rank 0 evaluates it and writes it
        return PPOResult(str(final / "policy"), str(final / "value"), None, metrics, history)
    metrics.update(evaluate_policy_vs_reference(roles, eval_prompts[: cfg.eval_max_prompts], cfg, seed))
    log_to_active_run(metrics, cfg.steps)
    checkpoint.save(ckpt_root, cfg.steps, fp, save_checkpoint)
    return write_outputs(roles, final, metrics, history, cfg.merge)


@torch.no_grad()
def evaluate_policy_vs_reference(
    roles: Roles, prompts: list[str], cfg: PPOConfig, seed: int, reference: bool = True
) -> dict[str, float]:
    """Held-out eval prompts, one sample each with the same seed: the policy vs the reference (SFT); with
    `reference=False` the policy alone."""
    if not prompts:
        return {}
    out = {}
    for tag, role in (("", roles.policy), ("_ref", REFERENCE))[: 2 if reference else 1]:
        torch.manual_seed(seed)  # generate samples from the global RNG (it takes no generator): same draws for both
        with roles.use(role), lora_merged(roles.model) if role != REFERENCE else nullcontext():
            ro = sample(
                roles.model, roles.tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.max_prompt_tokens
            )
        raw, score, disagreement = scores_for(roles, ro, prompts, cfg)
        mask = ro.response_mask.float()
        out[f"ppo/eval_score{tag}"] = raw.mean().item()
        out[f"ppo/eval_reward{tag}"] = score.mean().item()
        if roles.reward_members > 1:
            out[f"ppo/eval_rm_disagreement{tag}"] = disagreement.mean().item()
        out[f"ppo/eval_response_length{tag}"] = mask.sum(1).mean().item()
        out[f"ppo/eval_eos_rate{tag}"] = ro.ended.float().mean().item()
        if role == roles.policy:
            out["ppo/eval_kl"] = response_kl(roles, ro, cfg.temperature).mean().item()
    out["ppo/eval_prompts"] = float(len(prompts))
    return out


def write_outputs(
    roles: Roles, final: Path, metrics: dict[str, float], history: list[dict[str, float]], merge: bool
) -> PPOResult:
    """Everything to a tmp dir, then one rename: `final/` exists only for a finished, healthy run; then
    `COMPLETE.json` in its parent (the stage's out_dir) as the very last step."""
    assert roles.value_head is not None  # PPO's roles have a critic
    tmp = final.with_name(".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # tmp/policy and (ppo.value_model=adapter) tmp/value; the value head goes to tmp/value in either case
    roles.model.save_pretrained(str(tmp), selected_adapters=sorted(roles.trainable), safe_serialization=True)
    roles.tok.save_pretrained(tmp / "policy")
    roles.value_head.save(tmp / "value")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "history.json").write_text(json.dumps(history))
    merged_dir = None
    if merge:
        merged = roles.model.merge_and_unload(adapter_names=["policy"])
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        roles.tok.save_pretrained(tmp / "merged")
        merged_dir = str(final / "merged")
    tmp.rename(final)
    checkpoint.mark_complete(final.parent, {"stage": "ppo", "outputs": [final.name], "metrics": metrics})
    return PPOResult(str(final / "policy"), str(final / "value"), merged_dir, metrics, history)
