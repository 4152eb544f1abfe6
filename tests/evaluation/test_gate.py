"""The gate's verdicts and the evaluation metrics, on hand-made numbers."""

import pytest

from components.config import GateConfig
from components.evaluation.evaluate import distinct_n, win_rate
from components.evaluation.gate import decide

BASE = {"reward_mean": 0.10, "judge_mean": 0.05, "kl": 0.0}


def test_a_better_candidate_passes_with_every_number_logged():
    v = decide({"reward_mean": 0.40, "judge_mean": 0.20, "kl": 5.0}, BASE, 0.7, "sft", GateConfig())
    assert v.passed and v.reasons == []
    m = v.metrics()
    assert m["gate/reward_gain"] == pytest.approx(0.30) and m["gate/judge_gain"] == pytest.approx(0.15)
    assert m["gate/win_rate"] == 0.7 and m["gate/kl"] == 5.0 and m["gate/passed"] == 1.0
    assert "PASSED" in v.summary() and "vs sft" in v.summary()


def test_each_threshold_can_fail_the_candidate():
    cfg = GateConfig(min_reward_gain=0.1, min_win_rate=0.55, min_judge_gain=0.0, max_kl=10.0)
    good = {"reward_mean": 0.40, "judge_mean": 0.20, "kl": 5.0}
    assert decide(good, BASE, 0.6, "champion v1", cfg).passed
    assert decide({**good, "reward_mean": 0.15}, BASE, 0.6, "x", cfg).reasons == ["reward_gain 0.050 < 0.1"]
    assert decide(good, BASE, 0.5, "x", cfg).reasons == ["win_rate 0.500 < 0.55"]
    assert decide({**good, "kl": 12.0}, BASE, 0.6, "x", cfg).reasons == ["kl 12.000 > 10"]
    assert decide({**good, "judge_mean": 0.0}, BASE, 0.6, "x", cfg).reasons == ["judge_gain -0.050 < 0"]
    # the judge is optional
    assert decide(
        {**good, "judge_mean": 0.0}, BASE, 0.6, "x", GateConfig(min_judge_gain=None, min_win_rate=0.55)
    ).passed


def test_win_rate_and_distinct_n_hand_computed():
    assert win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 1.0, 2.0, 4.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    # "a b a b": unigrams a,b,a,b -> 2 distinct / 4; bigrams ab,ba,ab -> 2 / 3
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) == 0.0


def test_a_copy_of_the_champion_is_not_promoted_again_by_default():
    # the same policy evaluated twice: equal means, every prompt a tie -> win rate exactly 0.5
    v = decide(dict(BASE, kl=2.0), BASE, 0.5, "champion v1", GateConfig())
    assert not v.passed and v.reasons == ["win_rate 0.500 < 0.52"]
