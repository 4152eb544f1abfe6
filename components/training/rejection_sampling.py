"""Rejection-sampling fine-tuning: a policy stage that learns by choosing among its own samples.

"Language models can do RL": sampling n responses, keeping the best and training on them is policy
improvement (expert iteration; Anthony et al. 2017, "Thinking fast and slow"; the rejection-sampling stage of
Llama 2, Touvron et al. 2023, sec. 3.2.3; RAFT, Dong et al. 2023). It needs no value function, no KL penalty
and no PPO update: the reward only ranks. Its cost is the n samples per prompt, and its KL to the SFT model
is not controlled, only reported.

Entry: `train_rejection_sampling(cfg, ppo_cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir)`
-> RejectionSamplingResult. `cfg` is `policy.rejection_sampling`; the sampling settings (max_new_tokens,
temperature, top_p, max_prompt_tokens), the reward (use_reward_model, reward_fn, reward_fn_weight,
missing_eos_penalty) and the LoRA settings are PPO's (`ppo.*`): the same policy stage, another algorithm.

The model is PPO's (components/models/roles.py): the SFT weights once, a trainable LoRA adapter "policy",
the reward model as the frozen adapter "reward" + its head, the reference as adapters disabled. One round
reads top to bottom:
    1. sample   `samples_per_prompt` responses to each of `prompts_per_round` prompts from the policy
    2. score    the policy stage's reward (ppo.scores_for; missing-EOS penalty as in PPO)
    3. select   each prompt's best round(keep_fraction * n) samples (`select_best`), at least `min_score`
    4. train    the policy adapter on the kept (prompt, response) pairs with TRL's SFTTrainer
                (completion-only loss, as the SFT stage), `train_epochs` passes
    5. log      `rs/*` for the round, a table of the kept samples, a checkpoint
Then the held-out eval prompts, policy vs reference, as PPO reports them (`rs/eval_*`), and the outputs in
PPO's layout (`final/policy`: adapter + tokenizer), so evaluation, gate and registry take either.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from components.config import ModelConfig, PPOConfig, RejectionSamplingConfig
from components.data.readers import read_prompts
from components.models import chat
from components.models.generation import Rollout, sample
from components.training import checkpoint
from components.training.callbacks import log_table_to_active_run, log_to_active_run
from components.training.policy_run import start_policy_run, write_policy_outputs
from components.training.ppo import (
    evaluate_policy_vs_reference,
    penalise_missing_eos,
    response_kl,
    scores_for,
)


@dataclass
class RejectionSamplingResult:
    policy_dir: str  # peft adapter "policy" on the SFT weights (+ tokenizer): PPO's layout
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # rs/* per round


# ---------------------------------------------------------------------------- pure functions


def keep_count(keep_fraction: float, n: int) -> int:
    """Samples kept per prompt: round(keep_fraction * n), half up, at least 1. (0.25, 4) -> 1; (0.5, 3) -> 2."""
    return max(1, min(n, int(keep_fraction * n + 0.5)))


def select_best(scores: torch.Tensor, keep_fraction: float, min_score: float | None = None) -> torch.Tensor:
    """Which samples to train on: each prompt's best keep_count(keep_fraction, n) (of equal scores, the earlier
    sample), then, with `min_score`, only those scoring at least that.

    scores: [P, n] (prompt, sample) -> kept: [P, n] bool
    """
    k = keep_count(keep_fraction, scores.shape[1])
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [P, n]
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :k], True)
    if min_score is not None:
        kept &= scores >= min_score
    return kept


def check_config(cfg: RejectionSamplingConfig) -> None:
    """Refuse settings that cannot work, before any model loads."""
    problems = [
        f"policy.rejection_sampling.{name} must be {rule}, got {value!r}"
        for name, value, ok, rule in (
            ("rounds", cfg.rounds, cfg.rounds >= 1, "at least 1"),
            ("prompts_per_round", cfg.prompts_per_round, cfg.prompts_per_round >= 1, "at least 1"),
            ("samples_per_prompt", cfg.samples_per_prompt, cfg.samples_per_prompt >= 1, "at least 1"),
            ("keep_fraction", cfg.keep_fraction, 0 < cfg.keep_fraction <= 1, "in (0, 1]"),
            ("train_epochs", cfg.train_epochs, cfg.train_epochs > 0, "above 0"),
            ("batch_size", cfg.batch_size, cfg.batch_size >= 1, "at least 1"),
        )
        if not ok
    ]
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------- one round's steps


def sample_round(roles, prompts: list[str], n: int, cfg: PPOConfig) -> Rollout:
    """n responses to each prompt from the policy, in chunks of ppo.batch_size rows: rows i*n..i*n+n-1 answer
    prompt i."""
    rows = [p for p in prompts for _ in range(n)]
    parts = []
    for i in range(0, len(rows), cfg.batch_size):
        parts.append(
            sample(
                roles.model,
                roles.tok,
                rows[i : i + cfg.batch_size],
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.top_p,
                cfg.max_prompt_tokens,
            )
        )
    return concat_rollouts(parts, roles.tok.pad_token_id)


def concat_rollouts(parts: list[Rollout], pad: int) -> Rollout:
    """Rollouts of different widths as one: queries left-padded, responses right-padded to the widest."""

    def widen(t: torch.Tensor, width: int, left: bool, value: int) -> torch.Tensor:
        extra = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        return torch.cat([extra, t] if left else [t, extra], dim=1)

    tq = max(r.query.shape[1] for r in parts)
    tr = max(r.response.shape[1] for r in parts)
    return Rollout(
        torch.cat([widen(r.query, tq, True, pad) for r in parts]),
        torch.cat([widen(r.query_mask, tq, True, 0) for r in parts]),
        torch.cat([widen(r.response, tr, False, pad) for r in parts]),
        torch.cat([widen(r.response_mask, tr, False, 0) for r in parts]),
        torch.cat([r.ended for r in parts]),
        [t for r in parts for t in r.texts],
    )


@torch.no_grad()
def score_round(roles, ro: Rollout, rows: list[str], cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each sample (as PPO optimises it, missing-EOS penalty included) and its KL to the reference
    (k1, summed over the response): -> [B], [B]. Scored in chunks of ppo.batch_size rows."""
    scores, kls = [], []
    for i in range(0, len(rows), cfg.batch_size):
        part = ro.select(torch.arange(i, min(i + cfg.batch_size, len(rows))))
        score = scores_for(roles, part, rows[i : i + cfg.batch_size], cfg).score
        scores.append(penalise_missing_eos(score, part.ended, cfg))
        kls.append(response_kl(roles, part, cfg.temperature))
    return torch.cat(scores), torch.cat(kls)


