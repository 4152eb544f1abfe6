"""Where a PPO iteration's time goes: torch.profiler over a few iterations of `train_ppo` on the demo (model=tiny,
the peer benchmark's setup: the demo judge as the reward, no reward model), phases labelled ppo/generate,
ppo/score and ppo/train by the loop itself.

    .venv/bin/python benchmarks/ppo_profile.py [--work DIR] [--iterations 6] [--tag NAME] [PPO overrides...]

Prints the phases' share and the operators with the most self CPU time inside each phase; writes
benchmarks/results/ppo_profile.json (under --tag) and ppo_profile-<tag>.txt (the full tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402
from ppo_vs_rloo import compose_cfg, prepare  # noqa: E402

PHASES = ("ppo/generate", "ppo/score", "ppo/train")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/rlhf-ppo-profile"))
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--tag", default="default")
    args, overrides = ap.parse_known_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    sft_dir = prepare(args.work)

    from torch.profiler import ProfilerActivity, profile

    from components.training.ppo import train_ppo

    cfg = compose_cfg(args.work, [*overrides, "ppo.eval_max_prompts=0"], 32 * args.iterations, 0)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r = train_ppo(cfg.ppo, cfg.model, sft_dir, None, cfg.data_path, args.work / "ppo-profile")
    wall = time.perf_counter() - t
    events = prof.key_averages()
    phase_ms = {e.key: e.cpu_time_total / 1000 for e in events if e.key in PHASES}
    loop_ms = sum(phase_ms.values())
    lines = [f"{args.tag}: {args.iterations} iterations, {wall:.1f} s wall; phases (ms per iteration):"]
    lines += [f"  {k:<14} {v / args.iterations:8.1f}  ({v / loop_ms:5.1%})" for k, v in phase_ms.items()]
    tables = {}
    for phase in PHASES:  # the operators under each phase: profile again grouped by the phase's stack
        inside = [e for e in prof.events() if _under(e, phase)]
        totals: dict[str, float] = {}
        for e in inside:
            totals[e.name] = totals.get(e.name, 0.0) + e.self_cpu_time_total / 1000
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
        tables[phase] = {k: v / args.iterations for k, v in top}
        lines.append(f"{phase}: top operators by self CPU (ms per iteration)")
        lines += [f"  {k:<48} {v / args.iterations:8.2f}" for k, v in top]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"ppo_profile-{args.tag}.txt").write_text(
        text + "\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
    )
    path = RESULTS / "ppo_profile.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[args.tag] = {
        "overrides": overrides,
        "iterations": args.iterations,
        "phase_ms_per_iteration": {k: v / args.iterations for k, v in phase_ms.items()},
        "top_ops_ms_per_iteration": tables,
        "samples_per_second_unprofiled_phases": 32 * len(r.history) / r.metrics["ppo/train_seconds"],
    }
    write_results("ppo_profile", {"runs": runs})


def _under(event, phase: str) -> bool:
    """Whether a profiler event ran inside the `phase` record_function range."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == phase:
            return True
        parent = parent.cpu_parent
    return False


if __name__ == "__main__":
    main()
