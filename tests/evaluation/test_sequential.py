"""The canary's sequential test (components/evaluation/sequential.py): wealths computed by hand, the verdicts they
give, and small simulated streams that a broken rule fails (the full runs: benchmarks/canary.py)."""

import math
import random

import pytest

from components.evaluation.sequential import (
    CHALLENGER,
    CHAMPION,
    STAKES,
    Canary,
    Pairs,
    Rule,
    decide,
    log_wealth_better,
    log_wealth_not_worth,
    pair,
    rate_interval,
    z_test_promotes,
)


def test_pairs_a_vote_with_the_latest_unpaired_vote_of_the_other_arm():
    assert pair([(CHAMPION, True), (CHALLENGER, False)]) == Pairs(down=1)
    # two champion votes wait; the challenger's vote pairs with the later one (False): D = 1 - 0
    assert pair([(CHAMPION, True), (CHAMPION, False), (CHALLENGER, True)]) == Pairs(up=1)
    # then the next challenger vote pairs with the remaining champion vote (True): D = 1 - 1
    assert pair([(CHAMPION, True), (CHAMPION, False), (CHALLENGER, True), (CHALLENGER, True)]) == Pairs(up=1, tie=1)
    assert pair([(CHALLENGER, True), (CHALLENGER, True)]) == Pairs()  # one arm alone: nothing to compare
    assert Pairs(up=3, tie=1, down=1).mean == pytest.approx(0.4)


def test_wealths_by_hand():
    # one stake 0.5: (1 + 0.5)^3 (1 - 0.5)^1 = 1.6875; ties leave the wealth as it is
    assert math.exp(log_wealth_better(Pairs(up=3, tie=1, down=1), (0.5,))) == pytest.approx(1.6875)
    # a mixture is the mean of its stakes' wealths: (1.5 + 1.25) / 2
    assert math.exp(log_wealth_better(Pairs(up=1), (0.5, 0.25))) == pytest.approx(1.375)
    # against d >= 0.1 with stake 0.5: (1 - 0.5 * 0.9)(1 + 0.5 * 0.1)(1 + 0.5 * 1.1) = 0.55 * 1.05 * 1.55
    assert math.exp(log_wealth_not_worth(Pairs(1, 1, 1), 0.1, (0.5,))) == pytest.approx(0.895125)


def test_promotes_at_the_first_pair_whose_wealth_reaches_one_over_alpha():
    # every pair D = +1: the wealth after k pairs is the mean over the stakes of (1 + s)^k; by hand, 13.3 after 7
    # pairs and 22.3 after 8, so at alpha = 0.05 (1/alpha = 20) the 8th pair promotes
    assert sum((1 + s) ** 7 for s in STAKES) / len(STAKES) == pytest.approx(13.31, abs=0.01)
    assert sum((1 + s) ** 8 for s in STAKES) / len(STAKES) == pytest.approx(22.35, abs=0.01)
    canary = Canary(Rule(min_judged=1))
    verdicts = []
    for _ in range(8):
        canary.add(CHAMPION, False)
        verdicts.append(canary.add(CHALLENGER, True))
    assert verdicts == ["continue"] * 7 + ["promote"]
    d = canary.decision()
    assert d.judged == {CHAMPION: 8, CHALLENGER: 8} and d.ups == {CHAMPION: 0, CHALLENGER: 8}
    assert "above the champion's" in d.reason and "8 pairs" in d.reason
    # the verdict stands once made, whatever follows
    for _ in range(50):
        canary.add(CHALLENGER, False)
        canary.add(CHAMPION, True)
    assert canary.decision().verdict == "promote"


def test_waits_for_min_judged_and_retires_at_the_deadline():
    votes = [(CHAMPION, False), (CHALLENGER, True)] * 10  # would promote after 8 pairs
    assert decide(votes, Rule(min_judged=11)).verdict == "continue"
    assert "waiting for 11 judged answers per arm" in decide(votes, Rule(min_judged=11)).reason
    late = decide(votes, Rule(min_judged=11), deadline_passed=True)
    assert late.verdict == "retire" and "deadline" in late.reason


def test_retires_a_challenger_that_is_worse():
    d = decide([(CHAMPION, True), (CHALLENGER, False)] * 20, Rule(min_judged=1))
    assert d.verdict == "retire" and "not 0.02 better" in d.reason


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match="false_promotion_rate must be in"):
        Rule(false_promotion_rate=1.5)
    with pytest.raises(ValueError, match="min_judged"):
        Rule(min_judged=0)
    with pytest.raises(ValueError, match="arm must be"):
        Canary(Rule()).add("third", True)


def _stream(p_champion: float, p_challenger: float, share: float, seed: int):
    rng = random.Random(seed)
    while True:
        arm = CHALLENGER if rng.random() < share else CHAMPION
        yield arm, rng.random() < (p_challenger if arm == CHALLENGER else p_champion)


def _run(rule: Rule, rates: tuple[float, float], seed: int, most: int = 4000) -> tuple[str, int]:
    canary = Canary(rule)
    for i, (arm, up) in enumerate(_stream(*rates, 0.5, seed)):
        if (verdict := canary.add(arm, up)) != "continue" or i >= most:
            return verdict, canary.judged[CHALLENGER]
    raise AssertionError


def test_simulated_users_few_false_promotions_and_ten_points_decided():
    """80 A/A streams (equal rates 0.6): at most 9 promotions (the rate's 5% plus binomial noise: P(X >= 10) < 0.2%
    at 5%); a rule that peeks at a z-test promotes far more of the same streams. A challenger 10 points better is
    promoted, one 10 points worse retired, every time in 20 streams each."""
    rule = Rule(min_judged=50)
    promoted = sum(_run(rule, (0.6, 0.6), seed)[0] == "promote" for seed in range(80))
    assert promoted <= 9
    peeking = 0
    for seed in range(80):
        votes, stream = [], _stream(0.6, 0.6, 0.5, seed)
        votes = [next(stream) for _ in range(1500)]
        peeking += z_test_promotes(votes, 0.05, 50)
    assert peeking > 2 * max(promoted, 4)
    assert all(_run(rule, (0.6, 0.7), seed)[0] == "promote" for seed in range(20))
    assert all(_run(rule, (0.6, 0.5), seed)[0] == "retire" for seed in range(20))


def test_rate_interval_holds_the_rate_and_narrows():
    lo, hi = rate_interval(60, 100, 0.05)
    assert lo < 0.6 < hi and 0.25 < hi - lo < 0.4
    lo2, hi2 = rate_interval(600, 1000, 0.05)
    assert lo < lo2 < 0.6 < hi2 < hi
    assert rate_interval(0, 0, 0.05) == (0.0, 1.0)
