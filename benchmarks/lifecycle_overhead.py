"""What crash safety costs a retrain: ending orphans, taking and releasing the retrain slot, freeing a dead
holder's slot, and pinning a data snapshot (service/lifecycle.py, service/slot.py, components/data/versioning.py).

Runs on a fresh project with its own temporary Prefect server and SQLite MLflow; prints the numbers and
writes them to benchmarks/results/lifecycle_overhead.json.

    .venv/bin/python benchmarks/lifecycle_overhead.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "lifecycle_overhead.json"


def timed(fn, repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "max_s": max(times)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlhf-lifecycle-bench-")) / "proj"
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    from components.config import compose
    from service.env import configure_environment

    cfg = compose([f"root={root}", "data=demo_small"])
    os.environ.pop("PREFECT_API_URL", None)
    configure_environment(cfg)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    from components import tracking
    from components.data.versioning import ensure_data, pinned_data
    from components.owner import HOST, Owner, _start_time
    from service.lifecycle import reap_orphans, slot_name
    from service.slot import Holder, RetrainSlot

    tracking.setup(cfg)
    ensure_data(cfg)
    quiet = lambda _msg: None  # noqa: E731
    slot = RetrainSlot(cfg, quiet)

    def take_and_release():
        slot.acquire()
        slot.release()

    def free_dead_holder():
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        dead = Owner(HOST, proc.pid, _start_time(proc.pid) or 0.0)
        proc.wait()
        with get_client(sync_client=True) as client:
            client.create_variable(
                VariableCreate(name=slot_name(cfg), value=Holder("x", "", "", str(dead), 0, 0).__dict__)
            )
        take_and_release()

    def snapshot():
        import shutil

        shutil.rmtree(cfg.state_path / "snapshots", ignore_errors=True)
        pinned_data(cfg)

    take_and_release()  # warm up the temporary server
    results = {
        "reap_orphans (nothing to end)": timed(lambda: reap_orphans(cfg, quiet), args.repeats),
        "slot: take + release (free slot)": timed(take_and_release, args.repeats),
        "slot: free a dead holder, take + release": timed(free_dead_holder, args.repeats),
        "pinned_data: snapshot of demo_small (new)": timed(snapshot, args.repeats),
        "pinned_data: snapshot exists": timed(lambda: pinned_data(cfg), args.repeats),
    }
    data_bytes = sum(f.stat().st_size for f in cfg.data_path.rglob("*") if f.is_file())
    out = {"repeats": args.repeats, "data_bytes": data_bytes, "results": results}
    for name, r in results.items():
        print(f"{name:<45} median {r['median_s'] * 1000:7.1f} ms   max {r['max_s'] * 1000:7.1f} ms")
    print(f"(data/ of demo_small: {data_bytes / 1e6:.2f} MB)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
