r"""The self-evaluation reward ("the survey trick"): a model scores a response by how likely it is to answer a
question about it positively, read from its next-token distribution; nothing is sampled.

    r(prompt, response) = P(positive | q) / (P(positive | q) + P(negative | q)),   q = template(prompt, response)
                        = sigmoid(logit_positive - logit_negative)           (the softmax's normaliser cancels)

From the essay "language models can do RL": a model that can judge can reward itself, and asking for the
probability of a verdict instead of sampling one gives a smooth score in (0, 1) from a single forward pass
(Kadavath et al. 2022, "Language models (mostly) know what they know", use P(True) the same way).

Use it as PPO's reward, alone or beside the reward model:

    rlhf run ppo.reward_fn=components.training.self_eval:SelfEvalReward ppo.use_reward_model=false \
        ppo.value_init=fresh

Settings are `ppo.self_eval` (components.config.SelfEvalConfig): the judge (`reference`: the SFT model, i.e.
PPO's model with its adapters disabled, already in memory; or a local model dir), the question template
(`{prompt}` and `{response}` filled in), and the positive and negative answer tokens (each one token of the
judge's tokenizer). The judge must have learned to answer the question: the demo's base model has, from the
judgement texts in its pretraining corpus (components.data.readers.read_corpus_texts); a real instruction-tuned
model can be asked as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from components.config import ModelConfig, PPOConfig, SelfEvalConfig
from components.models.generation import left_pad
from components.models.roles import REFERENCE, position_ids

# ---------------------------------------------------------------------------- pure functions


def verdict_probability(logits: torch.Tensor, positive_id: int, negative_id: int) -> torch.Tensor:
    """P(positive) / (P(positive) + P(negative)) under softmax(logits): [B, V] -> [B].

    logits [[2, 0, 1]], positive 0, negative 2 -> e^2 / (e^2 + e^1) = sigmoid(1) = 0.7310586
    """
    return torch.sigmoid(logits[:, positive_id].float() - logits[:, negative_id].float())


def fill(template: str, prompts: list[str], responses: list[str]) -> list[str]:
    """The question about each (prompt, response): the template with {prompt} and {response} filled in."""
    return [template.replace("{prompt}", p).replace("{response}", r) for p, r in zip(prompts, responses, strict=True)]


def verdict_token_ids(tok, cfg: SelfEvalConfig) -> tuple[int, int]:
    """The token ids of the positive and negative answers; a ValueError when either is not exactly one token."""
    ids = {}
    for name, text in (("positive", cfg.positive), ("negative", cfg.negative)):
        pieces = tok(text, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = [tok.decode([i]) for i in pieces]
            raise ValueError(
                f"ppo.self_eval.{name}={text!r} is {len(pieces)} tokens of the judge's tokenizer ({shown}), not one: "
                f"the reward reads the probability of one next token. Use a word the tokenizer has as a single "
                f"token (with its leading space where the template ends before it, e.g. ' yes'), or another judge."
            )
        ids[name] = pieces[0]
    if ids["positive"] == ids["negative"]:
        raise ValueError(f"ppo.self_eval.positive and negative are the same token ({cfg.positive!r}): make them differ")
    return ids["positive"], ids["negative"]


# ---------------------------------------------------------------------------- the judge


@torch.no_grad()
def judge_probabilities(model, tok, texts: list[str], ids: tuple[int, int], batch_size: int, max_length: int):
    """The verdict probability of each text, read at its last token (left padding, positions from the mask;
    an over-long text keeps its end, where the question is): -> [N] float tensor on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout in a reward
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = [tok(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts[i : i + batch_size]]
            input_ids, mask = left_pad(chunk, tok.pad_token_id, device)  # [b, T]
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            out.append(verdict_probability(logits.logits[:, -1], *ids))  # [b]: the last column is each last token
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)


class SelfEvalReward:
    """A reward callable f(prompts, responses) -> list[float] in (0, 1): the judge's P(positive verdict).

    `ppo.reward_fn=components.training.self_eval:SelfEvalReward`: PPO builds it with `build` (the judge
    `reference` then runs on PPO's own model with its adapters disabled). Elsewhere: `SelfEvalReward(cfg,
    model, tok)` with any causal LM and its tokenizer."""

    def __init__(
        self,
        cfg: SelfEvalConfig,
        model,
        tok,
        active: Callable[[], AbstractContextManager] | None = None,
    ):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.ids = verdict_token_ids(tok, cfg)
        self.active = active or _as_is  # what to enter around a judgement (PPO: roles.use(REFERENCE))

    @classmethod
    def build(cls, cfg: PPOConfig, model_cfg: ModelConfig, roles) -> SelfEvalReward:
        """The reward for PPO: judge `reference` = PPO's model with its adapters disabled; else a model dir."""
        judge = cfg.self_eval.judge
        if judge == "reference":
            return cls(cfg.self_eval, roles.model, roles.tok, active=lambda: roles.use(REFERENCE))
        from components.models.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(judge, model_cfg, next(roles.model.parameters()).device)
        return cls(cfg.self_eval, model.eval(), load_tokenizer(judge, model_cfg, padding_side="left"))

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = fill(self.cfg.template, prompts, responses)
        with self.active():
            p = judge_probabilities(self.model, self.tok, texts, self.ids, self.cfg.batch_size, self.cfg.max_length)
        return p.tolist()


@contextmanager
def _as_is() -> Iterator[None]:
    yield
