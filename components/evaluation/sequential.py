"""The canary's sequential test: is the challenger's thumbs-up rate above the champion's? Checked after every vote,
with a false-promotion rate that holds however often it is checked. Pure: votes in, verdict out.

The rule is testing by betting (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by betting",
JRSS-B 2023; Ramdas et al., "Game-theoretic statistics and safe anytime-valid inference", 2023):

- Votes are paired across arms as they arrive (`pair`): a challenger vote with the latest unpaired champion vote and
  the other way round. Which votes pair depends on arrival order only, never on their values. A pair's difference
  D = challenger - champion is -1, 0 or +1, and E[D] = d, the difference of the two thumbs-up rates.
- To promote, the null hypothesis d <= 0 is bet against: for a stake lambda in (0, 1), W_t = prod_k (1 + lambda D_k)
  is a nonnegative supermartingale under the null (E[1 + lambda D] = 1 + lambda d <= 1), so by Ville's inequality
  P(sup_t W_t >= 1/alpha) <= alpha. A mixture of such wealths over a fixed grid of stakes (`STAKES`, equal weights)
  is one too. The challenger is promoted the first time the mixture reaches 1/alpha: the false-promotion rate is at
  most alpha, checked after every vote, with no assumption but bounded votes whose mean difference is d.
- To retire, the null d >= delta (the minimum improvement worth promoting) is bet against the same way, with the
  factor 1 - lambda (D - delta): a challenger that is worse, or better by less than delta, is retired once that wealth
  reaches 1/futility_rate; one at least delta better is retired with probability at most futility_rate.

With fixed stakes a wealth depends on the counts of D = +1, 0, -1 only (`Pairs`), so every number here is closed
form and can be computed by hand (tests/evaluation/test_sequential.py).

Why not a package: `confseq` has this betting method, but ships as C++ source needing Boost and CMake to build (no
wheel for our Python); `savvi`'s anytime-valid tests are for multinomial cell probabilities and Gaussian linear
models, an approximation for thumbs. The mixture SPRT of Johari et al. (Optimizely) is valid only asymptotically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

CHAMPION, CHALLENGER = "champion", "challenger"
# the stakes the wealth is mixed over, with equal weights: a stake near 2d / Var(D) grows fastest for a true
# difference d, so halving from 0.8 covers differences from ~0.6 down to ~0.01 (the mixture costs log(len) nats)
STAKES = (0.8, 0.4, 0.2, 0.1, 0.05, 0.025)


@dataclass(frozen=True)
class Pairs:
    """Counts of the paired differences D = challenger - champion."""

    up: int = 0  # D = +1: the challenger's answer was liked, the champion's was not
    tie: int = 0  # D = 0
    down: int = 0  # D = -1

    @property
    def n(self) -> int:
        return self.up + self.tie + self.down

    @property
    def mean(self) -> float:
        """The estimated difference of the thumbs-up rates (0 with no pairs)."""
        return (self.up - self.down) / self.n if self.n else 0.0


class Pairing:
    """Pairs votes across arms as they arrive: each vote pairs with the latest unpaired vote of the other arm, if
    any, else waits. Which votes pair depends on arrival order only, never on their values."""

    def __init__(self):
        self.waiting: dict[str, list[bool]] = {CHAMPION: [], CHALLENGER: []}
        self.pairs = Pairs()

    def add(self, arm: str, value: bool) -> None:
        other = CHALLENGER if arm == CHAMPION else CHAMPION
        if not self.waiting[other]:
            self.waiting[arm].append(bool(value))
            return
        partner = self.waiting[other].pop()
        challenger, champion = (value, partner) if arm == CHALLENGER else (partner, value)
        d, p = int(bool(challenger)) - int(bool(champion)), self.pairs
        self.pairs = Pairs(p.up + (d == 1), p.tie + (d == 0), p.down + (d == -1))


def pair(votes: Iterable[tuple[str, bool]]) -> Pairs:
    """The pairs of time-ordered (arm, thumbs_up) votes: [("champion", True), ("challenger", False)] -> Pairs(down=1)."""
    pairing = Pairing()
    for arm, value in votes:
        pairing.add(arm, value)
    return pairing.pairs


def _log_mean_exp(logs: list[float]) -> float:
    top = max(logs)
    return top + math.log(sum(math.exp(x - top) for x in logs) / len(logs))


@lru_cache(maxsize=64)
def _factors(stakes: tuple[float, ...], delta: float | None) -> tuple[tuple[float, float, float], ...]:
    """Per stake, the log wealth factors of D = +1, 0, -1: betting on d > 0 (delta None), or on d < delta."""
    if delta is None:
        return tuple((math.log1p(s), 0.0, math.log1p(-s)) for s in stakes)
    return tuple((math.log1p(-s * (1 - delta)), math.log1p(s * delta), math.log1p(s * (1 + delta))) for s in stakes)


def _log_wealth(p: Pairs, factors: tuple[tuple[float, float, float], ...]) -> float:
    return _log_mean_exp([p.up * u + p.tie * t + p.down * d for u, t, d in factors])


def log_wealth_better(p: Pairs, stakes: tuple[float, ...] = STAKES) -> float:
    """log of the mixture wealth against d <= 0: mean over stakes l of (1 + l)^up (1 - l)^down."""
    return _log_wealth(p, _factors(stakes, None))


def log_wealth_not_worth(p: Pairs, delta: float, stakes: tuple[float, ...] = STAKES) -> float:
    """log of the mixture wealth against d >= delta: mean over stakes l of prod (1 - l (D - delta)), that is
    (1 - l (1 - delta))^up (1 + l delta)^tie (1 + l (1 + delta))^down."""
    return _log_wealth(p, _factors(stakes, delta))


def rate_interval(ups: int, n: int, alpha: float, stakes: tuple[float, ...] = STAKES) -> tuple[float, float]:
    """An anytime-valid (1 - alpha) interval for a thumbs-up rate from `ups` of `n` votes: the rates m that a
    two-sided mixture of bets on (vote - m) has not rejected at 1/alpha (grid of 0.001). (0, 1) with no votes."""
    threshold = math.log(1 / alpha)
    inside = []
    for i in range(1001):
        m = i / 1000
        logs = []
        for s in stakes:
            for lam in (s, -s):  # bets that the rate is above m, and below it
                a, b = 1 + lam * (1 - m), 1 - lam * m  # wealth factor of an up vote, of a down vote
                logs.append((ups * math.log(a) if ups else 0.0) + ((n - ups) * math.log(b) if n - ups else 0.0))
        if _log_mean_exp(logs) < threshold:
            inside.append(m)
    return (inside[0], inside[-1]) if inside else (ups / n, ups / n)


@dataclass(frozen=True)
class Rule:
    """The canary's decision rule (registry.canary: CanaryConfig holds the same settings)."""

    false_promotion_rate: float = 0.05  # alpha: P(promote | the challenger's rate is not above the champion's)
    futility_rate: float = 0.05  # P(retire | the challenger is at least min_improvement better)
    min_improvement: float = 0.02  # delta: the smallest rise of the thumbs-up rate worth promoting
    min_judged: int = 50  # judged answers of each arm before any verdict

    def __post_init__(self):
        for name in ("false_promotion_rate", "futility_rate"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"canary {name} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.min_improvement < 1:
            raise ValueError(f"canary min_improvement must be in [0, 1), got {self.min_improvement!r}")
        if self.min_judged < 1:
            raise ValueError(f"canary min_judged must be at least 1, got {self.min_judged!r}")


@dataclass(frozen=True)
class Decision:
    verdict: str  # "promote" | "retire" | "continue"
    reason: str  # one sentence
    pairs: Pairs
    judged: dict[str, int]  # judged answers per arm
    ups: dict[str, int]  # thumbs up per arm
    log_wealth_better: float  # against "not better": promote at log(1/false_promotion_rate)
    log_wealth_not_worth: float  # against "better by min_improvement": retire at log(1/futility_rate)

    def rate(self, arm: str) -> float:
        return self.ups[arm] / self.judged[arm] if self.judged[arm] else 0.0


class Canary:
    """The test, one vote at a time: `add` each judged answer's vote in arrival order, read `decision()` after any
    of them. The first verdict other than "continue" is final: the wealth may fall back later, the decision stands."""

    def __init__(self, rule: Rule):
        self.rule, self.pairing = rule, Pairing()
        self.judged = {CHAMPION: 0, CHALLENGER: 0}
        self.ups = {CHAMPION: 0, CHALLENGER: 0}
        self.final: Decision | None = None
        self.promote_at = math.log(1 / rule.false_promotion_rate)
        self.retire_at = math.log(1 / rule.futility_rate)

    def add(self, arm: str, value: bool) -> str:
        """Count one vote: -> the verdict so far ("promote", "retire" or "continue"; `decision()` says why)."""
        if self.final is not None:
            return self.final.verdict
        if arm not in self.judged:
            raise ValueError(f"arm must be {CHAMPION!r} or {CHALLENGER!r}, got {arm!r}")
        self.judged[arm] += 1
        self.ups[arm] += bool(value)
        before = self.pairing.pairs
        self.pairing.add(arm, value)
        if self.pairing.pairs is before or min(self.judged.values()) < self.rule.min_judged:
            return "continue"  # no new pair: the wealths are unchanged (a verdict waits for the next pair)
        p, rule = self.pairing.pairs, self.rule
        if log_wealth_better(p) >= self.promote_at or log_wealth_not_worth(p, rule.min_improvement) >= self.retire_at:
            return self.decision().verdict
        return "continue"

    def decision(self, deadline_passed: bool = False) -> Decision:
        if self.final is not None:
            return self.final
        rule, p = self.rule, self.pairing.pairs
        judged, ups = dict(self.judged), dict(self.ups)
        better, not_worth = log_wealth_better(p), log_wealth_not_worth(p, rule.min_improvement)

        def made(verdict: str, reason: str) -> Decision:
            return Decision(verdict, reason, p, judged, ups, better, not_worth)

        rates = (
            f"thumbs-up {ups[CHALLENGER]}/{judged[CHALLENGER]} for the challenger, {ups[CHAMPION]}/{judged[CHAMPION]} "
            f"for the champion, {p.n} pairs"
        )
        fewest = min(judged.values())
        decided = None
        if fewest >= rule.min_judged and better >= self.promote_at:
            decided = made(
                "promote",
                f"the challenger's thumbs-up rate is above the champion's ({rates}; evidence "
                f"{math.exp(better):.0f} >= {1 / rule.false_promotion_rate:g}, false-promotion rate "
                f"{rule.false_promotion_rate:g})",
            )
        elif fewest >= rule.min_judged and not_worth >= self.retire_at:
            decided = made(
                "retire",
                f"the challenger is not {rule.min_improvement:g} better than the champion ({rates}; evidence "
                f"{math.exp(not_worth):.0f} >= {1 / rule.futility_rate:g})",
            )
        elif deadline_passed:
            decided = made("retire", f"the deadline passed with no verdict ({rates})")
        if decided is not None:
            self.final = decided
            return decided
        if fewest < rule.min_judged:
            return made("continue", f"waiting for {rule.min_judged} judged answers per arm ({rates})")
        return made("continue", f"no verdict yet ({rates})")


def decide(votes: Iterable[tuple[str, bool]], rule: Rule, deadline_passed: bool = False) -> Decision:
    """The verdict on time-ordered (arm, thumbs_up) votes, checked after each of them (the first verdict stands):
    promote once the wealth against "not better" reaches 1/false_promotion_rate, retire once the wealth against
    "better by min_improvement" reaches 1/futility_rate (or at the deadline with neither), else continue. No verdict
    before each arm has min_judged votes."""
    canary = Canary(rule)
    for arm, value in votes:
        if canary.add(arm, value) != "continue":
            break
    return canary.decision(deadline_passed)


def z_test_promotes(votes: list[tuple[str, bool]], alpha: float, min_judged: int) -> bool:
    """The baseline the benchmark compares with: a fixed-horizon one-sided two-proportion z-test, checked after every
    vote (as a dashboard invites): True the first time it rejects "not better" at level alpha. Peeking inflates its
    false-promotion rate far above alpha."""
    z_crit = z_quantile(1 - alpha)
    n = {CHAMPION: 0, CHALLENGER: 0}
    u = {CHAMPION: 0, CHALLENGER: 0}
    for arm, value in votes:
        n[arm] += 1
        u[arm] += bool(value)
        if min(n.values()) < min_judged:
            continue
        pa, pb = u[CHAMPION] / n[CHAMPION], u[CHALLENGER] / n[CHALLENGER]
        pooled = (u[CHAMPION] + u[CHALLENGER]) / (n[CHAMPION] + n[CHALLENGER])
        se = math.sqrt(pooled * (1 - pooled) * (1 / n[CHAMPION] + 1 / n[CHALLENGER]))
        if se > 0 and (pb - pa) / se >= z_crit:
            return True
    return False


def z_quantile(q: float) -> float:
    """The standard normal quantile (bisection on erf; enough digits for a critical value)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
