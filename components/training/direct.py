"""DPO and KTO: direct alignment, a policy stage beside PPO that learns offline from the project's judgements.

No sampling and no reward model in the loss: the policy's LoRA is trained so that its implicit reward,
beta * log(pi(y|x) / pi_ref(y|x)), orders the responses as the people did. DPO (Rafailov et al. 2023) reads the
comparisons (data/preferences/), KTO (Ethayarajh et al. 2024) the thumbs up/down (data/feedback/), so a project
gets the method its data supports. The losses are `direct_math` (TRL's formulas, by hand-checked functions).

Entry: `train_direct(method, cfg, ppo_cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir, eval_fraction)`
-> DirectResult. `cfg` is `policy.dpo` or `policy.kto`; the LoRA settings and the held-out evaluation's sampling are
PPO's (`ppo.*`). The reward model (`reward_dir`) is used only after training, for the held-out RM reward every
policy stage reports.

Why not TRL's DPOTrainer / KTOTrainer (both would fit the loss):
  - a ranking of K responses is C(K,2) pairs weighted 1/C(K,2), so one ranking counts as one example, as in the
    reward model; DPOTrainer has no per-pair weight, and it encodes each pair's two sequences, 2 * C(K,2) forwards
    for a ranking, where this stage encodes each distinct response once (K forwards; `reward.index_comparisons`);
  - the roles on one base as every policy stage has them (`policy_run.build_policy_roles`: the reference is the adapters
    disabled, which TRL does too with peft, and the reward model a frozen adapter for the held-out evaluation),
    the same checkpoints and resume, the same held-out evaluation and PPO's output layout, so the flow caches,
    resumes, gates, registers and serves the result unchanged;
  - the rating rule: a feedback row's label is the thumbs, which the GX suite has already checked against its
    rating (above the middle of the range is up, below it down; the middle goes with either label).

One step reads top to bottom:
    1. batch     DPO: `batch_size` comparisons -> their distinct responses and the pairs between them;
                 KTO: `batch_size` feedback rows, and the same rows with each prompt given the previous row's
                 response (the mismatched pairs KTO's reference point z is estimated on)
    2. log-probs each response's summed log-prob under the policy (with gradient) and the reference (without),
                 dropout off in both (`disable_dropout`, as TRL)
    3. loss      DPO: the weighted mean of the pairs' losses (`policy.dpo.loss_type`); KTO: the rows' mean
    4. step      gradient clipping, AdamW
    5. log       `dpo/*` or `kto/*`: loss, accuracy and margin of the implicit reward, the chosen's and rejected's
                 log-ratios; a checkpoint every `save_every`
Then the held-out judgements (`<method>/eval_accuracy`, the implicit reward's), the held-out eval prompts
policy vs reference as PPO reports them (`<method>/eval_reward`, `eval_kl`, ...), and the outputs (`final/policy`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from components.config import DataConfig, DirectConfig, DPOConfig, KTOConfig, ModelConfig, PPOConfig
from components.data.readers import Feedback, Pair, read_feedback, read_preferences, read_prompts
from components.models.chat import prompt_and_response, render_prompt
from components.models.generation import Rollout, left_pad
from components.models.roles import REFERENCE
from components.models.scoring import logprobs_of
from components.training import checkpoint
from components.training.callbacks import log_to_active_run
from components.training.direct_math import (
    DPO_LOSSES,
    dpo_pair_losses,
    kto_losses,
    kto_reference_point,
    sequence_logprob,
    weighted_mean,
)
from components.training.policy_run import start_policy_run, write_policy_outputs
from components.training.ppo import (
    PPODivergence,
    evaluate_policy_vs_reference,
    policy_logits,
)
from components.training.reward import binary_auc, index_comparisons

METHODS = {"dpo": "comparisons (data/preferences/)", "kto": "thumbs up/down (data/feedback/)"}


@dataclass
class DirectResult:
    policy_dir: str  # peft adapter "policy" on the SFT weights (+ tokenizer): PPO's layout
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # <method>/* per step


def check_config(method: str, cfg: DirectConfig) -> None:
    """Refuse settings that cannot work, before any model loads."""
    if method not in METHODS:
        raise ValueError(f"policy.algorithm={method!r}: expected one of {', '.join(METHODS)}")
    # KTO's reference point z reads each row's prompt with the previous row's response (`feedback_logratios`): in a
    # batch of one that is the row itself, and z would be the very log-ratio it is the baseline of
    kto = isinstance(cfg, KTOConfig)
    batch_rule = "at least 2 (KTO's reference point pairs each prompt with another row's response)" if kto else ""
    checks: list[tuple[str, object, bool, str]] = [
        ("steps", cfg.steps, cfg.steps >= 1, "at least 1"),
        ("batch_size", cfg.batch_size, cfg.batch_size >= (2 if kto else 1), batch_rule or "at least 1"),
        ("max_epochs", cfg.max_epochs, cfg.max_epochs > 0, "above 0"),
        ("learning_rate", cfg.learning_rate, cfg.learning_rate > 0, "above 0"),
        ("beta", cfg.beta, cfg.beta > 0, "above 0"),
        ("max_response_tokens", cfg.max_response_tokens, cfg.max_response_tokens >= 2, "at least 2"),
        ("save_every", cfg.save_every, cfg.save_every >= 1, "at least 1"),
    ]
    if isinstance(cfg, DPOConfig):
        checks += [
            ("loss_type", cfg.loss_type, cfg.loss_type in DPO_LOSSES, f"one of {', '.join(DPO_LOSSES)}"),
            ("label_smoothing", cfg.label_smoothing, 0 <= cfg.label_smoothing < 0.5, "in [0, 0.5)"),
        ]
    if isinstance(cfg, KTOConfig):
        checks += [
            ("desirable_weight", cfg.desirable_weight, cfg.desirable_weight > 0, "above 0"),
            ("undesirable_weight", cfg.undesirable_weight, cfg.undesirable_weight > 0, "above 0"),
        ]
    problems = [f"policy.{method}.{name} must be {rule}, got {value!r}" for name, value, ok, rule in checks if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def data_problem(method: str, rows: dict[str, int]) -> str | None:
    """Why a data version cannot train `method`, in one sentence that names the method it can train; None when it
    can. `rows`: rows per frame as validation counts them ("preferences_pairwise", "preferences_ranked", "feedback",
    ...). Checked before any model loads.

    ("kto", {"preferences_pairwise": 100}) -> "policy=kto trains on thumbs up/down (data/feedback/) and this data
    version has 0 such rows: ingest some with `rlhf ingest FILE --kind feedback`, or use policy=dpo, ..."
    """
    if method not in METHODS:
        return None
    count = {k: sum(n for frame, n in rows.items() if frame.startswith(k)) for k in ("preferences", "feedback")}
    kind, other = ("preferences", "feedback") if method == "dpo" else ("feedback", "preferences")
    if count[kind] >= 2:
        return None
    alternative = {"preferences": "policy=dpo", "feedback": "policy=kto"}[other]
    return (
        f"policy={method} trains on {METHODS[method]} and this data version has {count[kind]} such rows: "
        f"ingest some with `rlhf ingest FILE --kind {kind}`"
        + (f", or use {alternative}, which trains on the {count[other]} rows it has" if count[other] >= 2 else "")
    )


# ---------------------------------------------------------------------------- steps 1-2


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout rate in `model` set to 0, as TRL's DPO and KTO trainers do (`disable_dropout=True`): each
    log-ratio is the difference of two forwards, the policy's and the reference's, and dropout would draw a different
    mask in each, so the implicit reward the loss reads would be noise on top of the model's. The model stays in
    training mode (gradient checkpointing runs only there). nn.Dropout covers LoRA's `lora.dropout` and GPT-2's
    layers; Llama-style attention instead reads a float `attention_dropout` in training mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 (a plain float attribute, not a submodule)


def planned_steps(cfg: DirectConfig, n_train: int) -> int:
    """`steps`, but at most `max_epochs` passes over the n_train judgements: (200, 10, 90 examples, 16) -> 57."""
    return max(1, min(cfg.steps, math.ceil(cfg.max_epochs * n_train / cfg.batch_size)))


def device_of(roles) -> torch.device:
    return next(roles.model.parameters()).device


def encode_responses(
    tok, prompts: list[str], responses: list[str], max_prompt_tokens: int, max_response_tokens: int, device
) -> Rollout:
    """(prompt, response) texts as PPO's rollouts hold them: the prompt's ids as generation encodes them, left-padded
    (the end of an over-long prompt kept), then the response's ids + EOS, right-padded, cut at max_response_tokens
    (a cut response has no EOS). The response's ids are those of prompt + response after the prompt's, as SFT's
    completion-only loss splits them (TRL). -> Rollout, (B, Tq) and (B, Tr)."""
    queries, answers = [], []
    for p, r in zip(prompts, responses, strict=True):
        prompt_ids = tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]
        full = tok(prompt_and_response(tok, p, r), add_special_tokens=False)["input_ids"]
        answer = full[len(prompt_ids) :] + [tok.eos_token_id]
        queries.append(prompt_ids[-max_prompt_tokens:] or [tok.eos_token_id])
        answers.append(answer[:max_response_tokens])
    query, qmask = left_pad(queries, tok.pad_token_id, device)
    T = max(len(a) for a in answers)
    response = torch.full((len(answers), T), tok.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(answers), T), dtype=torch.long)
    for i, a in enumerate(answers):
        response[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        rmask[i, : len(a)] = 1
    ended = torch.tensor([a[-1] == tok.eos_token_id for a in answers])
    return Rollout(query, qmask, response.to(device), rmask.to(device), ended.to(device), list(responses))


def logratios(roles, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each response's log-ratio to the reference, log pi(y|x) - log pi_ref(y|x) (the policy's term with gradient
    when autograd is on), and its token count: -> (B,), (B,)."""
    q_len, mask = ro.query.shape[1], ro.response_mask.float()
    policy = sequence_logprob(
        logprobs_of(policy_logits(roles, ro.sequence, ro.sequence_mask, q_len), ro.response), mask
    )
    with torch.no_grad(), roles.use(REFERENCE):
        ref_logits = policy_logits(roles, ro.sequence, ro.sequence_mask, q_len)
        reference = sequence_logprob(logprobs_of(ref_logits, ro.response), mask)
    if not torch.isfinite(policy).all():
        raise PPODivergence("the policy's log-probs contain NaN/inf: no policy was written; lower the learning rate")
    return policy - reference, mask.sum(1)


