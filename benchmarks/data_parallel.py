"""Data-parallel stages: SFT, the reward model and PPO on 1 and N processes (service/launch.py, torchrun) at the same
global batch, on the demo (model=tiny): wall seconds per stage (the launch included: N fresh processes importing
torch), training samples/s, and the metrics that should agree.

    .venv/bin/python benchmarks/data_parallel.py [--processes 2] [--work /tmp/dp-bench]

On a CPU the processes share its cores (gloo), so this measures what the launch and the all-reduces cost, not a
speed-up; on a machine with N GPUs it measures the speed-up. Writes benchmarks/results/data_parallel.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_sft, write_results  # noqa: E402

STAGES = {
    "sft": ("sft.max_steps=40", "sft.batch_size=16", "sft.save_steps=1000"),
    "reward": ("reward.max_steps=40", "reward.batch_size=16", "reward.feedback_batch_size=16"),
    "ppo": ("ppo.steps=8", "ppo.batch_size=32", "ppo.minibatch_size=16", "ppo.eval_max_prompts=64"),
}
KEYS = {
    "sft": ("sft/train_loss", "sft/eval_loss"),
    "reward": ("rm/eval_loss", "rm/eval_accuracy"),
    "ppo": ("ppo/eval_reward", "ppo/eval_kl", "ppo/kl"),
}


def samples(stage: str, cfg) -> int:
    return {
        "sft": cfg.sft.max_steps * cfg.sft.batch_size,
        "reward": cfg.reward.max_steps * cfg.reward.batch_size,
        "ppo": cfg.ppo.steps * cfg.ppo.batch_size,
    }[stage]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dp-bench"))
    args = ap.parse_args()

    from components.config import compose
    from components.models.demo_base import build_demo_base
    from service import launch

    base_cfg, sft_dir = demo_sft(args.work)  # data, base and a default SFT model (cached in --work)
    base = build_demo_base(base_cfg.model, base_cfg.data_path, "bench", args.work / "models")
    reward_dir = None
    rows = []
    for stage, overrides in STAGES.items():
        for n in (1, args.processes):
            cfg = compose([f"root={args.work}", f"infra.num_processes={n}", *overrides])
            out = args.work / f"{stage}-{n}"
            inputs = {
                "sft": {"base_path": base.path},
                "reward": {"sft_dir": sft_dir},
                "ppo": {"sft_dir": sft_dir, "reward_dir": reward_dir},
            }[stage]
            t0 = time.perf_counter()
            result = launch.run(stage, cfg, data_dir=str(cfg.data_path), out_dir=str(out), **inputs)
            seconds = time.perf_counter() - t0
            if stage == "reward" and n == 1:
                reward_dir = result.head_dir
            row = {
                "stage": stage,
                "processes": n,
                "wall_seconds": seconds,
                "samples_per_second": samples(stage, cfg) / seconds,
                **{k: result.metrics.get(k) for k in KEYS[stage]},
            }
            rows.append(row)
            print(row, flush=True)
    write_results("data_parallel", {"processes": args.processes, "stages": STAGES, "runs": rows})
    for r in rows:
        metrics = ", ".join(f"{k} {r[k]:.4f}" for k in KEYS[r["stage"]] if r[k] is not None)
        print(
            f"{r['stage']:>6} x{r['processes']}: {r['wall_seconds']:6.1f} s, {r['samples_per_second']:7.1f} samples/s; {metrics}"
        )


if __name__ == "__main__":
    main()
