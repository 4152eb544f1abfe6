"""This project's PPO against TRL's RLOOTrainer, side by side on the same inputs (issue 15):

- the demo SFT model (default settings: what `make run` trains), the demo's rollout prompts, LoRA with PPO's
  settings (`ppo.lora`), learning rate 1e-3, up to 24 new tokens, temperature 1;
- one programmatic reward callable, the demo judge `components.evaluation.judges:sentiment`
  (PPO: `ppo.use_reward_model=false ppo.reward_fn=... ppo.value_init=fresh`);
- a budget of sampled responses (--samples, 1280 = PPO's 40 iterations x 32); TRL also gets --trl-samples
  (3x by default), to see when it reaches PPO's reward. TRL: k=4 samples per prompt, 32 per step, its defaults
  otherwise (beta 0.05, one gradient step per generation batch);
- the same held-out evaluation for both, every --eval-every samples: PPO's `evaluate_policy_vs_reference` on the
  demo's eval prompts (one sample each, same seed, same `sample` code): the judge's mean reward and the summed k1 KL
  to the SFT model. Its time is left out of both training clocks; so are model loading and checkpoints.

Reported per run: samples/s (budget / training seconds), wall seconds to reach --threshold held-out reward, final
held-out reward, KL, peak RSS (each run in its own process). Writes benchmarks/results/ppo_vs_rloo.json and
ppo_vs_rloo.png (held-out reward against training seconds, both algorithms on one plot).

    .venv/bin/python benchmarks/ppo_vs_rloo.py [--work DIR] [--seeds 0 1 2] [--samples 1280] [--tag NAME]
        [PPO overrides...]            e.g. ppo.ppo_epochs=2 (an ablation: the row goes under --tag)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_sft, memory, rloo_trainer, rss_mb, spawn, write_results  # noqa: E402

REWARD_FN = "components.evaluation.judges:sentiment"
BATCH = 32  # sampled responses per iteration (PPO) / per step (TRL: 8 prompts x k=4)
K = 4  # TRL RLOO: completions per prompt (common.rloo_trainer)


def compose_cfg(work: Path, overrides: list[str], samples: int, eval_every: int):
    """The PPO side's config: the peer setup, then `overrides`; iterations and eval interval from the budget and
    the (possibly overridden) rollout batch size."""
    from components.config import compose

    setup = [
        f"root={work}",
        "ppo.use_reward_model=false",
        f"ppo.reward_fn={REWARD_FN}",
        "ppo.value_init=fresh",
        "ppo.save_every=1000000",  # no checkpoints inside the loop (TRL saves none either)
        "ppo.sample_every=0",
        *overrides,
    ]
    batch = compose(setup).ppo.batch_size
    every = max(1, eval_every // batch) if eval_every else 0
    return compose([*setup, f"ppo.steps={samples // batch}", f"ppo.eval_every={every}"])


def prepare(work: Path) -> str:
    """Demo data, the tiny base and SFT with default settings, cached in `work`: -> the merged SFT dir."""
    return demo_sft(work)[1]


def run_ppo(work: Path, sft_dir: str, samples: int, eval_every: int, seed: int, overrides: list[str]) -> dict:
    from components.training.ppo import train_ppo

    cfg = compose_cfg(work, overrides, samples, eval_every)
    t = time.perf_counter()
    r = train_ppo(cfg.ppo, cfg.model, sft_dir, None, cfg.data_path, work / f"ppo-run-{seed}", seed=seed)
    wall = time.perf_counter() - t
    h = r.history
    curve = [
        {
            "samples": (i + 1) * cfg.ppo.batch_size,
            "seconds": row["ppo/train_elapsed_seconds"],
            "reward": row["ppo/eval_reward"],
            "kl": row["ppo/eval_kl"],
        }
        for i, row in enumerate(h)
        if "ppo/eval_reward" in row
    ]
    m = r.metrics
    curve.append(
        {
            "samples": len(h) * cfg.ppo.batch_size,
            "seconds": h[-1]["ppo/train_elapsed_seconds"],
            "reward": m["ppo/eval_reward"],
            "kl": m["ppo/eval_kl"],
        }
    )
    start = {"samples": 0, "seconds": 0.0, "reward": m["ppo/eval_reward_ref"], "kl": 0.0}
    steady = h[1:] or h
    phases = {k: sum(row[f"ppo/time_{k}"] for row in steady) / len(steady) for k in ("generate", "score", "train")}
    return {"curve": [start, *curve], "process_wall_s": wall, "phase_seconds_per_iteration": phases}


def run_rloo(work: Path, sft_dir: str, samples: int, eval_every: int, seed: int) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import TrainerCallback

    from components.data.readers import read_prompts
    from components.evaluation.judges import sentiment
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import Roles, lora_config
    from components.training.ppo import evaluate_policy_vs_reference

    cfg = compose_cfg(work, [], samples, eval_every)

    torch.manual_seed(seed)
    tok = load_tokenizer(sft_dir, cfg.model, padding_side="left")
    model = get_peft_model(load_causal_lm(sft_dir, cfg.model), lora_config(cfg.ppo.lora))  # TRL: adapter "default"
    eval_prompts = read_prompts(cfg.data_path, "eval")[: cfg.ppo.eval_max_prompts]
    roles = Roles(model, tok, None, None, 0.0, 1.0, sentiment, trainable=frozenset({"default"}), policy="default")

    def evaluate() -> dict:
        return evaluate_policy_vs_reference(roles, eval_prompts, cfg.ppo, seed, reference=False)

    ref = evaluate_policy_vs_reference(roles, eval_prompts, cfg.ppo, seed)  # before training: policy = SFT
    curve = [{"samples": 0, "seconds": 0.0, "reward": ref["ppo/eval_reward_ref"], "kl": 0.0}]
    steps = samples // BATCH

    class Clock(TrainerCallback):
        """The training clock without the evals; an eval every `eval_every` samples and at the end."""

        def __init__(self):
            self.start, self.eval_seconds = 0.0, 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            n = state.global_step * BATCH
            if n % eval_every and state.global_step != steps:
                return
            elapsed = time.perf_counter() - self.start - self.eval_seconds
            t = time.perf_counter()
            ev = evaluate()
            model.train()
            self.eval_seconds += time.perf_counter() - t
            curve.append({"samples": n, "seconds": elapsed, "reward": ev["ppo/eval_reward"], "kl": ev["ppo/eval_kl"]})

    trainer = rloo_trainer(
        cfg, model, tok, work / f"rloo-run-{seed}", BATCH, steps, seed, [Clock()], logging_steps=max(1, steps // 10)
    )
    t = time.perf_counter()
    trainer.train()
    return {"curve": curve, "process_wall_s": time.perf_counter() - t}


def one(args, overrides: list[str]) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    baseline = rss_mb()
    sft_dir = str(args.work / "sft" / "merged")
    if args.one == "ppo":
        out = run_ppo(args.work, sft_dir, args.samples, args.eval_every, args.seed, overrides)
    else:
        out = run_rloo(args.work, sft_dir, args.samples, args.eval_every, args.seed)
    last = out["curve"][-1]
    out.update(
        algorithm=args.one,
        seed=args.seed,
        samples=last["samples"],
        train_seconds=last["seconds"],
        samples_per_second=last["samples"] / last["seconds"],
        final_reward=last["reward"],
        final_kl=last["kl"],
        **memory(baseline),
    )
    return out


def seconds_to(curve: list[dict], threshold: float) -> float | None:
    """Training seconds at the first eval whose held-out reward is at least `threshold` (None: never)."""
    return next((p["seconds"] for p in curve if p["reward"] >= threshold), None)


def summarise(runs: list[dict], threshold: float) -> dict:
    import statistics

    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    to = [seconds_to(r["curve"], threshold) for r in runs]
    return {
        "runs": len(runs),
        "samples": runs[0]["samples"],
        "samples_per_second": mean([r["samples_per_second"] for r in runs]),
        "train_seconds": mean([r["train_seconds"] for r in runs]),
        "final_reward": mean([r["final_reward"] for r in runs]),
        "final_kl": mean([r["final_kl"] for r in runs]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "seconds_to_threshold": mean([x for x in to if x is not None]),
        "reached_threshold": f"{sum(x is not None for x in to)}/{len(to)}",
    }


def write_table(summary: dict[str, dict], args, path: Path) -> None:
    """The summary as a markdown table (means over seeds)."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    rows = [
        f"| run | samples | samples/s | training s | s to reward >= {args.threshold} | held-out reward | KL | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        rows.append(
            f"| {name} | {s['samples']} | {fmt(s['samples_per_second'], '.0f')} | {fmt(s['train_seconds'], '.1f')} | "
            f"{fmt(s.get('seconds_to_threshold'), '.1f')} | {fmt(s['final_reward'], '.3f')} | "
            f"{fmt(s['final_kl'], '.2f')} | {fmt(s.get('peak_rss_mb'), '.0f')} |"
        )
    path.write_text(
        f"# PPO vs TRL RLOOTrainer (benchmarks/ppo_vs_rloo.py), seeds {args.seeds}\n\n" + "\n".join(rows) + "\n"
    )


