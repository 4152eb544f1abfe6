"""The gate's verdicts, its reward-hacking guard and the evaluation's measures, on hand-made numbers."""

import pytest

from components.config import GateConfig
from components.evaluation.degeneration import degeneration, distinct_n, repeated_ngram_share, repeated_word_share
from components.evaluation.evaluate import win_rate
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


def test_the_degeneration_measures_by_hand():
    texts = ["Worth every every penny", "worth it", "The the best", "a b c a b c"]
    assert repeated_word_share(texts) == 0.5, "case is ignored: 'The the'"
    assert repeated_ngram_share(texts, 3) == 0.25 and repeated_ngram_share(["a b c a b"], 3) == 0.0
    # words: 4 + 2 + 3 + 6 = 15 over 4 answers; distinct unigrams: worth every penny it the best a b c = 9 of 15
    m = degeneration(texts)
    assert m["mean_words"] == 15 / 4 and m["distinct_1"] == pytest.approx(9 / 15)
    assert repeated_word_share([]) == 0.0 and degeneration([])["mean_words"] == 0.0


SFT = {**BASE, "repeated_word_share": 0.10, "distinct_2": 0.40, "mean_words": 12.0}
GOOD = {"reward_mean": 0.40, "judge_mean": 0.20, "kl": 5.0, "repeated_word_share": 0.12, "distinct_2": 0.38}


def test_the_guard_refuses_a_degenerate_candidate_and_names_the_measure():
    """Reward and judge up, but a third of the answers repeat a word (SFT: a tenth) and diversity fell: refused."""
    hacked = {**GOOD, "repeated_word_share": 0.35, "distinct_2": 0.30, "mean_words": 30.0}
    v = decide(hacked, SFT, 0.7, "the SFT policy", GateConfig(max_length_ratio=2.0), sft=SFT)
    assert not v.passed
    assert v.reasons == [
        "repeated_word_gain_vs_sft 0.250 > 0.05",
        "distinct_2_ratio_vs_sft 0.750 < 0.9",
        "length_ratio_vs_sft 2.500 > 2",
    ]
    off = GateConfig(max_repeated_word_gain=None, min_distinct_2_ratio=None)
    assert decide(hacked, SFT, 0.7, "the SFT policy", off, sft=SFT).passed, "with the guard off the same one passes"
    good = decide({**GOOD, "mean_words": 13.0}, SFT, 0.7, "the SFT policy", GateConfig(), sft=SFT)
    assert good.passed and good.metrics()["gate/repeated_word_gain_vs_sft"] == pytest.approx(0.02)
    assert good.metrics()["gate/length_ratio_vs_sft"] == pytest.approx(13 / 12), "measured, gated only when set"


def test_against_the_champion_the_guard_reports_and_sft_stays_the_anchor():
    """A champion that had already drifted (0.30) does not make a candidate at 0.32 look fine: it is SFT's + 0.22."""
    champion = {**SFT, "repeated_word_share": 0.30, "distinct_2": 0.32}
    drifted = {**GOOD, "repeated_word_share": 0.32, "distinct_2": 0.33}
    v = decide(drifted, champion, 0.6, "champion v3", GateConfig(), sft=SFT, champion=champion)
    assert v.reasons == ["repeated_word_gain_vs_sft 0.220 > 0.05", "distinct_2_ratio_vs_sft 0.825 < 0.9"]
    assert v.metrics()["gate/repeated_word_gain_vs_champion"] == pytest.approx(0.02)


def test_an_incremental_candidate_is_held_to_non_inferiority_within_its_noise_and_on_the_new_rows():
    cfg = (
        GateConfig()
    )  # min_reward_gain 0, min_win_rate 0.52, min_judge_gain 0, margin 0.05, min_new_accuracy_gain -0.05
    close = {"reward_mean": 0.08, "judge_mean": 0.02, "kl": 3.0}  # a little under its parent on every measure
    learned = {"new_accuracy": 0.80, "new_accuracy_parent": 0.70}
    # against its parent as a full candidate: refused (win rate 0.48 < 0.52, reward -0.02 < 0, judge -0.03 < 0)
    assert len(decide(close, BASE, 0.48, "champion v1", cfg).reasons) == 3
    # incremental: within the margin on each (0.48 >= 0.45, -0.02 >= -0.05, -0.03 >= -0.05) and holds the new rows
    v = decide(close, BASE, 0.48, "champion v1", cfg, new_data=learned)
    assert v.passed, v.reasons
    assert v.metrics()["gate/new_accuracy_gain"] == pytest.approx(0.10) and v.info["new_accuracy_parent"] == 0.70
    assert "needs >= 0.45" in v.summary() and "needs >= -0.05" in v.summary()
    # beyond the margin, or the new rows lost: refused, naming the measure
    assert decide(close, BASE, 0.44, "x", cfg, new_data=learned).reasons == ["win_rate 0.440 < 0.45"]
    lost = {"new_accuracy": 0.60, "new_accuracy_parent": 0.70}
    assert decide(close, BASE, 0.48, "x", cfg, new_data=lost).reasons == ["new_accuracy_gain -0.100 < -0.05"]
    # the mean reward's margin is at least 2 standard errors of the per-prompt difference: -0.15 against 2 x 0.1
    worse = {**close, "reward_mean": -0.05}
    assert decide(worse, BASE, 0.48, "x", cfg, new_data=learned).reasons == ["reward_gain -0.150 < -0.05"]
    assert decide(worse, BASE, 0.48, "x", cfg, new_data=learned | {"reward_gain_se": 0.1}).passed
    # nothing new held out: the non-inferiority checks alone; an operator's lower win-rate bar still holds
    assert decide(close, BASE, 0.48, "x", cfg, new_data={}).passed
    assert decide(close, BASE, 0.2, "x", GateConfig(min_win_rate=0.1), new_data={}).reasons == []


def test_the_standard_error_of_a_paired_difference_by_hand():
    from components.evaluation.evaluate import paired_se

    # differences 1, 0, 1: mean 2/3, sample std sqrt(1/3) = 0.57735, / sqrt(3) = 0.33333
    assert paired_se([1.0, 2.0, 3.0], [0.0, 2.0, 2.0]) == pytest.approx(1 / 3)
    assert paired_se([1.0], [0.0]) == 0.0
