"""GRPO and RLOO: critic-free online RL, a policy stage beside PPO and rejection sampling.

Both sample a group of k responses to each prompt and let the group be the baseline, so there is no value function
to train or to load: GRPO (Shao et al. 2024) normalises each group's scores by its mean and std, RLOO (Ahmadian et
al. 2024) subtracts from each score the mean of the other k - 1 (`ppo_math.grpo_advantages`, `rloo_advantages`).
The KL to the SFT reference: GRPO puts `kl_coef` x k3 in the loss, RLOO takes `kl_coef` x each response's KL off
its score before the baseline (as TRL's trainers do). The update is PPO's clipped surrogate of that one
sequence-level advantage, `epochs` passes over minibatches (`ppo_math.group_policy_loss`).

Entry: `train_group_rl(algorithm, cfg, ppo_cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir)` -> result.
`cfg` is `policy.grpo` or `policy.rloo`; the sampling settings, the reward (use_reward_model, reward_fn,
missing_eos_penalty) and the LoRA settings are PPO's (`ppo.*`).

Built on the PPO stage's parts, not TRL's GRPOTrainer / RLOOTrainer: the roles on one base (the reward model a
frozen adapter of the SFT weights, the reference the adapters disabled: one model in memory, where TRL's trainers
load the reward model as a second model and, without peft's adapter trick, a reference), sampling with the LoRA
merged (`roles.lora_merged`, ~18% faster per rollout batch here), the same reward with the same missing-EOS
penalty, and the same checkpoints, evaluation and output layout as PPO, so the flow caches, resumes, gates,
registers and serves the result unchanged. TRL's trainers take reward functions over text, so the reward model
would score through a second tokenisation and forward of its own.

One step reads top to bottom:
    1. sample   k responses to each of `prompts_per_step` prompts from the policy (LoRA merged)
    2. score    old and reference log-probs, the score (normalised RM + reward_fn, missing-EOS penalty)
    3. credit   each group's advantages (RLOO: the KL off the score first)
    4. train    `epochs` passes over shuffled minibatches: clipped surrogate (+ GRPO's KL), gradient clipping
    5. log      `<algorithm>/*` for the step, a checkpoint every `save_every`
Then the held-out eval prompts, policy vs reference, as PPO reports them (`<algorithm>/eval_*`), and the outputs in
PPO's layout (`final/policy`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from components.config import GroupRLConfig, ModelConfig, PPOConfig
from components.data.readers import read_prompts
from components.models.generation import Rollout
from components.models.roles import lora_merged
from components.training import checkpoint
from components.training.callbacks import log_table_to_active_run, log_to_active_run
from components.training.policy_run import start_policy_run, write_policy_outputs
from components.training.ppo import (
    PPODivergence,
    evaluate_policy_vs_reference,
    penalise_missing_eos,
    policy_logits,
    reference_logprobs,
    scores_for,
)
from components.training.ppo_math import (
    entropy_from_logits,
    group_policy_loss,
    grpo_advantages,
    kl_k1,
    logprobs_of,
    rloo_advantages,
)
from components.training.rejection_sampling import sample_round

ALGORITHMS = ("grpo", "rloo")


@dataclass
class GroupRLResult:
    policy_dir: str  # peft adapter "policy" on the SFT weights (+ tokenizer): PPO's layout
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # <algorithm>/* per step


def check_config(algorithm: str, cfg: GroupRLConfig) -> None:
    """Refuse settings that cannot work, before any model loads."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"policy.algorithm={algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    rows = cfg.prompts_per_step * cfg.samples_per_prompt
    problems = [
        f"policy.{algorithm}.{name} must be {rule}, got {value!r}"
        for name, value, ok, rule in (
            ("steps", cfg.steps, cfg.steps >= 1, "at least 1"),
            ("prompts_per_step", cfg.prompts_per_step, cfg.prompts_per_step >= 1, "at least 1"),
            ("samples_per_prompt", cfg.samples_per_prompt, cfg.samples_per_prompt >= 2, "at least 2 (a group)"),
            ("epochs", cfg.epochs, cfg.epochs >= 1, "at least 1"),
            ("minibatch_size", cfg.minibatch_size, 1 <= cfg.minibatch_size <= rows, f"in 1..{rows} (a step's rows)"),
            ("learning_rate", cfg.learning_rate, cfg.learning_rate > 0, "above 0"),
            ("cliprange", cfg.cliprange, cfg.cliprange > 0, "above 0"),
            ("kl_coef", cfg.kl_coef, cfg.kl_coef >= 0, "at least 0"),
            ("save_every", cfg.save_every, cfg.save_every >= 1, "at least 1"),
        )
        if not ok
    ]
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------- steps 2-4


@torch.no_grad()
def score_group(roles, ro: Rollout, rows: list[str], ppo_cfg: PPOConfig) -> dict[str, torch.Tensor]:
    """Step 2, in chunks of ppo.batch_size rows: the policy's (old) and the reference's log-probs [B, T], the raw RM
    score and the optimised score (missing-EOS penalty applied) [B], the RM ensemble's disagreement [B] (0 with one
    member), and each response's k1 KL (summed) [B]."""
    T = ppo_cfg.temperature
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("old", "ref", "raw", "score", "kl", "entropy", "spread")}
    for i in range(0, len(rows), ppo_cfg.batch_size):
        part = ro.select(torch.arange(i, min(i + ppo_cfg.batch_size, len(rows))))
        logits = policy_logits(roles, part.sequence, part.sequence_mask, part.query.shape[1])
        if not torch.isfinite(logits).all():
            raise PPODivergence("the policy's logits contain NaN/inf: no policy was written; lower the learning rate")
        old = logprobs_of(logits, part.response, T)
        mask = part.response_mask.float()
        out["entropy"].append((entropy_from_logits(logits, T) * mask).sum(1))
        ref = reference_logprobs(roles, part, T)
        raw, score, disagreement = scores_for(roles, part, rows[i : i + ppo_cfg.batch_size], ppo_cfg)
        out["old"].append(old)
        out["ref"].append(ref)
        out["raw"].append(raw)
        out["spread"].append(disagreement)
        out["score"].append(penalise_missing_eos(score, part.ended, ppo_cfg))
        out["kl"].append((kl_k1(old, ref) * mask).sum(1))
    width = ro.response.shape[1]  # chunks are as wide as the whole rollout (select keeps its columns)
    assert all(t.shape[1] == width for t in out["old"])
    return {k: torch.cat(v) for k, v in out.items()}


