"""PPO-ptx (`ppo.ptx_coef`) against `make run`'s PPO, as a user samples the champion (issue 30).

Per seed: `make run`'s settings on the demo (SFT, reward model), then PPO with each ptx coefficient (0 is `make
run`'s champion), sampled as the served model samples by default (temperature 0.7, 48 new tokens) on the demo's eval
prompts (2 samples each) and on the unseen prompts of benchmarks/served_degeneration.py (16 each: a share of a few
percent is read on 480 answers per policy and seed). Measured: the independent
judge, the share of answers repeating a word back to back, distinct-2, mean words, and the KL to SFT.

    .venv/bin/python benchmarks/ppo_ptx.py [--seeds 0 1 2] [--coefs 0 0.2 0.5]

Writes benchmarks/results/ppo_ptx.json and .md.
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
from common import RESULTS, demo_sft, write_results  # noqa: E402
from served_degeneration import UNSEEN  # noqa: E402

SAMPLES = {"eval": 2, "unseen": 16}  # per prompt
MEASURES = ("judge_mean", "repeated_word_share", "distinct_2", "mean_words", "kl")


def name(coef: float) -> str:
    return "ppo" if coef == 0 else f"ppo, ptx {coef:g}"


def one(seed: int, work: Path, coefs: list[float]) -> dict:
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward

    cfg, sft = demo_sft(work, seed)  # `make run`'s settings
    out = work / f"seed{seed}"
    rm = train_reward(cfg.reward, cfg.model, sft, cfg.data_path, out / "rm", seed=seed, data_cfg=cfg.data).head_dir
    specs, seconds = [PolicySpec("sft", sft)], {}
    for coef in coefs:
        t0 = time.perf_counter()
        result = train_ppo(replace(cfg.ppo, ptx_coef=coef), cfg.model, sft, rm, cfg.data_path, out / str(coef), seed)
        seconds[name(coef)] = time.perf_counter() - t0
        specs.append(PolicySpec(name(coef), sft, result.policy_dir))
    served = replace(cfg.gate, max_new_tokens=48, temperature=0.7, seed=seed)
    rows = {}
    for setting, prompts, gate in (
        ("eval", read_prompts(cfg.data_path, "eval"), replace(served, samples_per_prompt=SAMPLES["eval"])),
        ("unseen", UNSEEN, replace(served, samples_per_prompt=SAMPLES["unseen"])),
    ):
        evals = evaluate_policies(specs, sft, rm, prompts, gate, cfg.model)
        rows[setting] = {p: {m: e.metrics[m] for m in MEASURES} for p, e in evals.items()}
    return {"measures": rows, "ppo_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--coefs", nargs="+", type=float, default=[0.0, 0.2, 0.5])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-ppo-ptx-"))
    runs = {seed: one(seed, work, args.coefs) for seed in args.seeds}
    lines = [
        "# PPO-ptx against `make run`'s PPO, sampled as served (benchmarks/ppo_ptx.py)\n",
        f"Mean over seeds {args.seeds} (per seed in the .json); temperature 0.7, 48 new tokens. eval: the demo's "
        f"100 held-out prompts, {SAMPLES['eval']} samples each; unseen: {len(UNSEEN)} prompts in a style the demo "
        f"never has, {SAMPLES['unseen']} samples each. ppo: `make run`'s champion.\n",
        "| prompts | policy | judge | repeated word | distinct-2 | mean words | KL to SFT | PPO s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in ("eval", "unseen"):
        for policy in ["sft", *map(name, args.coefs)]:
            rs = [r["measures"][setting][policy] for r in runs.values()]
            mean = {m: statistics.mean(r[m] for r in rs) for m in MEASURES}
            secs = statistics.mean(r["ppo_seconds"].get(policy, 0.0) for r in runs.values())
            lines.append(
                f"| {setting} | {policy} | {mean['judge_mean']:.3f} | {mean['repeated_word_share']:.3f} | "
                f"{mean['distinct_2']:.3f} | {mean['mean_words']:.1f} | {mean['kl']:.1f} | "
                f"{f'{secs:.1f}' if secs else '-'} |"
            )
    (RESULTS / "ppo_ptx.md").write_text("\n".join(lines) + "\n")
    write_results("ppo_ptx", {"seeds": args.seeds, "coefs": args.coefs, "runs": {str(s): r for s, r in runs.items()}})
    print("\n".join(lines))
    print("wrote benchmarks/results/ppo_ptx.json and .md")


if __name__ == "__main__":
    main()