def plot(groups: dict[str, list[dict]], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for name, runs in groups.items():
        for i, r in enumerate(runs):
            xs, ys = [p["seconds"] for p in r["curve"]], [p["reward"] for p in r["curve"]]
            line = ax.plot(xs, ys, marker=".", color=colours.get(name), alpha=0.8, label=name if i == 0 else None)
            colours[name] = line[0].get_color()
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_xlabel("training seconds (evals, loading and checkpoints left out)")
    ax.set_ylabel("held-out reward (demo judge, eval prompts)")
    ax.set_title("PPO (this project) vs TRL RLOOTrainer: same model, prompts, reward, LoRA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=["ppo", "rloo"])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=1280)
    ap.add_argument("--trl-samples", type=int, default=3840)
    ap.add_argument("--eval-every", type=int, default=128, help="samples between held-out evals")
    ap.add_argument("--threshold", type=float, default=0.3, help="held-out reward for the time-to-threshold")
    ap.add_argument("--tag", default="default", help="name of this PPO configuration in the results")
    ap.add_argument("--skip-trl", action="store_true", help="keep the TRL runs already in the results")
    ap.add_argument("--report", action="store_true", help="no runs: the summary, table and plot of the results")
    args, overrides = ap.parse_known_args()
    if args.one:
        print("RESULT " + json.dumps(one(args, overrides)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="rlhf-ppo-vs-rloo-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        prepare(work)
    path = RESULTS / "ppo_vs_rloo.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    groups: dict[str, list[dict]] = {
        k: v for k, v in old.get("raw", {}).items() if args.report or k != f"ppo:{args.tag}"
    }
    common = ["--work", str(work), "--eval-every", str(args.eval_every)]
    for seed in [] if args.report else args.seeds:
        run = spawn(
            __file__, ["--one", "ppo", "--seed", str(seed), "--samples", str(args.samples), *common, *overrides]
        )
        print(
            f"ppo:{args.tag} seed {seed}: {run['samples_per_second']:.0f} samples/s, reward {run['final_reward']:.3f}"
        )
        groups.setdefault(f"ppo:{args.tag}", []).append(run)
    if not (args.skip_trl or args.report) or "rloo" not in groups:
        groups["rloo"] = []
        for seed in args.seeds:
            run = spawn(__file__, ["--one", "rloo", "--seed", str(seed), "--samples", str(args.trl_samples), *common])
            print(f"rloo seed {seed}: {run['samples_per_second']:.0f} samples/s, reward {run['final_reward']:.3f}")
            groups["rloo"].append(run)
    summary = {}
    for name, runs in groups.items():
        summary[name] = summarise(runs, args.threshold)
        if name == "rloo":  # TRL at PPO's budget: the point of its curve at --samples
            at = [next(p for p in r["curve"] if p["samples"] >= args.samples) for r in runs]
            summary["rloo@budget"] = {
                "samples": args.samples,
                "samples_per_second": sum(p["samples"] / p["seconds"] for p in at) / len(at),
                "train_seconds": sum(p["seconds"] for p in at) / len(at),
                "final_reward": sum(p["reward"] for p in at) / len(at),
                "final_kl": sum(p["kl"] for p in at) / len(at),
            }
    for name, s in summary.items():
        print(f"{name:>22}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    write_results(
        "ppo_vs_rloo",
        {
            "setup": {
                "reward_fn": REWARD_FN,
                "samples": args.samples,
                "trl_samples": args.trl_samples,
                "eval_every_samples": args.eval_every,
                "threshold": args.threshold,
                "seeds": args.seeds,
                "trl": {"k": K, "batch": BATCH},
            },
            "summary": summary,
            "raw": groups,
        },
    )
    write_table(summary, args, RESULTS / "ppo_vs_rloo.md")
    plot(groups, args.threshold, RESULTS / "ppo_vs_rloo.png")
    print(f"wrote {(RESULTS / 'ppo_vs_rloo.png').relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main()
