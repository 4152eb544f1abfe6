"""PPO stage: LoRA PPO with policy, reference, value and reward on ONE shared base model.

Entry: `train_ppo(cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir)` -> PPOResult.

The SFT weights (merged) are loaded once. On them, as peft adapters:

    policy     trainable LoRA adapter "policy"              -> LM head      (starts equal to SFT: LoRA B = 0)
    reference  the same model with adapters disabled         -> LM head      (= the SFT policy)
    value      trainable LoRA adapter "value" + scalar head  -> per token    (init from the RM, as InstructGPT)
    reward     frozen adapter "reward" + head from the RM    -> per sequence (normalised with the RM's mean/std)

plus an optional reward callable by import path (`ppo.reward_fn`), added to the RM score.

One iteration reads top to bottom (CleanRL style):
    1. generate   sample a batch of responses from the policy (KV cache, left padding, stop at EOS)
    2. score      log-probs (policy, reference), values, sequence scores; per-token rewards
                  r_t = -beta * KL_t (+ score at the last token); GAE; whitened advantages
    3. train      PPO epochs over minibatches: clipped policy loss + vf_coef * clipped value loss,
                  gradient clipping, early stop on approx-KL
    4. adapt      the KL coefficient (Ziegler et al. 2019), log `ppo/*`, checkpoint every N
The math lives in `ppo_math.py` as pure, hand-tested functions.

Divergence (NaN/inf in logits or loss, or KL above `kl_ceiling`) raises `PPODivergence` before
anything is written to `out_dir/final`, so no later stage can take a diverged policy for a valid one.
`out_dir/COMPLETE.json` is written after `final/` (`checkpoint.is_complete(out_dir)`).
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from components.config import ModelConfig, PPOConfig
from components.data.schemas import read_jsonl, shard_files
from components.models.generation import Rollout, sample
from components.models.loading import load_causal_lm, load_tokenizer, resolve_device
from components.models.roles import ScalarHead, activate, hidden_states, position_ids, sequence_scores
from components.training import checkpoint
from components.training.callbacks import log_table_to_active_run, log_to_active_run
from components.training.ppo_math import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_k1,
    kl_k3,
    logprobs_of,
    masked_mean,
    policy_loss,
    rewards_with_kl,
    value_loss,
    whiten,
)

TRAINABLE = frozenset({"policy", "value"})


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


@dataclass
class Roles:
    model: object  # PeftModelForCausalLM: SFT base + adapters policy, value[, reward]
    tok: object
    value_head: ScalarHead
    reward_head: ScalarHead | None
    reward_mean: float
    reward_std: float
    reward_fn: Callable[[list[str], list[str]], list[float]] | None


def load_reward_fn(path: str | None) -> Callable | None:
    if not path:
        return None
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"ppo.reward_fn={path!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def build_roles(cfg: PPOConfig, model_cfg: ModelConfig, sft_dir: str, reward_dir: str | None, device) -> Roles:
    from peft import LoraConfig, get_peft_model

    if cfg.use_reward_model and not reward_dir:
        raise ValueError("ppo.use_reward_model is true but no reward model dir was given")
    if not cfg.use_reward_model and not cfg.reward_fn:
        raise ValueError("PPO needs a reward: set ppo.use_reward_model=true and/or ppo.reward_fn")
    if cfg.value_init == "reward" and not cfg.use_reward_model:
        raise ValueError("ppo.value_init=reward needs the reward model; use ppo.value_init=fresh")
    tok = load_tokenizer(sft_dir, model_cfg, padding_side="left")
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(load_causal_lm(sft_dir, model_cfg, device), lora, adapter_name="policy")
    reward_head, mean, std = None, 0.0, 1.0
    if cfg.use_reward_model:
        rm_adapter = str(Path(reward_dir) / "adapter")
        model.load_adapter(rm_adapter, adapter_name="reward", is_trainable=False)
        reward_head, meta = ScalarHead.load(Path(reward_dir), device)
        reward_head.requires_grad_(False)
        mean, std = meta["reward_mean"], meta["reward_std"]
    if cfg.value_init == "reward":
        model.load_adapter(rm_adapter, adapter_name="value", is_trainable=True)
        value_head = copy.deepcopy(reward_head).requires_grad_(True)
    elif cfg.value_init == "fresh":
        model.add_adapter("value", lora)
        value_head = ScalarHead(model.config.hidden_size).to(device)
    else:
        raise ValueError(f"ppo.value_init={cfg.value_init!r}: expected reward | fresh")
    activate(model, "policy", TRAINABLE)
    return Roles(model, tok, value_head, reward_head, mean, std, load_reward_fn(cfg.reward_fn))


def policy_logits(roles: Roles, seq: torch.Tensor, mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Logits that predict the response tokens: (B, Tq + Tr) -> (B, Tr, V). Active adapter decides the role."""
    out = roles.model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return out.logits[:, q_len - 1 : -1]


