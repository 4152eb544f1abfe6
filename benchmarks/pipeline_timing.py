"""End-to-end `rlhf run` on the demo in a fresh project dir: total wall time, per-stage wall time
(from the MLflow child runs), and the share spent outside the stages (Prefect server start, task
orchestration, parent-run tracking, data preparation).

    .venv/bin/python benchmarks/pipeline_timing.py [extra overrides...]

Writes benchmarks/results/pipeline_timing.json.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_results  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="rlhf-pipeline-"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    overrides = [f"root={root}", *sys.argv[1:]]
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    t = time.perf_counter()
    proc = subprocess.run([rlhf, "run", *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    total = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"rlhf run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")

    import mlflow

    from components import tracking
    from components.config import compose

    cfg = compose(overrides)
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    parent = next(r for r in runs if r.data.tags.get("pipeline") == "retrain")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    in_stages = sum(stages.values())
    parent_wall = (parent.info.end_time - parent.info.start_time) / 1000
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"{name:>10}: {seconds:6.1f} s  ({seconds / total:5.1%})")
    print(f"{'in stages':>10}: {in_stages:6.1f} s of {total:.1f} s total wall ({in_stages / total:.1%}); "
          f"outside the stages (Prefect server start, orchestration, parent-run tracking, data prep): "
          f"{total - in_stages:.1f} s ({1 - in_stages / total:.1%})")
    write_results("pipeline_timing", {"overrides": overrides[1:], "total_wall_s": total, "parent_run_wall_s": parent_wall,
                                      "stages_s": stages, "in_stages_s": in_stages,
                                      "outside_stages_share": 1 - in_stages / total})


if __name__ == "__main__":
    main()
