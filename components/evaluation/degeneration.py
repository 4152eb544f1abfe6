"""Degeneration measures of a set of answers: what a policy can buy reward with while its quality falls (reward
hacking). Pure functions of the texts; words are whitespace-split, compared ignoring case.

    repeated_word_share   share of answers with a word repeated back to back ("worth every every penny");
                          `repeats_a_word` for one answer (what ppo.repeated_word_penalty charges)
    repeated_ngram_share  share of answers in which some word n-gram (n = 3) occurs twice
    distinct_n            distinct word n-grams / all word n-grams over all answers (diversity; 1.0 = no repeats)
    mean_words            mean answer length in words (the length ratio to a baseline comes from it)

`degeneration(texts)` -> all of them, as the evaluation logs them and the gate reads them (`components/evaluation/
gate.py`: candidate against the SFT policy, so a drift that each generation of champions inherits is still caught).
"""

from __future__ import annotations

import re

_REPEATED_WORD = re.compile(r"\b(\w+)\s+\1\b", re.IGNORECASE)


def repeats_a_word(text: str) -> bool:
    """Whether a word is repeated back to back: "worth every every penny" -> True, "a b a" -> False."""
    return _REPEATED_WORD.search(text) is not None


def repeated_word_share(texts: list[str]) -> float:
    """["a a b", "a b", "The the"] -> 2/3 (0 for no answers)."""
    return sum(1 for t in texts if repeats_a_word(t)) / len(texts) if texts else 0.0


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(texts: list[str], n: int = 3) -> float:
    """Share of answers in which a word n-gram occurs twice: ["a b c a b c", "a b c d"] -> 1/2 (n = 3)."""
    if not texts:
        return 0.0
    repeated = 0
    for t in texts:
        grams = _ngrams(t.lower().split(), n)
        repeated += len(set(grams)) < len(grams)
    return repeated / len(texts)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over the answers: ["a b", "a b"] -> 1/2 for n = 2 (0 with none)."""
    grams = [g for t in texts for g in _ngrams(t.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degeneration(texts: list[str]) -> dict[str, float]:
    """Every measure of the answers, under the names the evaluation logs (`eval/<policy>/<name>`)."""
    return {
        "repeated_word_share": repeated_word_share(texts),
        "repeated_3gram_share": repeated_ngram_share(texts, 3),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_words": sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0,
    }
