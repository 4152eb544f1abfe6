"""The canary's decision rule on simulated users (issue 41): false promotions and judged answers to a verdict.

A seeded simulator gives each judged answer a thumbs-up with a known rate per arm; the challenger gets `--share` of
the traffic. For each scenario, many streams (seeds) run until the rule decides or `--most` judged answers pass:

    A/A          equal rates: every promotion is a false one (the rule's rate: at most false_promotion_rate)
    +10 points   the challenger's rate 10 points above the champion's: promoted, and how many answers it took
    -10 points   10 points below: retired
    +2 points    at the minimum improvement worth promoting

Next to it, on the same streams, a fixed-horizon one-sided z-test checked after every vote (what a dashboard that is
refreshed invites): its false-promotion rate is far above its nominal 5%.

    .venv/bin/python benchmarks/canary.py                 # 500 streams per scenario, shares 0.5 and 0.1
    .venv/bin/python benchmarks/canary.py --streams 100   # a quick look

Writes benchmarks/results/canary.json (under --tag, default "latest") and prints a table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_tagged  # noqa: E402

from components.evaluation.sequential import CHALLENGER, CHAMPION, Canary, Rule, z_quantile  # noqa: E402

SCENARIOS = {"A/A": 0.0, "+10 points": 0.10, "-10 points": -0.10, "+2 points": 0.02}
BASE_RATE = 0.6


def stream(share: float, p_champion: float, p_challenger: float, seed: int, most: int) -> list[tuple[str, bool]]:
    rng = random.Random(seed)
    votes = []
    while len(votes) < most:
        arm = CHALLENGER if rng.random() < share else CHAMPION
        votes.append((arm, rng.random() < (p_challenger if arm == CHALLENGER else p_champion)))
    return votes


def run_rule(rule: Rule, votes) -> tuple[str, int]:
    """-> (verdict, judged answers of both arms when it was reached)."""
    canary = Canary(rule)
    for i, (arm, up) in enumerate(votes, 1):
        if (verdict := canary.add(arm, up)) != "continue":
            return verdict, i
    return "continue", len(votes)


def run_z(votes, alpha: float, min_judged: int) -> tuple[str, int]:
    """The z-test checked at every vote: -> ("promote", answers) at its first rejection, else ("continue", all)."""
    z_crit, n, u = z_quantile(1 - alpha), {CHAMPION: 0, CHALLENGER: 0}, {CHAMPION: 0, CHALLENGER: 0}
    for i, (arm, up) in enumerate(votes, 1):
        n[arm] += 1
        u[arm] += up
        if min(n.values()) < min_judged:
            continue
        pooled = (u[CHAMPION] + u[CHALLENGER]) / (n[CHAMPION] + n[CHALLENGER])
        se = math.sqrt(pooled * (1 - pooled) * (1 / n[CHAMPION] + 1 / n[CHALLENGER]))
        if se > 0 and (u[CHALLENGER] / n[CHALLENGER] - u[CHAMPION] / n[CHAMPION]) / se >= z_crit:
            return "promote", i
    return "continue", len(votes)


def scenario(rule: Rule, share: float, lift: float, streams: int, most: int) -> dict:
    rows = {"rule": [], "z": []}
    for seed in range(streams):
        votes = stream(share, BASE_RATE, BASE_RATE + lift, seed, most)
        rows["rule"].append(run_rule(rule, votes))
        rows["z"].append(run_z(votes, rule.false_promotion_rate, rule.min_judged))
    out = {}
    for name, results in rows.items():
        decided = [n for v, n in results if v != "continue"]
        out[name] = {
            "promoted": sum(v == "promote" for v, _ in results) / streams,
            "retired": sum(v == "retire" for v, _ in results) / streams,
            "undecided": sum(v == "continue" for v, _ in results) / streams,
            # judged answers of both arms at the verdict; of the challenger alone: times the share
            "median_answers_to_verdict": statistics.median(decided) if decided else None,
            "median_challenger_answers_to_verdict": round(statistics.median(decided) * share) if decided else None,
        }
    return out


def binomial_noise(rate: float, n: int) -> float:
    """Two standard errors of a rate measured on n streams."""
    return 2 * math.sqrt(rate * (1 - rate) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--most", type=int, default=20000, help="judged answers (both arms) after which a stream stops")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--tag", default="latest")
    args = ap.parse_args()
    rule = Rule()
    started = time.time()
    result = {
        "rule": {
            "false_promotion_rate": rule.false_promotion_rate,
            "futility_rate": rule.futility_rate,
            "min_improvement": rule.min_improvement,
            "min_judged": rule.min_judged,
        },
        "base_rate": BASE_RATE,
        "streams": args.streams,
        "most_answers": args.most,
        "allowed_false_promotion_rate": rule.false_promotion_rate
        + binomial_noise(rule.false_promotion_rate, args.streams),
        "shares": {},
    }
    print(
        f"{'share':>5} {'scenario':<11} {'rule: promoted':>14} {'retired':>8} {'median answers':>15} | {'z-test at every vote: promoted':>30} {'median answers':>15}"
    )
    for share in args.shares:
        per = result["shares"][str(share)] = {}
        for name, lift in SCENARIOS.items():
            per[name] = r = scenario(rule, share, lift, args.streams, args.most)
            print(
                f"{share:>5} {name:<11} {r['rule']['promoted']:>14.3f} {r['rule']['retired']:>8.3f} "
                f"{r['rule']['median_answers_to_verdict']!s:>15} | {r['z']['promoted']:>30.3f} "
                f"{r['z']['median_answers_to_verdict']!s:>15}",
                flush=True,
            )
    result["seconds"] = round(time.time() - started, 1)
    write_tagged("canary", args.tag, result)
    print("answers are judged answers of both arms at the verdict")


if __name__ == "__main__":
    main()