def feedback_logratios(roles, rows: list[Feedback], cfg: DirectConfig, ppo_cfg: PPOConfig):
    """KTO's log-ratios of feedback rows (B,) and, without gradient, of the mismatched pairs (B,) its reference point
    is estimated on: each prompt with the previous row's response (TRL's shift by one)."""
    prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    tok, device = roles.tok, device_of(roles)
    lengths = (ppo_cfg.max_prompt_tokens, cfg.max_response_tokens)
    ratio, _ = logratios(roles, encode_responses(tok, prompts, responses, *lengths, device))
    with torch.no_grad():
        mismatched, _ = logratios(
            roles, encode_responses(tok, prompts, responses[-1:] + responses[:-1], *lengths, device)
        )
    return ratio, mismatched


# ---------------------------------------------------------------------------- step 3: each method's batch loss


def dpo_batch(roles, examples: list[list[Pair]], cfg: DirectConfig, ppo_cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """The weighted DPO loss of a batch of comparisons, each distinct response encoded once, and its measures."""
    assert isinstance(cfg, DPOConfig)
    c = index_comparisons(examples)
    ro = encode_responses(
        roles.tok, c.prompts, c.responses, ppo_cfg.max_prompt_tokens, cfg.max_response_tokens, device_of(roles)
    )
    ratio, tokens = logratios(roles, ro)  # (S,)
    ch, rj, w = c.chosen.to(ratio.device), c.rejected.to(ratio.device), c.weights.to(ratio.device)
    losses = dpo_pair_losses(ratio[ch], ratio[rj], cfg.beta, cfg.loss_type, cfg.label_smoothing, tokens[ch], tokens[rj])
    margin = (cfg.beta * (ratio[ch] - ratio[rj])).detach()
    return weighted_mean(losses, w), {
        "accuracy": weighted_mean(((margin > 0).float() + 0.5 * (margin == 0).float()), w).item(),
        "margin": weighted_mean(margin, w).item(),
        "chosen_logratio": weighted_mean(ratio[ch].detach(), w).item(),
        "rejected_logratio": weighted_mean(ratio[rj].detach(), w).item(),
    }


def kto_batch(roles, rows: list[Feedback], cfg: DirectConfig, ppo_cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """The KTO loss of a batch of feedback rows, its reference point z from the mismatched pairs, and measures."""
    assert isinstance(cfg, KTOConfig)
    ratio, mismatched = feedback_logratios(roles, rows, cfg, ppo_cfg)  # (B,), (B,)
    z = kto_reference_point(mismatched)
    up = torch.tensor([r.label == 1 for r in rows], device=ratio.device)
    losses = kto_losses(ratio, up, z, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    implicit = (cfg.beta * (ratio - z)).detach()
    nan = torch.tensor(float("nan"))
    return losses.mean(), {
        "accuracy": ((implicit > 0) == up).float().mean().item(),
        "z": z.item(),
        "chosen_logratio": ratio[up].detach().mean().item() if up.any() else nan.item(),
        "rejected_logratio": ratio[~up].detach().mean().item() if (~up).any() else nan.item(),
    }


def eval_batches(evals: list, batch_size: int) -> list[list]:
    """The held-out judgements in batches of `batch_size`, a last batch of one joined to the one before: a KTO batch
    of one row would pair its prompt with its own response for the reference point. 9 rows by 4 -> 4, 5."""
    parts = [evals[i : i + batch_size] for i in range(0, len(evals), batch_size)]
    if len(parts) > 1 and len(parts[-1]) == 1:
        last = parts.pop()
        parts[-1] = parts[-1] + last
    return parts


@torch.no_grad()
def held_out(roles, method: str, evals: list, cfg: DirectConfig, ppo_cfg: PPOConfig) -> dict[str, float]:
    """The implicit reward on held-out judgements: DPO, the weighted share of pairs it orders as the people did and
    the mean margin; KTO, its AUC against the thumbs and the accuracy of its side of z."""
    roles.model.eval()
    evals = evals[: cfg.eval_max_examples]
    out: dict[str, float] = {f"{method}/eval_examples": float(len(evals))}
    if not evals:
        return out
    parts = eval_batches(evals, cfg.batch_size)
    if method == "dpo":
        stats = [(dpo_batch(roles, part, cfg, ppo_cfg)[1], len(part)) for part in parts]
        for key in ("accuracy", "margin"):
            out[f"dpo/eval_{key}"] = sum(s[key] * n for s, n in stats) / len(evals)
        return out
    pieces = [feedback_logratios(roles, p, cfg, ppo_cfg) for p in parts]
    ratio, mismatched = torch.cat([r for r, _ in pieces]), torch.cat([m for _, m in pieces])
    labels = torch.tensor([r.label for r in evals], device=ratio.device)
    out["kto/eval_auc"] = binary_auc(ratio, labels)
    out["kto/eval_accuracy"] = ((ratio > kto_reference_point(mismatched)).long() == labels).float().mean().item()
    return out


# ---------------------------------------------------------------------------- stage


def train_direct(
    method: str,
    cfg: DirectConfig,
    ppo_cfg: PPOConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    reward_dir: str | None,
    data_dir: Path,
    out_dir: Path,
    eval_fraction: float = 0.1,
    seed: int = 0,
    data_cfg: DataConfig | None = None,
    warm_from: str | None = None,
) -> DirectResult:
    checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
    check_config(method, cfg)
    data_cfg = data_cfg or DataConfig()
    train: list[Any]  # DPO: comparisons (lists of weighted pairs); KTO: feedback rows
    evals: list[Any]
    if method == "dpo":
        train, evals = read_preferences(data_dir, eval_fraction)
    else:
        train, evals = read_feedback(data_dir, eval_fraction, data_cfg.min_rating, data_cfg.max_rating)
    if len(train) < (need := 2 if method == "kto" else 1):  # KTO: a batch of one row has no mismatched pair
        raise ValueError(
            f"policy={method} trains on {METHODS[method]}, and {data_dir} has {len(train) or 'none'} for training "
            f"(at least {need})"
        )
    steps = planned_steps(cfg, len(train))
    eval_prompts = read_prompts(data_dir, "eval")
    run = start_policy_run(
        {method: asdict(cfg)}, ppo_cfg, model_cfg, sft_dir, reward_dir, data_dir, out_dir, seed, warm_from,
        cfg.learning_rate, {"n_train": len(train)}, prepare=lambda roles: disable_dropout(roles.model),
    )  # fmt: skip
    roles, params, optimizer, final, checkpoints = run.roles, run.params, run.optimizer, run.final, run.checkpoints
    assert optimizer is not None  # a learning rate was given
    start, history = run.start, run.history
    ns = method

    batch_loss = dpo_batch if method == "dpo" else kto_batch
    roles.model.train()
    bar = tqdm(range(start, steps), desc=method.upper(), initial=start, total=steps, unit="step")
    for step in bar:
        torch.manual_seed(seed * 100_003 + step)  # any draw a step makes: the same on resume
        t0 = time.perf_counter()
        # 1-3. batch, log-probs, loss --------------------------------------------------------------
        batch: list[Any] = [train[i] for i in checkpoint.batch_for_step(len(train), cfg.batch_size, step, seed)]
        loss, stats = batch_loss(roles, batch, cfg, ppo_cfg)
        if not torch.isfinite(loss):
            raise PPODivergence(f"the {method} loss is {loss.item()}: no policy was written; lower the learning rate")
        # 4. step ----------------------------------------------------------------------------------
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        # 5. log, checkpoint -----------------------------------------------------------------------
        row = {f"{ns}/loss": loss.item(), **{f"{ns}/{k}": v for k, v in stats.items()}}
        row |= {f"{ns}/grad_norm": grad_norm.item(), f"{ns}/time_step": time.perf_counter() - t0}
        history.append(row)
        log_to_active_run(row, step + 1)
        bar.set_postfix(loss=f"{row[f'{ns}/loss']:.3f}", acc=f"{row[f'{ns}/accuracy']:.2f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            checkpoints.save(step + 1, history)
    bar.close()

    # 6. held-out judgements and prompts, then the outputs -----------------------------------------
    metrics = dict(history[-1]) if history else {}
    metrics[f"{ns}/train_seconds"] = sum(h[f"{ns}/time_step"] for h in history)
    metrics[f"{ns}/examples"] = float(steps * cfg.batch_size)
    metrics[f"{ns}/steps"] = float(steps)
    metrics.update(held_out(roles, method, evals, cfg, ppo_cfg))
    held = evaluate_policy_vs_reference(roles, eval_prompts[: ppo_cfg.eval_max_prompts], ppo_cfg, seed)
    metrics.update({key.replace("ppo/", f"{ns}/", 1): v for key, v in held.items()})
    metrics[f"{ns}/resumed_from_step"] = float(start)
    log_to_active_run(metrics, steps)
    checkpoints.save(steps, history)
    return DirectResult(write_policy_outputs(roles, final, method, metrics, history), metrics, history)
