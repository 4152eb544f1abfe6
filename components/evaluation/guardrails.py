"""The canary's guardrails (Flagger-style): each window of the challenger's served answers against the champion's
answers of the same time (in shadow: of the same prompts). A failed window names its failed checks; after
`max_failed_windows` of them the challenger leaves traffic at once, without waiting for the sequential test's sample.
Pure: answers in, failures out.

    error rate      the challenger's share of failed answers, minus the champion's, at most max_error_rate_gain
    p95 latency     the challenger's, at most max_latency_ratio times the champion's
    degeneration    the gate's measures (components/evaluation/degeneration.py) against the champion's answers:
                    repeated-word share gain, distinct-2 ratio, length ratio
    reward          the champion's reward model scores both arms: the challenger's mean at most max_reward_drop below
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.evaluation.degeneration import degeneration


@dataclass(frozen=True)
class Answer:
    """One served answer, as the guardrails see it."""

    response: str  # "" for a failed answer
    latency_ms: float
    failed: bool = False
    reward: float | None = None  # the champion's reward model's score, when it scored it
    prompt: str = ""


def p95(values: list[float]) -> float:
    """The 95th percentile, nearest rank: 19 of the values 1..20 (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def measures(answers: list[Answer]) -> dict[str, float]:
    """A window's numbers for one arm: error_rate, p95_latency_ms, the degeneration measures, mean_reward."""
    ok = [a for a in answers if not a.failed]
    rewards = [a.reward for a in ok if a.reward is not None]
    return {
        "answers": float(len(answers)),
        "error_rate": (len(answers) - len(ok)) / len(answers) if answers else 0.0,
        "p95_latency_ms": p95([a.latency_ms for a in ok]),
        **degeneration([a.response for a in ok]),
        **({"mean_reward": sum(rewards) / len(rewards)} if rewards else {}),
    }


@dataclass(frozen=True)
class Limits:
    """CanaryConfig's guardrail settings (None: the check is off)."""

    max_error_rate_gain: float = 0.02
    max_latency_ratio: float | None = 1.5
    latency_floor_ms: float = 50.0  # a p95 this much above the champion's at least fails: sub-ms noise never does
    max_repeated_word_gain: float | None = 0.05
    min_distinct_2_ratio: float | None = 0.9
    max_length_ratio: float | None = 2.0
    min_length_ratio: float | None = 0.5
    max_reward_drop: float | None = 0.5

    @classmethod
    def of(cls, canary) -> Limits:
        return cls(**{name: getattr(canary, name) for name in cls.__dataclass_fields__ if hasattr(canary, name)})


def check(challenger: list[Answer], champion: list[Answer], limits: Limits) -> list[str]:
    """The failed checks of one window, each a phrase naming the measure and both arms' values; [] = passed."""
    c, b = measures(challenger), measures(champion)
    failed = []
    if c["error_rate"] - b["error_rate"] > limits.max_error_rate_gain:
        failed.append(f"error rate {c['error_rate']:.3f} vs the champion's {b['error_rate']:.3f}")
    if limits.max_latency_ratio is not None and b["p95_latency_ms"] > 0:
        slow = c["p95_latency_ms"] > limits.max_latency_ratio * b["p95_latency_ms"]
        if slow and c["p95_latency_ms"] - b["p95_latency_ms"] > limits.latency_floor_ms:
            failed.append(
                f"p95 latency {c['p95_latency_ms']:.0f} ms vs the champion's {b['p95_latency_ms']:.0f} ms "
                f"(at most {limits.max_latency_ratio:g}x)"
            )
    if limits.max_repeated_word_gain is not None:
        if c["repeated_word_share"] - b["repeated_word_share"] > limits.max_repeated_word_gain:
            failed.append(
                f"repeated-word share {c['repeated_word_share']:.3f} vs the champion's {b['repeated_word_share']:.3f}"
            )
    if limits.min_distinct_2_ratio is not None and b["distinct_2"] > 0:
        if c["distinct_2"] < limits.min_distinct_2_ratio * b["distinct_2"]:
            failed.append(f"distinct-2 {c['distinct_2']:.3f} vs the champion's {b['distinct_2']:.3f}")
    if b["mean_words"] > 0:
        ratio = c["mean_words"] / b["mean_words"]
        if (limits.max_length_ratio is not None and ratio > limits.max_length_ratio) or (
            limits.min_length_ratio is not None and ratio < limits.min_length_ratio
        ):
            failed.append(f"mean length {c['mean_words']:.1f} words vs the champion's {b['mean_words']:.1f}")
    if limits.max_reward_drop is not None and "mean_reward" in c and "mean_reward" in b:
        if b["mean_reward"] - c["mean_reward"] > limits.max_reward_drop:
            failed.append(
                f"reward {c['mean_reward']:+.2f} vs the champion's {b['mean_reward']:+.2f} (the champion's reward model)"
            )
    return failed


@dataclass
class Guard:
    """Windows in order: `add` each window's verdict; `tripped` once max_failed_windows have failed."""

    max_failed_windows: int
    failures: list[tuple[int, list[str]]] = field(default_factory=list)  # (window number, failed checks)
    windows: int = 0

    def add(self, failed: list[str]) -> bool:
        self.windows += 1
        if failed:
            self.failures.append((self.windows, failed))
        return self.tripped

    @property
    def tripped(self) -> bool:
        return len(self.failures) >= self.max_failed_windows

    def reason(self) -> str:
        """One sentence: which windows failed and on what."""
        if not self.failures:
            return "no guardrail failed"
        parts = "; ".join(f"window {n}: {', '.join(f)}" for n, f in self.failures)
        return f"{len(self.failures)} of {self.windows} windows failed their guardrails ({parts})"


def windows(challenger: list[Answer], champion_by_time: list[tuple[float, Answer]], times: list[float], size: int):
    """Split the challenger's answers (served at `times`, in order) into full windows of `size`, each with the
    champion's answers served between the window's first and last: -> [(challenger answers, champion answers)]."""
    out = []
    for start in range(0, len(challenger) - size + 1, size):
        lo, hi = times[start], times[start + size - 1]
        out.append((challenger[start : start + size], [a for t, a in champion_by_time if lo <= t <= hi]))
    return out
