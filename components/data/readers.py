"""What each stage reads from a data version: the rows of one kind, shaped for that stage.

    read_prompts(data_dir, kind)                 PPO rollout prompts ("prompts") or frozen eval prompts ("eval")
    read_demonstrations(data_dir, eval_fraction) SFT prompt/completion examples, split train / held out by id
    read_preferences(data_dir, eval_fraction)    reward-model examples: lists of weighted pairs, split by id
    read_feedback(data_dir, eval_fraction, *range) reward-model thumbs up/down rows with their targets, split by id
    read_corpus_texts(data_dir)                  pretraining texts for the demo base model

A ranking of K responses (best first) becomes its C(K,2) ordered pairs, each weighted 1/C(K,2), so
one ranking counts as one example (InstructGPT, Ouyang et al. 2022, sec. 3.5): `ranking_to_pairs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components.data.schemas import held_out, read_jsonl, shard_files

# The kinds the demo base model pretrains on. Not the demonstrations (what SFT teaches), never the eval prompts.
PRETRAIN_KINDS = ("preferences", "prompts")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    weight: float  # 1 for a pairwise example, 1/C(K,2) for a pair from a ranking of K


def ranking_to_pairs(responses: list[str]) -> list[tuple[str, str, float]]:
    """Best-first ranking of K responses -> C(K,2) (better, worse, weight) with weights summing to 1.

    ["a", "b", "c"] -> [("a","b",1/3), ("a","c",1/3), ("b","c",1/3)]
    """
    k = len(responses)
    if k < 2:
        return []
    w = 1.0 / math.comb(k, 2)
    return [(responses[i], responses[j], w) for i in range(k) for j in range(i + 1, k)]


def read_prompts(data_dir: Path, kind: str) -> list[str]:
    """The prompts of `kind` ("prompts" or "eval"), in shard order."""
    return [row["prompt"] for shard in shard_files(data_dir / kind) for _, row in read_jsonl(shard, kind).rows]


def read_demonstrations(data_dir: Path, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Demonstrations as {"prompt", "completion"} (completion = " " + response), split train / held out by id."""
    train: list[dict] = []
    evals: list[dict] = []
    for shard in shard_files(data_dir / "demonstrations"):
        for _, row in read_jsonl(shard, "demonstrations").rows:
            ex = {"prompt": row["prompt"], "completion": " " + row["response"]}
            (evals if held_out(row["id"], eval_fraction) else train).append(ex)
    return train, evals


def read_preferences(
    data_dir: Path, eval_fraction: float, shards: Callable[[str], bool] = lambda _: True
) -> tuple[list[list[Pair]], list[list[Pair]]]:
    """Preference rows as lists of pairs (one list per example), split train / held out by id; of the shards whose
    `preferences/<name>` `shards` keeps (an incremental retrain's new ones, or its earlier ones)."""
    train: list[list[Pair]] = []
    evals: list[list[Pair]] = []
    for shard in shard_files(data_dir / "preferences"):
        if not shards(f"preferences/{shard.name}"):
            continue
        for _, row in read_jsonl(shard, "preferences").rows:
            if "responses" in row:
                triples = ranking_to_pairs(row["responses"])
            else:
                triples = [(row["chosen"], row["rejected"], 1.0)]
            pairs = [Pair(row["prompt"], c, r, w) for c, r, w in triples]
            (evals if held_out(row["id"], eval_fraction) else train).append(pairs)
    return train, evals


@dataclass(frozen=True)
class Feedback:
    prompt: str
    response: str
    label: int  # 1: thumbs up, 0: thumbs down
    target: (
        float  # what the reward model's logistic loss fits: the rating rescaled to [0, 1] when given, else the label
    )


def feedback_target(row: dict, min_rating: float, max_rating: float) -> float:
    """The soft target of a feedback row: (rating - min) / (max - min) when it has a rating, else its label.

    {"label": 1} -> 1.0; {"label": 1, "rating": 4} with range 1..5 -> 0.75
    """
    rating = row.get("rating")
    if rating is None:
        return float(row["label"])
    return (float(rating) - min_rating) / (max_rating - min_rating)


def read_feedback(
    data_dir: Path,
    eval_fraction: float,
    min_rating: float,
    max_rating: float,
    shards: Callable[[str], bool] = lambda _: True,
) -> tuple[list[Feedback], list[Feedback]]:
    """Feedback rows (thumbs up/down on a response), split train / held out by id; none when there are none. Of the
    shards `shards` keeps, as read_preferences."""
    train: list[Feedback] = []
    evals: list[Feedback] = []
    for shard in shard_files(data_dir / "feedback"):
        if not shards(f"feedback/{shard.name}"):
            continue
        for _, row in read_jsonl(shard, "feedback").rows:
            fb = Feedback(
                row["prompt"], row["response"], int(row["label"]), feedback_target(row, min_rating, max_rating)
            )
            (evals if held_out(row["id"], eval_fraction) else train).append(fb)
    return train, evals


def read_corpus_texts(data_dir: Path) -> list[str]:
    """Prompt + continuation texts for pretraining: preferences (all sentiments, some disfluent) and
    prompts. Not the demonstrations - those are what SFT teaches - and never the eval prompts.
    Then the feedback rows as judgement texts: the self-evaluation question about the response, answered with
    its thumbs (SelfEvalConfig's template, " yes" for up, " no" for down), so that the demo's tiny model learns
    to answer the question the self-evaluation reward asks (components/training/self_eval.py)."""
    from components.config import SelfEvalConfig

    texts: list[str] = []
    for kind in PRETRAIN_KINDS:
        for shard in shard_files(data_dir / kind):
            for _, row in read_jsonl(shard, kind).rows:
                prompt = row.get("prompt", "")
                outs = [row.get("chosen"), row.get("rejected"), *(row.get("responses") or [])]
                outs = [o for o in outs if isinstance(o, str)]
                if outs:
                    texts.extend(f"{prompt} {o}" for o in outs)
                else:  # a PPO prompt on its own
                    texts.append(prompt)
    judge = SelfEvalConfig()
    for shard in shard_files(data_dir / "feedback"):
        for _, row in read_jsonl(shard, "feedback").rows:
            question = judge.template.replace("{prompt}", row["prompt"]).replace("{response}", row["response"])
            texts.append(question + (judge.positive if row["label"] == 1 else judge.negative))
    return texts
