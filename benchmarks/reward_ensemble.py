"""The reward-model ensemble on the demo (issue 30): what it costs, what its disagreement sees, and what PPO on a
conservative reward (mean - lambda * std) buys.

Per seed (0-2), `make run`'s settings: SFT; a single reward model (`reward.ensemble=1`) and an ensemble of 5; then
PPO three ways:
  - `ppo`: on the single reward model (the `make run` champion);
  - `ppo_ens`: on the ensemble's mean score (`reward.ensemble=5`);
  - `ppo_ens_pen1`: on mean - 1.0 x disagreement (`ppo.uncertainty_penalty=1`).
Every policy (and SFT, and a PPO hacked by a reward that pays for repeated words, as in
tests/training/test_reward_hacking.py) is then measured by the same ensemble: its disagreement on the policy's
answers, with the judge, the KL and the degeneration measures, on the eval prompts at the gate's sampling and on
unseen prompts at the served sampling (benchmarks/served_degeneration.py's).

    .venv/bin/python benchmarks/reward_ensemble.py [--seeds 0 1 2] [--members 5]

Writes benchmarks/results/reward_ensemble.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))
from common import RESULTS, demo_sft, write_results  # noqa: E402
from served_degeneration import UNSEEN  # noqa: E402

MEASURES = ("reward_mean", "reward_disagreement", "judge_mean", "kl", "repeated_word_share", "distinct_2")
POLICIES = ("sft", "ppo", "ppo_ens", "ppo_ens_pen1", "hacked")


def one(seed: int, members: int, work: Path) -> dict:
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward

    cfg, sft = demo_sft(work, seed)  # `make run`'s settings
    out = work / f"seed{seed}"
    seconds = {}
    rms = {}
    for k in (1, members):
        t = time.perf_counter()
        rm_cfg = replace(cfg.reward, ensemble=k)
        r = train_reward(rm_cfg, cfg.model, sft, cfg.data_path, out / f"rm{k}", seed=seed, data_cfg=cfg.data)
        seconds[f"reward_model_{k}"] = time.perf_counter() - t
        rms[k] = r
    hack = "test_reward_hacking:pays_for_repeats"
    policies = {}
    for name, rm, ppo in (
        ("ppo", rms[1], cfg.ppo),
        ("ppo_ens", rms[members], cfg.ppo),
        ("ppo_ens_pen1", rms[members], replace(cfg.ppo, uncertainty_penalty=1.0)),
        ("hacked", rms[1], replace(cfg.ppo, reward_fn=hack, reward_fn_weight=1.0)),
    ):
        t = time.perf_counter()
        policies[name] = train_ppo(ppo, cfg.model, sft, rm.head_dir, cfg.data_path, out / name, seed=seed).policy_dir
        seconds[f"ppo_{name}"] = time.perf_counter() - t
    specs = [PolicySpec("sft", sft)] + [PolicySpec(n, sft, d) for n, d in policies.items()]
    rows = {}
    for setting, prompts, gate in (
        ("eval, gate sampling", read_prompts(cfg.data_path, "eval"), replace(cfg.gate, seed=seed)),
        ("unseen, served sampling", UNSEEN, replace(cfg.gate, max_new_tokens=48, temperature=0.7, seed=seed)),
    ):
        evals = evaluate_policies(specs, sft, rms[members].head_dir, prompts, gate, cfg.model)
        rows[setting] = {p: {m: e.metrics[m] for m in MEASURES} for p, e in evals.items()}
    held_out = {k: rms[members].metrics[k] for k in ("rm/eval_disagreement", "rm/ensemble_eval_accuracy")}
    held_out["rm/eval_accuracy_single"] = rms[1].metrics["rm/eval_accuracy"]
    return {"rows": rows, "seconds": seconds, "reward_model": held_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--members", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-reward-ensemble-"))
    runs = {seed: one(seed, args.members, work) for seed in args.seeds}
    avg = lambda f: statistics.mean(f(r) for r in runs.values())  # noqa: E731
    lines = [
        "# The reward-model ensemble (benchmarks/reward_ensemble.py)\n",
        f"Mean over seeds {args.seeds} (per seed in the .json); {args.members} members; every policy measured by the "
        "same ensemble. Disagreement: the std over the members of their standardised scores, in training-reward "
        "stds; ratio: over SFT's on the same prompts (what gate.max_disagreement_ratio reads).\n",
        "| prompts, sampling | policy | RM (ensemble) | disagreement | ratio vs SFT | judge | KL | repeated word "
        "| distinct-2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in next(iter(runs.values()))["rows"]:
        sft = avg(lambda r, s=setting: r["rows"][s]["sft"]["reward_disagreement"])
        for policy in POLICIES:
            m = {k: avg(lambda r, s=setting, p=policy, k=k: r["rows"][s][p][k]) for k in MEASURES}
            lines.append(
                f"| {setting} | {policy} | {m['reward_mean']:.2f} | {m['reward_disagreement']:.3f} | "
                f"{m['reward_disagreement'] / sft:.2f} | {m['judge_mean']:.2f} | {m['kl']:.1f} | "
                f"{m['repeated_word_share']:.3f} | {m['distinct_2']:.3f} |"
            )
    lines += [
        "",
        f"Held out: single reward model's accuracy {avg(lambda r: r['reward_model']['rm/eval_accuracy_single']):.3f}, "
        f"the ensemble's {avg(lambda r: r['reward_model']['rm/ensemble_eval_accuracy']):.3f}; the ensemble's "
        f"disagreement on held-out responses {avg(lambda r: r['reward_model']['rm/eval_disagreement']):.3f}.",
        "",
        "| stage | seconds (2 CPU cores) |",
        "|---|---|",
    ]
    for key in next(iter(runs.values()))["seconds"]:
        lines.append(f"| {key} | {avg(lambda r, k=key: r['seconds'][k]):.1f} |")
    (RESULTS / "reward_ensemble.md").write_text("\n".join(lines) + "\n")
    write_results("reward_ensemble", {"seeds": args.seeds, "members": args.members, "runs": runs})
    print("\n".join(lines))
    print("wrote benchmarks/results/reward_ensemble.json and .md")


if __name__ == "__main__":
    main()