def advantages_for(algorithm: str, scored: dict[str, torch.Tensor], k: int, kl_coef: float) -> torch.Tensor:
    """Step 3: [B] advantages from each prompt's group of k rows (rows i*k..i*k+k-1 answer prompt i)."""
    if algorithm == "grpo":
        return grpo_advantages(scored["score"].view(-1, k)).flatten()
    return rloo_advantages((scored["score"] - kl_coef * scored["kl"]).view(-1, k)).flatten()


def update(
    roles,
    ro: Rollout,
    scored: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    algorithm: str,
    cfg: GroupRLConfig,
    temperature: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """Step 4: `cfg.epochs` passes over shuffled minibatches; GRPO's KL in the loss, RLOO's already in the score."""
    kl_in_loss = cfg.kl_coef if algorithm == "grpo" else 0.0
    q_len, mask = ro.query.shape[1], ro.response_mask.float()
    losses, clipfracs = [], []
    for _ in range(cfg.epochs):
        for mb in torch.randperm(len(advantages), generator=generator).to(advantages.device).split(cfg.minibatch_size):
            logits = policy_logits(roles, ro.sequence[mb], ro.sequence_mask[mb], q_len)
            logprobs = logprobs_of(logits, ro.response[mb], temperature)
            loss, clipfrac, _ = group_policy_loss(
                logprobs, scored["old"][mb], scored["ref"][mb], advantages[mb], mask[mb], cfg.cliprange, kl_in_loss
            )
            if not torch.isfinite(loss):
                raise PPODivergence(
                    f"the {algorithm} loss is {loss.item()}: no policy was written; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(loss.detach())
            clipfracs.append(clipfrac.detach())
    return {"policy_loss": torch.stack(losses).mean().item(), "clipfrac": torch.stack(clipfracs).mean().item()}


# ---------------------------------------------------------------------------- stage


def train_group_rl(
    algorithm: str,
    cfg: GroupRLConfig,
    ppo_cfg: PPOConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    reward_dir: str | None,
    data_dir: Path,
    out_dir: Path,
    seed: int = 0,
    warm_from: str | None = None,
) -> GroupRLResult:
    checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
    check_config(algorithm, cfg)
    prompts, eval_prompts = read_prompts(data_dir, "prompts"), read_prompts(data_dir, "eval")
    if not prompts:
        raise ValueError(f"{algorithm} needs prompts under {data_dir}/prompts")
    run = start_policy_run(
        {algorithm: asdict(cfg)}, ppo_cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir, seed, warm_from,
        cfg.learning_rate, {"reward_dir": str(reward_dir), "n_prompts": len(prompts)}, adam_eps=1e-5,
    )  # fmt: skip
    roles, params, optimizer, final, checkpoints = run.roles, run.params, run.optimizer, run.final, run.checkpoints
    assert optimizer is not None  # a learning rate was given
    start, history = run.start, run.history
    ns, k = algorithm, cfg.samples_per_prompt

    bar = tqdm(range(start, cfg.steps), desc=algorithm.upper(), initial=start, total=cfg.steps, unit="step")
    for step in bar:
        torch.manual_seed(seed * 100_003 + step)  # generate samples from the global RNG: the same draws on resume
        order = torch.Generator().manual_seed(seed * 100_003 + step)
        batch = [prompts[i] for i in checkpoint.batch_for_step(len(prompts), cfg.prompts_per_step, step, seed)]
        rows = [p for p in batch for _ in range(k)]

        # 1. sample ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        with lora_merged(roles.model):
            ro = sample_round(roles, batch, k, ppo_cfg)
        t1 = time.perf_counter()

        # 2. score -------------------------------------------------------------------------------
        scored = score_group(roles, ro, rows, ppo_cfg)

        # 3. credit ------------------------------------------------------------------------------
        advantages = advantages_for(algorithm, scored, k, cfg.kl_coef)
        t2 = time.perf_counter()

        # 4. train -------------------------------------------------------------------------------
        stats = update(roles, ro, scored, advantages, optimizer, params, algorithm, cfg, ppo_cfg.temperature, order)
        t3 = time.perf_counter()

        # 5. log, checkpoint ---------------------------------------------------------------------
        mask = ro.response_mask.float()
        groups = scored["score"].view(-1, k)
        row = {
            f"{ns}/score_mean": scored["raw"].mean().item(),
            f"{ns}/reward_mean": scored["score"].mean().item(),
            f"{ns}/reward_std_in_group": groups.std(dim=1).mean().item(),
            f"{ns}/groups_without_signal": (groups.std(dim=1) == 0).float().mean().item(),
            f"{ns}/kl": scored["kl"].mean().item(),
            f"{ns}/entropy": (scored["entropy"].sum() / mask.sum().clamp(min=1)).item(),
            f"{ns}/advantage_abs_mean": advantages.abs().mean().item(),
            f"{ns}/policy_loss": stats["policy_loss"],
            f"{ns}/clipfrac": stats["clipfrac"],
            f"{ns}/response_length": mask.sum(1).mean().item(),
            f"{ns}/eos_rate": ro.ended.float().mean().item(),
            **({f"{ns}/rm_disagreement": scored["spread"].mean().item()} if roles.reward_members > 1 else {}),
            f"{ns}/time_generate": t1 - t0,
            f"{ns}/time_score": t2 - t1,
            f"{ns}/time_train": t3 - t2,
        }
        history.append(row)
        log_to_active_run(row, step + 1)
        bar.set_postfix(score=f"{row[f'{ns}/score_mean']:.2f}", kl=f"{row[f'{ns}/kl']:.2f}")
        if step + 1 == cfg.steps:  # the last step's samples, as PPO's sample tables
            log_table_to_active_run(
                {"step": [step + 1] * len(rows), "prompt": rows, "response": ro.texts, "score": scored["raw"].tolist()},
                f"{ns}/samples/step_{step + 1:04d}.json",
            )
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoints.save(step + 1, history)
    bar.close()

    # 6. evaluate on held-out prompts, write the outputs -----------------------------------------
    metrics = dict(history[-1]) if history else {}
    metrics[f"{ns}/train_seconds"] = sum(
        h[f"{ns}/time_generate"] + h[f"{ns}/time_score"] + h[f"{ns}/time_train"] for h in history
    )
    metrics[f"{ns}/samples"] = float(cfg.steps * cfg.prompts_per_step * k)
    held_out = evaluate_policy_vs_reference(roles, eval_prompts[: ppo_cfg.eval_max_prompts], ppo_cfg, seed)
    metrics.update({key.replace("ppo/", f"{ns}/", 1): v for key, v in held_out.items()})
    metrics[f"{ns}/resumed_from_step"] = float(start)
    log_to_active_run(metrics, cfg.steps)
    checkpoints.save(cfg.steps, history)
    return GroupRLResult(write_policy_outputs(roles, final, algorithm, metrics, history), metrics, history)
