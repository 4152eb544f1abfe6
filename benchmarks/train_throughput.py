"""SFT and reward-model training throughput (tokens/s) and peak memory, for model=tiny and model=small.

    .venv/bin/python benchmarks/train_throughput.py [--models tiny small] [--steps 30]

Each (model, stage) runs in its own process so the peak memory is that stage's alone:
peak RSS on CPU (includes the Python + torch runtime, reported separately as baseline),
and torch.cuda.max_memory_allocated on a GPU. Tokens are non-padding tokens trained on.
Writes benchmarks/results/train_throughput.json (and prints a table).
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
from common import memory, rss_mb, spawn, write_results  # noqa: E402


def one(model: str, stage: str, steps: int, work: Path) -> dict:
    """Run one stage in this process and return its numbers."""
    os.environ.setdefault("TQDM_DISABLE", "1")

    from components.config import compose
    from components.data.demo import write_demo
    from components.models.demo_base import build_demo_base
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    baseline = rss_mb()
    overrides = [
        f"root={work}",
        f"model={model}",
        "model.pretrain_steps=20",
        f"sft.max_steps={steps}",
        f"sft.save_steps={steps}",
        f"reward.max_steps={steps}",
        f"reward.save_steps={steps}",
    ]
    cfg = compose(overrides)
    if not cfg.data_path.is_dir():
        write_demo(cfg.data, cfg.data_path)
    t = time.perf_counter()
    base = build_demo_base(cfg.model, cfg.data_path, "bench", work / "models")
    out: dict = {"model": model, "stage": stage, "params": base.params, "device": cfg.model.device}
    if stage == "base":
        out.update(seconds=time.perf_counter() - t)
    elif stage == "sft":
        r = train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, work / f"sft-{model}", seed=0)
        out.update(
            steps=steps,
            batch_size=cfg.sft.batch_size,
            seconds=r.metrics["sft/train_seconds"],
            tokens_per_second=r.metrics["sft/tokens_per_second"],
        )
    else:
        sft_dir = work / f"sft-{model}" / "merged"
        r = train_reward(cfg.reward, cfg.model, str(sft_dir), cfg.data_path, work / f"rm-{model}", seed=0)
        out.update(
            steps=steps,
            batch_size=cfg.reward.batch_size,
            seconds=r.metrics["rm/train_seconds"],
            tokens_per_second=r.metrics["rm/tokens_per_second"],
        )
    out.update(memory(baseline))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, args.steps, work)))
        return

    rows = []
    for model in args.models:
        for stage in ("base", "sft", "rm"):
            row = spawn(__file__, ["--one", model, stage, "--steps", str(args.steps), "--work", str(work)])
            rows.append(row)
            if stage != "base":
                print(
                    f"{model:>6} {stage:>4}: {row['tokens_per_second']:>9,.0f} tokens/s  {row['seconds']:6.1f} s "
                    f"for {row['steps']} steps  peak RSS {row['peak_rss_mb']:,.0f} MB "
                    f"(runtime baseline {row['baseline_rss_mb']:,.0f} MB)"
                    + (f"  CUDA peak {row['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in row else ""),
                    flush=True,
                )
    write_results("train_throughput", {"steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