def finetune(roles, examples: list[dict], cfg: RejectionSamplingConfig, ppo_cfg: PPOConfig, seed: int, work: Path):
    """Train the policy adapter on kept {"prompt", "completion"} examples with TRL's SFTTrainer (loss on the
    completion only, as the SFT stage): -> mean training loss."""
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    args = TrlSFTConfig(
        output_dir=str(work),
        num_train_epochs=cfg.train_epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        max_length=ppo_cfg.max_prompt_tokens + ppo_cfg.max_new_tokens + 1,
        completion_only_loss=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=next(roles.model.parameters()).device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if chat.uses_template(roles.tok):  # rendered as SFT renders them (components/models/chat.py)
        examples = [chat.conversation(x) for x in examples]
    roles.tok.padding_side = "right"  # training pads on the right; sampling (left) is restored below
    try:
        trainer = SFTTrainer(
            model=roles.model, args=args, train_dataset=Dataset.from_list(examples), processing_class=roles.tok
        )
        return trainer.train().training_loss
    finally:
        roles.tok.padding_side = "left"
        roles.model.eval()


# ---------------------------------------------------------------------------- stage


def train_rejection_sampling(
    cfg: RejectionSamplingConfig,
    ppo_cfg: PPOConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    reward_dir: str | None,
    data_dir: Path,
    out_dir: Path,
    seed: int = 0,
    warm_from: str | None = None,
) -> RejectionSamplingResult:
    checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
    check_config(cfg)
    prompts, eval_prompts = read_prompts(data_dir, "prompts"), read_prompts(data_dir, "eval")
    if not prompts:
        raise ValueError(f"rejection sampling needs prompts under {data_dir}/prompts")
    run = start_policy_run(  # no optimizer: each round's fine-tune starts its own
        {"rs": asdict(cfg)}, ppo_cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir, seed, warm_from, None,
        {"reward_dir": str(reward_dir), "n_prompts": len(prompts)},
    )  # fmt: skip
    roles, final, checkpoints, start, history = run.roles, run.final, run.checkpoints, run.start, run.history

    n = cfg.samples_per_prompt
    bar = tqdm(range(start, cfg.rounds), desc="rejection sampling", initial=start, total=cfg.rounds, unit="round")
    for rnd in bar:
        torch.manual_seed(seed * 100_003 + rnd)  # generate samples from the global RNG: the same draws on resume
        batch = [prompts[i] for i in checkpoint.batch_for_step(len(prompts), cfg.prompts_per_round, rnd, seed)]
        rows = [p for p in batch for _ in range(n)]

        # 1. sample ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        ro = sample_round(roles, batch, n, ppo_cfg)
        t1 = time.perf_counter()

        # 2. score -------------------------------------------------------------------------------
        scores, kl = score_round(roles, ro, rows, ppo_cfg)
        t2 = time.perf_counter()

        # 3. select ------------------------------------------------------------------------------
        kept = select_best(scores.view(len(batch), n), cfg.keep_fraction, cfg.min_score).flatten()
        chosen = kept.nonzero().flatten().tolist()
        examples = [{"prompt": rows[i], "completion": " " + ro.texts[i]} for i in chosen if ro.texts[i]]

        # 4. train -------------------------------------------------------------------------------
        loss = finetune(roles, examples, cfg, ppo_cfg, seed * 100_003 + rnd, out_dir / "trainer") if examples else 0.0
        t3 = time.perf_counter()

        # 5. log, checkpoint ---------------------------------------------------------------------
        k = kept.to(scores.device)
        mask = ro.response_mask.float()
        row = {
            "rs/score_mean": scores.mean().item(),
            "rs/score_kept_mean": scores[k].mean().item() if k.any() else float("nan"),
            "rs/score_best_mean": scores.view(len(batch), n).max(1).values.mean().item(),
            "rs/kept": float(len(examples)),
            "rs/keep_rate": len(examples) / len(rows),
            "rs/kl": kl.mean().item(),
            "rs/kl_kept": kl[k].mean().item() if k.any() else float("nan"),
            "rs/response_length": mask.sum(1).mean().item(),
            "rs/eos_rate": ro.ended.float().mean().item(),
            "rs/sft_loss": loss,
            "rs/time_generate": t1 - t0,
            "rs/time_score": t2 - t1,
            "rs/time_train": t3 - t2,
        }
        history.append(row)
        log_to_active_run(row, rnd + 1)
        bar.set_postfix(
            score=f"{row['rs/score_mean']:.2f}", kept=f"{row['rs/score_kept_mean']:.2f}", kl=f"{row['rs/kl']:.2f}"
        )
        log_table_to_active_run(
            {
                "round": [rnd + 1] * len(chosen),
                "prompt": [rows[i] for i in chosen],
                "response": [ro.texts[i] for i in chosen],
                "score": [scores[i].item() for i in chosen],
            },
            f"rs/kept/round_{rnd + 1:03d}.json",
        )
        if rnd + 1 < cfg.rounds:
            checkpoints.save(rnd + 1, history)
    bar.close()
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)

    # 6. evaluate on held-out prompts, write the outputs -----------------------------------------
    metrics = dict(history[-1]) if history else {}
    metrics["rs/train_seconds"] = sum(h["rs/time_generate"] + h["rs/time_score"] + h["rs/time_train"] for h in history)
    metrics["rs/samples"] = float(cfg.rounds * cfg.prompts_per_round * n)
    held_out = evaluate_policy_vs_reference(roles, eval_prompts[: ppo_cfg.eval_max_prompts], ppo_cfg, seed)
    metrics.update({k.replace("ppo/", "rs/", 1): v for k, v in held_out.items()})
    metrics["rs/resumed_from_round"] = float(start)
    log_to_active_run(metrics, cfg.rounds)
    checkpoints.save(cfg.rounds, history)
    policy_dir = write_policy_outputs(roles, final, "rejection-sampling", metrics, history)
    return RejectionSamplingResult(policy_dir, metrics, history)
