"""Guided RL side by side: `rlhf sweep` (plain PPO, roll-in/PPO++, roll-out/AggreVaTeD, D2LOLS) on the demo,
one fresh project per pipeline seed, then the mean and spread over seeds of what the gate looks at: held-out
reward-model score, the independent judge (not the RM), the KL to the SFT policy, and PPO's wall time.

    .venv/bin/python benchmarks/guided_sweep.py [--seeds 0 1 2] [--guide reference|champion] [overrides...]

--guide champion: each guided variant's guide is the plain-PPO policy of the same seed (the situation of a
scheduled retrain, where the champion guides its successor); reference: the SFT model (free, in memory).

Writes benchmarks/results/guided_sweep[_<guide>].json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, write_results  # noqa: E402

VARIANTS = ("none", "rollin", "aggrevated", "d2lols")
SHOWN = {  # sweep metric -> column
    "sweep/eval_reward": "held-out RM reward",
    "sweep/judge": "judge score",
    "sweep/win_rate_vs_sft": "RM win rate vs SFT",
    "sweep/kl": "KL to SFT",
    "sweep/ppo_seconds": "PPO wall s",
    "sweep/guide_tokens": "guide tokens/rollout",
}


def sweep(root: Path, overrides: list[str]) -> dict[str, dict[str, float]]:
    """`rlhf sweep` in `root`; -> variant -> its sweep/* metrics (from MLflow)."""
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    proc = subprocess.run([rlhf, "sweep", f"root={root}", *overrides], cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-2500:])
    if proc.returncode:
        sys.exit(f"rlhf sweep failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    import mlflow

    from components import tracking
    from components.config import compose

    cfg = compose([f"root={root}"])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    out = {}
    for r in runs:
        if "sweep.variant" in r.data.tags:
            out[r.data.tags["sweep.variant"]] = {k: v for k, v in r.data.metrics.items() if k.startswith("sweep/")}
    return out


def plain_policy_dir(root: Path) -> str:
    """The plain-PPO variant's policy adapter (its PPO run's tag), to guide the others."""
    import mlflow

    from components import tracking
    from components.config import compose

    cfg = compose([f"root={root}"])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    plain = next(r.info.run_id for r in runs if r.data.tags.get("sweep.variant") == "none")
    return next(
        r.data.tags["policy_dir"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == plain and r.data.tags.get("stage") == "ppo"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guide", choices=["reference", "champion"], default="reference")
    args, overrides = p.parse_known_args()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    started = time.time()
    for seed in args.seeds:
        root = Path(tempfile.mkdtemp(prefix=f"rlhf-sweep-{seed}-"))
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        if args.guide == "reference":
            per_seed[seed] = sweep(root, [f"seed={seed}", *overrides])
        else:
            per_seed[seed] = sweep(root, [f"seed={seed}", "ppo/guide=none", *overrides])
            guide = plain_policy_dir(root)
            per_seed[seed] |= sweep(
                root, [f"seed={seed}", "ppo/guide=rollin,aggrevated,d2lols", f"ppo.guide.model={guide}", *overrides]
            )
        print(f"seed {seed}: done ({time.time() - started:.0f} s so far)")

    summary = {}
    for v in VARIANTS:
        summary[v] = {}
        for metric in SHOWN:
            values = [per_seed[s][v][metric] for s in args.seeds if metric in per_seed[s].get(v, {})]
            if values:
                summary[v][metric] = {
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
    table = markdown(summary, args.seeds, args.guide)
    print(table)
    name = "guided_sweep" if args.guide == "reference" else "guided_sweep_champion"
    write_results(
        name,
        {
            "seeds": args.seeds,
            "guide": args.guide,
            "overrides": overrides,
            "per_seed": per_seed,
            "summary": summary,
            "wall_s": time.time() - started,
        },
    )
    (RESULTS / f"{name}.md").write_text(table)
    print(f"wrote {(RESULTS / f'{name}.md').relative_to(REPO)}")


def markdown(summary: dict, seeds: list[int], guide: str) -> str:
    head = f"guide: {guide}; mean ± std over pipeline seeds {seeds} (demo data, 40 PPO iterations x 32 rollouts)\n\n"
    head += "| variant | " + " | ".join(SHOWN.values()) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
    rows = []
    for v, metrics in summary.items():
        cells = [f"{m['mean']:.3f} ± {m['std']:.3f}" if (m := metrics.get(k)) else "-" for k in SHOWN]
        rows.append(f"| {v} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
