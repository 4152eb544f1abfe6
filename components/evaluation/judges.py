"""Judges: callables `f(prompts, responses) -> list[float]`, referenced by import path in configs
(`ppo.reward_fn`, and the independent judge of evaluation).

`sentiment` is the demo's judge: the lexicon polarity of the response in [-1, 1]. It shares no
weights with the reward model (which only ever saw the annotator's noisy comparisons), so it is
an independent check that PPO learned the task rather than the reward model's quirks.
"""

from __future__ import annotations

from components.data.demo import lexicon_sentiment


def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    return [lexicon_sentiment(r) for r in responses]
