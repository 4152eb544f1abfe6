"""Evaluation on the frozen eval prompts: each policy samples responses (same seed), and one scorer
- this run's reward model and SFT reference - measures them all.

Per policy: mean reward (RM score normalised with the RM's statistics; with an ensemble RM, also its members' mean
disagreement on the policy's answers), the independent judge's
mean (a callable by import path that is not the RM), KL to the SFT reference (nats per response;
only where the policy shares the reference's tokenizer), response length, EOS rate, and the degeneration measures
(components/evaluation/degeneration.py: repeated words and 3-grams, distinct-1/2, mean words) the gate's guard reads.
Between two policies: the RM win rate (ties count half).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.config import GateConfig, ModelConfig
from components.evaluation.degeneration import degeneration, distinct_n  # noqa: F401  (distinct_n: its old home)
from components.models.generation import sample
from components.models.loading import load_causal_lm, load_tokenizer
from components.models.roles import attach_reward_members, member_scores, position_ids, reward_members
from components.models.scoring import encode, kl_k1, load_reward_fn, logprobs_of


@dataclass(frozen=True)
class PolicySpec:
    name: str  # "sft", "candidate", "champion"
    base_dir: str  # the weights (an adapter, if any, sits on them)
    adapter_dir: str | None = None


@dataclass
class PolicyEval:
    metrics: dict[str, float]
    prompts: list[str]  # one per response (a prompt repeats with samples_per_prompt > 1)
    responses: list[str]
    rewards: list[float]


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where a's reward beats b's (ties count half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / max(1, len(a))


def paired_se(a: list[float], b: list[float]) -> float:
    """The standard error of mean(a) - mean(b) over paired samples (the same prompts): std(a - b) / sqrt(n).

    a = [1, 2, 3], b = [0, 2, 2]: differences 1, 0, 1, std (n - 1) = 0.5774, / sqrt(3) = 0.3333
    """
    import statistics

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0


def load_policy(spec: PolicySpec, model_cfg: ModelConfig):
    from peft import PeftModel

    model = load_causal_lm(spec.base_dir, model_cfg)
    if spec.adapter_dir:
        model = PeftModel.from_pretrained(model, spec.adapter_dir)
    return model.eval(), load_tokenizer(spec.adapter_dir or spec.base_dir, model_cfg, padding_side="left")


@torch.no_grad()
def evaluate_policies(
    specs: list[PolicySpec], sft_dir: str, reward_dir: str, prompts: list[str], cfg: GateConfig, model_cfg: ModelConfig
) -> dict[str, PolicyEval]:

    prompts = [p for p in prompts[: cfg.max_prompts] for _ in range(cfg.samples_per_prompt)]
    base = load_causal_lm(sft_dir, model_cfg)
    # one, or each member of an ensemble, on the SFT weights (its reference, adapters disabled)
    scorer, heads, scale = attach_reward_members(base, reward_members(reward_dir), ids_device(base))
    scorer.eval()
    scorer_tok = load_tokenizer(sft_dir, model_cfg, padding_side="right")
    judge = load_reward_fn(cfg.judge)
    out = {}
    for spec in specs:
        model, tok = load_policy(spec, model_cfg)
        torch.manual_seed(cfg.seed)  # generate samples from the global RNG (it takes no generator): same draws each
        ro = sample(model, tok, prompts, cfg.max_new_tokens, cfg.temperature)
        ids, mask = encode(scorer_tok, prompts, ro.texts, 2 * cfg.max_new_tokens + 64, ids_device(scorer))
        score, spread = scale.normalise(member_scores(scorer, heads, ids, mask))
        rewards = score.tolist()
        rmask = ro.response_mask.float()
        metrics = {
            "reward_mean": sum(rewards) / len(rewards),
            **({"reward_disagreement": spread.mean().item()} if len(heads) > 1 else {}),
            "response_length": rmask.sum(1).mean().item(),
            "eos_rate": ro.ended.float().mean().item(),
            **degeneration(ro.texts),  # repeated words and n-grams, distinct-1/2, mean words: the guard's measures
            "kl": float("nan"),
        }
        if tok.get_vocab() == scorer_tok.get_vocab():  # same tokenizer: the KL to this run's reference is defined
            seq, smask, q = ro.sequence, ro.sequence_mask, ro.query.shape[1]
            lp = logprobs_of(
                model(input_ids=seq, attention_mask=smask, position_ids=position_ids(smask)).logits[:, q - 1 : -1],
                ro.response,
                cfg.temperature,
            )
            with scorer.disable_adapter():
                ref = logprobs_of(
                    scorer(input_ids=seq, attention_mask=smask, position_ids=position_ids(smask)).logits[:, q - 1 : -1],
                    ro.response,
                    cfg.temperature,
                )
            metrics["kl"] = (kl_k1(lp, ref) * rmask).sum(1).mean().item()
        if judge is not None:
            scores = [float(x) for x in judge(prompts, ro.texts)]
            metrics["judge_mean"] = sum(scores) / len(scores)
        out[spec.name] = PolicyEval(metrics, prompts, ro.texts, rewards)
        del model
    return out


def ids_device(model) -> torch.device:
    return next(model.parameters()).device


def generations_table(evals: dict[str, PolicyEval]) -> dict[str, list]:
    """Prompt, then each policy's response and reward, side by side (an MLflow table)."""
    first = next(iter(evals.values()))
    n = min(len(e.responses) for e in evals.values())
    table: dict[str, list] = {"prompt": first.prompts[:n]}
    for name, e in evals.items():
        table[f"{name}_response"] = e.responses[:n]
        table[f"{name}_reward"] = [round(r, 3) for r in e.rewards[:n]]
    return table
