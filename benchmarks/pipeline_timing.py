"""End-to-end `rlhf run` on the demo in a fresh project dir: total wall time, per-stage wall time
(from the MLflow child runs), and the share spent outside the stages (Prefect server start, task
orchestration, parent-run tracking, data preparation). Then a second run with only a gate threshold
changed: SFT, RM and PPO come from Prefect's cache, so it measures what a cached rerun costs.

    .venv/bin/python benchmarks/pipeline_timing.py [--tag NAME] [extra overrides...]
    PYTHONPATH=/path/to/older/checkout .venv/bin/python benchmarks/pipeline_timing.py --tag before   # its code

Writes benchmarks/results/pipeline_timing.json (under --tag, default "latest"; other tags are kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, write_results  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    tag = "latest"
    if "--tag" in args:
        i = args.index("--tag")
        tag, args = args[i + 1], args[:i] + args[i + 2 :]
    root = Path(tempfile.mkdtemp(prefix="rlhf-pipeline-"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    overrides = [f"root={root}", *args]
    total = rlhf_run(overrides)
    rerun_overrides = [*overrides, "gate.min_win_rate=0.5"]  # a new config hash, the same stage inputs
    rerun = rlhf_run(rerun_overrides)

    import mlflow

    from components import tracking
    from components.config import compose

    cfg = compose(overrides)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    parent, latest = sorted(
        (r for r in runs if r.data.tags.get("pipeline") == "retrain"), key=lambda r: r.info.start_time
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    in_stages = sum(stages.values())
    parent_wall = (parent.info.end_time - parent.info.start_time) / 1000
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"{name:>10}: {seconds:6.1f} s  ({seconds / total:5.1%})")
    print(
        f"{'in stages':>10}: {in_stages:6.1f} s of {total:.1f} s total wall ({in_stages / total:.1%}); "
        f"outside the stages (Prefect server start, orchestration, parent-run tracking, data prep): "
        f"{total - in_stages:.1f} s ({1 - in_stages / total:.1%})"
    )
    cached = sorted(k.split(".", 1)[1] for k in latest.data.tags if k.startswith("cached."))
    print(
        f"rerun with only gate.min_win_rate changed: {rerun:.1f} s total wall; stages from Prefect's cache: "
        f"{', '.join(cached) or 'none'}"
    )
    import components

    path = RESULTS / "pipeline_timing.json"
    results = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    results[tag] = {
        "code": str(Path(components.__file__).resolve().parents[1]),
        "overrides": overrides[1:],
        "total_wall_s": total,
        "parent_run_wall_s": parent_wall,
        "stages_s": stages,
        "in_stages_s": in_stages,
        "outside_stages_share": 1 - in_stages / total,
        "cached_rerun_wall_s": rerun,
        "cached_rerun_stages": cached,
    }
    write_results("pipeline_timing", {"runs": results})


def rlhf_run(overrides: list[str]) -> float:
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    t = time.perf_counter()
    proc = subprocess.run(
        [rlhf, "run", *overrides], cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    if proc.returncode:
        sys.exit(f"rlhf run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