def reference_logprobs(roles: Roles, ro: Rollout, temperature: float) -> torch.Tensor:
    """The reference is the policy's base with all adapters disabled (= the SFT model). -> (B, Tr)"""
    with roles.model.disable_adapter():
        logits = policy_logits(roles, ro.sequence, ro.sequence_mask, ro.query.shape[1])
    activate(roles.model, "policy", TRAINABLE)  # peft's disable/enable resets requires_grad
    return logprobs_of(logits, ro.response, temperature)


def token_values(roles: Roles, seq: torch.Tensor, mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """V(prefix) before each response token, from the value adapter + head: -> (B, Tr)."""
    activate(roles.model, "value", TRAINABLE)
    v = roles.value_head(hidden_states(roles.model, seq, mask)[:, q_len - 1 : -1])
    activate(roles.model, "policy", TRAINABLE)
    return v


def rm_scores(roles: Roles, ro: Rollout) -> torch.Tensor:
    """Raw reward-model score of prompt + response, read at the last token: -> (B,)."""
    activate(roles.model, "reward", TRAINABLE)
    s = sequence_scores(roles.model, roles.reward_head, ro.sequence, ro.sequence_mask)
    activate(roles.model, "policy", TRAINABLE)
    return s


@torch.no_grad()
def scores_for(roles: Roles, ro: Rollout, prompts: list[str], cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> raw RM score (B,) (zeros without an RM) and the score PPO optimises (B,): the RM score
    normalised with the RM's training statistics, plus reward_fn_weight * reward_fn."""
    device = ro.response.device
    raw = torch.zeros(len(prompts), device=device)
    score = torch.zeros(len(prompts), device=device)
    if roles.reward_head is not None:
        raw = rm_scores(roles, ro)
        score = (raw - roles.reward_mean) / roles.reward_std
    if roles.reward_fn is not None:
        extra = torch.tensor([float(x) for x in roles.reward_fn(prompts, ro.texts)], device=device)
        score = score + cfg.reward_fn_weight * extra
    return raw, score


# ---------------------------------------------------------------------------- data


def prompts_of(data_dir: Path, kind: str) -> list[str]:
    return [row["prompt"] for shard in shard_files(data_dir / kind) for _, row in read_jsonl(shard, kind).rows]


# ---------------------------------------------------------------------------- stage


def train_ppo(
    cfg: PPOConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    reward_dir: str | None,
    data_dir: Path,
    out_dir: Path,
    seed: int = 0,
) -> PPOResult:
    checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
    prompts, eval_prompts = prompts_of(data_dir, "prompts"), prompts_of(data_dir, "eval")
    if not prompts:
        raise ValueError(f"PPO needs rollout prompts under {data_dir}/prompts")
    device = resolve_device(model_cfg.device)
    torch.manual_seed(seed)
    roles = build_roles(cfg, model_cfg, sft_dir, reward_dir, device)
    model, tok = roles.model, roles.tok
    params = [p for n, p in model.named_parameters() if p.requires_grad] + list(roles.value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, eps=1e-5)
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)
    moments = RunningMoments()
    history: list[dict[str, float]] = []

    final = out_dir / "final"
    shutil.rmtree(final, ignore_errors=True)  # never leave an older policy where this run's belongs
    ckpt_root = out_dir / "checkpoints"
    fp = checkpoint.fingerprint(
        cfg,
        sft_dir=str(sft_dir),
        reward_dir=str(reward_dir),
        data=str(data_dir),
        seed=seed,
        n_prompts=len(prompts),
        model=model_cfg.name_or_path,
    )
    start = 0
    if found := checkpoint.latest(ckpt_root, fp):
        ckpt, start = found
        state = checkpoint.load_trainer_state(ckpt)
        restore(ckpt, roles)
        optimizer.load_state_dict(state["optimizer"])
        kl_ctl.value = state["kl_coef"]
        moments = RunningMoments(**state["moments"])
        history = list(state["history"])
        checkpoint.set_rng_state(state["rng"])

    def write_checkpoint(d: Path) -> None:
        model.save_pretrained(d / "adapters", selected_adapters=sorted(TRAINABLE), safe_serialization=True)
        roles.value_head.save(d / "value_head")
        checkpoint.save_trainer_state(
            d,
            optimizer=optimizer,
            kl_coef=kl_ctl.value,
            moments=asdict(moments),
            history=history,
            rng=checkpoint.rng_state(),
        )

    bar = tqdm(range(start, cfg.steps), desc="PPO", initial=start, total=cfg.steps, unit="iter")
    for it in bar:
        torch.manual_seed(seed * 100_003 + it)  # the same rollouts whether or not the run was resumed
        batch = [prompts[i] for i in checkpoint.batch_for_step(len(prompts), cfg.batch_size, it, seed)]

        # 1. generate ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        ro = sample(model, tok, batch, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.max_prompt_tokens)
        seq, smask, q_len, mask = ro.sequence, ro.sequence_mask, ro.query.shape[1], ro.response_mask.float()
        t1 = time.perf_counter()

        # 2. score ------------------------------------------------------------------------------
        with torch.no_grad():
            logits = policy_logits(roles, seq, smask, q_len)
            if not torch.isfinite(logits).all():
                raise PPODivergence(
                    f"PPO diverged at iteration {it}: the policy's logits contain NaN/inf. "
                    "No policy was written. Lower ppo.learning_rate or ppo.max_grad_norm."
                )
            old_logprobs = logprobs_of(logits, ro.response, cfg.temperature)
            entropy = masked_mean(entropy_from_logits(logits / cfg.temperature), mask).item()
            del logits
            ref_logprobs = reference_logprobs(roles, ro, cfg.temperature)
            old_values = token_values(roles, seq, smask, q_len) * mask
            raw, score = scores_for(roles, ro, batch, cfg)
            if cfg.whiten_scores:
                moments.update(score)
                score = (score - moments.mean) / moments.std
            if cfg.missing_eos_penalty is not None:
                score = torch.where(ro.ended, score, score - cfg.missing_eos_penalty)
            kl_seq = (kl_k1(old_logprobs, ref_logprobs) * mask).sum(1)  # (B,)
            kl_mean = kl_seq.mean().item()
            if not kl_mean <= cfg.kl_ceiling:  # also catches NaN
                raise PPODivergence(
                    f"PPO diverged at iteration {it}: mean KL to the reference {kl_mean:.2f} exceeds "
                    f"ppo.kl_ceiling={cfg.kl_ceiling}. No policy was written. Lower ppo.learning_rate, "
                    "raise ppo.init_kl_coef, or lower ppo.target_kl."
                )
            kl_tokens = KL_ESTIMATORS[cfg.kl_estimator](old_logprobs, ref_logprobs) * mask
            rewards, non_score = rewards_with_kl(score, kl_tokens, mask, kl_ctl.value)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)
        t2 = time.perf_counter()

        # 3. train ------------------------------------------------------------------------------
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "vf_clipfrac", "approx_kl")}
        stop, epochs = False, 0
        for _epoch in range(cfg.ppo_epochs):
            epochs += 1
            for mb in torch.randperm(len(batch), device=device).split(cfg.minibatch_size):
                mb_mask = mask[mb]
                new_logprobs = logprobs_of(
                    policy_logits(roles, seq[mb], smask[mb], q_len), ro.response[mb], cfg.temperature
                )
                new_values = token_values(roles, seq[mb], smask[mb], q_len)
                pg, clipfrac, approx_kl = policy_loss(
                    new_logprobs, old_logprobs[mb], advantages[mb], mb_mask, cfg.cliprange
                )
                vf, vf_clipfrac = value_loss(new_values, old_values[mb], returns[mb], mb_mask, cfg.cliprange_value)
                loss = pg + cfg.vf_coef * vf
                if not torch.isfinite(loss):
                    raise PPODivergence(
                        f"PPO diverged at iteration {it}: the loss is {loss.item()}. No policy was written. "
                        "Lower ppo.learning_rate."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                for k, v in zip(stats, (pg, vf, clipfrac, vf_clipfrac, approx_kl), strict=True):
                    stats[k].append(v.item())
                if cfg.max_approx_kl is not None and approx_kl.item() > cfg.max_approx_kl:
                    stop = True
                    break
            if stop:
                break
        t3 = time.perf_counter()

        # 4. adapt, log, checkpoint ------------------------------------------------------------
        beta = kl_ctl.value
        kl_ctl.update(kl_mean, len(batch))
        n_resp_tokens = mask.sum().item()
        row = {
            "ppo/score_mean": raw.mean().item(),
            "ppo/reward_mean": score.mean().item(),
            "ppo/reward_std": score.std().item(),
            "ppo/non_score_reward": non_score.sum(1).mean().item(),
            "ppo/kl": kl_mean,
            "ppo/kl_k3": (kl_k3(old_logprobs, ref_logprobs) * mask).sum(1).mean().item(),
            "ppo/beta": beta,
            "ppo/entropy": entropy,
            "ppo/policy_loss": _mean(stats["pg"]),
            "ppo/value_loss": _mean(stats["vf"]),
            "ppo/clipfrac": _mean(stats["clipfrac"]),
            "ppo/value_clipfrac": _mean(stats["vf_clipfrac"]),
            "ppo/approx_kl": _mean(stats["approx_kl"]),
            "ppo/epochs": float(epochs),
            "ppo/response_length": mask.sum(1).mean().item(),
            "ppo/eos_rate": ro.ended.float().mean().item(),
            "ppo/time_generate": t1 - t0,
            "ppo/time_score": t2 - t1,
            "ppo/time_train": t3 - t2,
            "ppo/tokens_per_second": smask.sum().item() / (t3 - t0),
            "ppo/generate_tokens_per_second": n_resp_tokens / (t1 - t0),
        }
        history.append(row)
        log_to_active_run(row, it + 1)
        bar.set_postfix(score=f"{row['ppo/score_mean']:.2f}", kl=f"{kl_mean:.2f}", beta=f"{beta:.3f}")
        if cfg.sample_every and (it + 1) % cfg.sample_every == 0:
            log_table_to_active_run(
                {
                    "iteration": [it + 1] * len(batch),
                    "prompt": batch,
                    "response": ro.texts,
                    "score": raw.tolist(),
                    "kl": kl_seq.tolist(),
                },
                f"ppo/samples/iter_{it + 1:04d}.json",
            )
        if (it + 1) % cfg.save_every == 0 and it + 1 < cfg.steps:
            checkpoint.save(ckpt_root, it + 1, fp, write_checkpoint)
    bar.close()

    metrics = dict(history[-1]) if history else {}
    metrics.update(evaluate(roles, eval_prompts[: cfg.eval_max_prompts], cfg, seed))
    metrics["ppo/resumed_from_iteration"] = float(start)
    log_to_active_run(metrics, cfg.steps)
    checkpoint.save(ckpt_root, cfg.steps, fp, write_checkpoint)
    return write_outputs(roles, final, metrics, history, cfg.merge)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def restore(ckpt: Path, roles: Roles) -> None:
    """The trainable adapters and the value head, in place, from a checkpoint."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in TRAINABLE:
        set_peft_model_state_dict(
            roles.model, load_file(str(ckpt / "adapters" / name / "adapter_model.safetensors")), adapter_name=name
        )
    head, _ = ScalarHead.load(ckpt / "value_head")
    roles.value_head.load_state_dict(head.state_dict())


@torch.no_grad()
def evaluate(roles: Roles, prompts: list[str], cfg: PPOConfig, seed: int) -> dict[str, float]:
    """Held-out eval prompts, one sample each with the same seed: the policy vs the reference (SFT)."""
    if not prompts:
        return {}
    out = {}
    for tag, ctx in (("", None), ("_ref", roles.model.disable_adapter)):
        torch.manual_seed(seed)
        if ctx is None:
            ro = sample(
                roles.model, roles.tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.max_prompt_tokens
            )
        else:
            with ctx():
                ro = sample(
                    roles.model,
                    roles.tok,
                    prompts,
                    cfg.max_new_tokens,
                    cfg.temperature,
                    cfg.top_p,
                    cfg.max_prompt_tokens,
                )
            activate(roles.model, "policy", TRAINABLE)
        raw, score = scores_for(roles, ro, prompts, cfg)
        mask = ro.response_mask.float()
        out[f"ppo/eval_score{tag}"] = raw.mean().item()
        out[f"ppo/eval_reward{tag}"] = score.mean().item()
        out[f"ppo/eval_response_length{tag}"] = mask.sum(1).mean().item()
        out[f"ppo/eval_eos_rate{tag}"] = ro.ended.float().mean().item()
        if ctx is None:
            logprobs = logprobs_of(
                policy_logits(roles, ro.sequence, ro.sequence_mask, ro.query.shape[1]), ro.response, cfg.temperature
            )
            out["ppo/eval_kl"] = (
                (kl_k1(logprobs, reference_logprobs(roles, ro, cfg.temperature)) * mask).sum(1).mean().item()
            )
    out["ppo/eval_prompts"] = float(len(prompts))
    return out


def write_outputs(
    roles: Roles, final: Path, metrics: dict[str, float], history: list[dict[str, float]], merge: bool
) -> PPOResult:
    """Everything to a tmp dir, then one rename: `final/` exists only for a finished, healthy run; then
    `COMPLETE.json` in its parent (the stage's out_dir) as the very last step."""
    tmp = final.with_name(".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    roles.model.save_pretrained(
        tmp, selected_adapters=sorted(TRAINABLE), safe_serialization=True
    )  # tmp/policy, tmp/value
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
