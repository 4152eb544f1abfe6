"""The canary's guardrails (components/evaluation/guardrails.py) and sticky routing (components/registry/routing.py)."""

import random
import uuid

from components.evaluation.guardrails import Answer, Guard, Limits, check, p95, windows
from components.evaluation.sequential import CHALLENGER, CHAMPION, Canary, Rule
from components.registry.routing import arm

GOOD = [
    "a warm and moving film with a fine cast",
    "the story is slow but the ending pays off",
    "sharp writing and a score that stays with you",
    "I laughed more than I expected to",
]


def answers(texts, latency=100.0, failed=0, reward=None):
    out = [Answer(t, latency, reward=reward) for t in texts]
    return out + [Answer("", latency, failed=True) for _ in range(failed)]


def test_p95_nearest_rank():
    assert p95([float(x) for x in range(1, 21)]) == 19.0
    assert p95([5.0]) == 5.0 and p95([]) == 0.0


def test_a_window_like_the_champions_passes_and_each_check_fails_alone():
    champion = answers(GOOD * 5, reward=0.3)
    assert check(answers(GOOD * 5, reward=0.2), champion, Limits()) == []
    assert check(answers(GOOD * 5, failed=3), champion, Limits())[0].startswith("error rate")
    assert check(answers(GOOD * 5, latency=400.0), champion, Limits())[0].startswith("p95 latency 400 ms")
    repeating = [t.replace("the", "the the", 1) if "the" in t else t + " very very" for t in GOOD]
    assert any(f.startswith("repeated-word share") for f in check(answers(repeating * 5), champion, Limits()))
    assert any(f.startswith("distinct-2") for f in check(answers([GOOD[0]] * 20), champion, Limits()))
    assert check(answers(["ok"] * 20), champion, Limits(min_distinct_2_ratio=None))[0].startswith("mean length")
    assert check(answers(GOOD * 5, reward=-0.5), champion, Limits())[0].startswith("reward -0.50")
    assert check(answers(GOOD * 5, reward=-0.5), champion, Limits(max_reward_drop=None)) == []


def test_guard_trips_after_k_failed_windows_and_names_them():
    guard = Guard(max_failed_windows=2)
    assert not guard.add([]) and not guard.add(["error rate 0.2 vs the champion's 0.0"])
    assert guard.add(["p95 latency"])
    assert guard.reason().startswith("2 of 3 windows failed their guardrails (window 2: error rate")


def test_windows_pair_the_champions_answers_of_the_same_time():
    ch = answers(["a"] * 5)
    champ = [(float(t), Answer(str(t), 1.0)) for t in range(10)]
    got = windows(ch, champ, [0.0, 1.0, 2.0, 5.0, 7.0], 2)
    assert [len(w[0]) for w in got] == [2, 2]  # the fifth answer waits for a full window
    assert [a.response for a in got[1][1]] == ["2", "3", "4", "5"]


def test_a_challenger_that_starts_repeating_words_is_rolled_back_before_the_test_has_its_sample():
    """Simulated users: the challenger is liked as often as the champion, but from its 60th answer it repeats
    words. The guard (windows of 50, 2 failures) takes it out before the sequential test has 50 judged answers of
    each arm and well before any verdict."""
    rng = random.Random(0)
    canary, guard = Canary(Rule(min_judged=50)), Guard(max_failed_windows=2)
    champion = answers(GOOD * 50)
    window, served = [], 0
    while not guard.tripped:
        served += 1
        text = rng.choice(GOOD)
        window.append(Answer(text.replace(" ", " " + text.split()[1] + " ", 1) if served > 60 else text, 100.0))
        if rng.random() < 0.3:  # three answers in ten are judged, on both arms alike
            canary.add(CHALLENGER, rng.random() < 0.6)
            canary.add(CHAMPION, rng.random() < 0.6)
        if len(window) == 50:
            guard.add(check(window, champion[:50], Limits()))
            window = []
    assert served == 150 and guard.failures[0][0] == 2
    assert canary.decision().verdict == "continue" and canary.judged[CHALLENGER] < 50


def test_routing_is_sticky_and_keeps_the_share():
    ids = [str(uuid.UUID(int=random.Random(1).getrandbits(128) ^ i)) for i in range(10_000)]
    first = [arm(u, 0.1, "v7") for u in ids]
    assert [arm(u, 0.1, "v7") for u in ids] == first  # the same user, the same arm
    share = first.count("challenger") / len(ids)
    assert abs(share - 0.1) <= 0.02, share
    again = [arm(u, 0.1, "v8") for u in ids]  # a new challenger version draws its users afresh
    assert again != first and abs(again.count("challenger") / len(ids) - 0.1) <= 0.02
    assert all(arm(u, 0.0, "v7") == "champion" for u in ids[:100])
    rng = random.Random(0)
    anonymous = [arm(None, 0.3, "v7", rng) for _ in range(10_000)]
    assert abs(anonymous.count("challenger") / 10_000 - 0.3) <= 0.02
