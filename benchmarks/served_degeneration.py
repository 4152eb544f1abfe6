"""Does the `make run` champion buy its reward with degeneration, as a user sees it? (issue 30)

The pipeline's defaults on the demo (SFT, reward model, PPO; seeds 0-2), and the same PPO without
`ppo.repeated_word_penalty` (`ppo_unshaped`); then the SFT policy and the two PPO policies sampled as the served model
samples by default (temperature 0.7, 48 new tokens), on two prompt sets:
  - `eval`: the demo's 100 frozen eval prompts (never trained on);
  - `unseen`: 30 prompts in a style the demo data never has ("Honestly, the hotel room", "What I think about ..."),
    8 samples each (240 answers per policy and seed: a share of a few percent needs that many to be read).
Measured: the independent judge, the share of answers repeating a word back to back, distinct-2, mean words; and at
the gate's own sampling (temperature 1.0, 24 tokens) on `eval`, for comparison.

    .venv/bin/python benchmarks/served_degeneration.py [--seeds 0 1 2] [--set ppo.repeated_word_penalty=1]

Writes benchmarks/results/served_degeneration.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_sft, write_results  # noqa: E402

SUBJECTS = (
    "the new phone", "this restaurant", "the hotel room", "my old car", "the concert", "this laptop", "the museum",
    "our holiday", "the coffee shop", "this book", "the train ride", "the gym", "this jacket", "the park", "the dentist",
)  # fmt: skip
UNSEEN = [f"Honestly, {s}" for s in SUBJECTS] + [f"What I think about {s}:" for s in SUBJECTS]
UNSEEN_SAMPLES = 8
MEASURES = ("judge_mean", "repeated_word_share", "distinct_2", "mean_words")


def one(seed: int, work: Path, overrides: list[str]) -> dict:
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward

    cfg, sft = demo_sft(work, seed, overrides)  # `make run`'s settings
    out = work / f"seed{seed}"
    rm = train_reward(cfg.reward, cfg.model, sft, cfg.data_path, out / "rm", seed=seed, data_cfg=cfg.data).head_dir
    ppo = train_ppo(cfg.ppo, cfg.model, sft, rm, cfg.data_path, out / "ppo", seed=seed).policy_dir
    unshaped = replace(cfg.ppo, repeated_word_penalty=0.0)  # the same PPO without the repeated-word penalty
    plain = train_ppo(unshaped, cfg.model, sft, rm, cfg.data_path, out / "ppo_unshaped", seed=seed).policy_dir
    specs = [PolicySpec("sft", sft), PolicySpec("ppo", sft, ppo), PolicySpec("ppo_unshaped", sft, plain)]
    served = replace(cfg.gate, max_new_tokens=48, temperature=0.7, seed=seed)
    rows = {}
    for name, prompts, gate in (
        ("eval, served sampling", read_prompts(cfg.data_path, "eval"), served),
        ("unseen, served sampling", UNSEEN, replace(served, samples_per_prompt=UNSEEN_SAMPLES)),
        ("eval, gate sampling", read_prompts(cfg.data_path, "eval"), replace(cfg.gate, seed=seed)),
    ):
        evals = evaluate_policies(specs, sft, rm, prompts, gate, cfg.model)
        rows[name] = {p: {m: e.metrics[m] for m in MEASURES} for p, e in evals.items()}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", nargs="*", default=[], help="Hydra overrides on top of make run's settings")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-served-degeneration-"))
    runs = {seed: one(seed, work, args.set) for seed in args.seeds}
    lines = [
        "# The `make run` champion as a user samples it (benchmarks/served_degeneration.py)\n",
        f"Mean over seeds {args.seeds} (per seed in the .json). Served sampling: temperature 0.7, 48 new tokens; "
        "gate sampling: temperature 1.0, 24 tokens. ppo: `make run`'s champion"
        f"{' with ' + ' '.join(args.set) if args.set else ''}; ppo_unshaped: the same without "
        "ppo.repeated_word_penalty.\n",
        "| prompts, sampling | policy | judge | repeated word | distinct-2 | mean words |",
        "|---|---|---|---|---|---|",
    ]
    for setting in next(iter(runs.values())):
        for policy in ("sft", "ppo", "ppo_unshaped"):
            mean = {m: statistics.mean(r[setting][policy][m] for r in runs.values()) for m in MEASURES}
            lines.append(
                f"| {setting} | {policy} | {mean['judge_mean']:.3f} | {mean['repeated_word_share']:.3f} | "
                f"{mean['distinct_2']:.3f} | {mean['mean_words']:.1f} |"
            )
    (RESULTS / "served_degeneration.md").write_text("\n".join(lines) + "\n")
    body = {"seeds": args.seeds, "overrides": args.set, "runs": {str(s): r for s, r in runs.items()}}
    write_results("served_degeneration", body)
    print("\n".join(lines))
    print("wrote benchmarks/results/served_degeneration.json and .md")


if __name__ == "__main__":
    main()
