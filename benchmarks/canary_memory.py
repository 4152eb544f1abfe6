"""Peak memory of serving a canary's two arms (issue 41): one process with both on one shared base, one process with
two copies, and two processes, one per arm. Each configuration runs in its own subprocess (peak RSS from
`resource.getrusage`, which sees torch's tensors: tracemalloc does not), loads the arms from the registry and answers
one best-of-2 request per arm.

The arms are the project's champion loaded twice: two versions of one incremental retrain line share the base (the
champion's SFT) and differ only in adapters of the same size, so the memory is the same. Needs a project with a
champion that bundles its reward model (`make run` makes one).

    .venv/bin/python benchmarks/canary_memory.py --root .      # the repo's own `make run` project

Writes benchmarks/results/canary_memory.json and prints a table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_tagged  # noqa: E402

CHILD = r"""
import json, os, resource, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
uri, arms = sys.argv[2], int(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
models = [mlflow.pyfunc.load_model(uri) for _ in range(arms)]
for m in models:
    m.predict(["The film was", "My new kettle"], params={"max_new_tokens": 24, "seed": 0, "n": 2})
shared = len({id(m.unwrap_python_model().model) for m in models}) < len(models)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "import_rss_mb": before / 1024, "shared": shared}))
"""


def child(tracking_uri: str, uri: str, arms: int, share: bool) -> dict:
    env = {**os.environ, "RLHF_SHARE_BASE": "1" if share else "0"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, tracking_uri, uri, str(arms)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=".", help="a project with a champion (make run)")
    ap.add_argument("--tag", default="latest")
    args = ap.parse_args()
    from components import tracking
    from components.config import compose_project
    from components.registry.registry import CHAMPION, alias_version

    cfg = compose_project([f"root={Path(args.root).resolve()}"])
    uri_tracking = tracking.tracking_uri(cfg)
    import mlflow

    mlflow.set_tracking_uri(uri_tracking)
    name = cfg.tracking.registered_model_name
    version = alias_version(name, CHAMPION)
    if version is None:
        sys.exit(f"no champion of {name} in {args.root}: run `make run` first")
    uri = f"models:/{name}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(uri))
    base_mb = max((f.stat().st_size for f in local.rglob("*.safetensors")), default=0) / 2**20  # the largest: the base
    one = child(uri_tracking, uri, 1, share=False)
    copies = child(uri_tracking, uri, 2, share=False)
    shared = child(uri_tracking, uri, 2, share=True)
    row = {
        "model": cfg.model.name,
        "base_weights_mb": round(base_mb, 1),
        "one_arm_process_mb": round(one["peak_rss_mb"], 1),
        "two_processes_mb": round(2 * one["peak_rss_mb"], 1),
        "one_process_two_copies_mb": round(copies["peak_rss_mb"], 1),
        "one_process_shared_base_mb": round(shared["peak_rss_mb"], 1),
        "shared": shared["shared"],
    }
    print(json.dumps(row, indent=1))
    write_tagged("canary_memory", args.tag, row)


if __name__ == "__main__":
    main()
