"""What the data path costs as a data set grows (issue 40): an ingest into 10k, 100k and 1M comparisons.

A project of its own (`data=own`) under a temp dir. Its data set is one shard of N synthetic pairwise comparisons
(unique prompts, as a team's would be), versioned with `dvc add`. Then, each in a fresh subprocess (peak RSS is the
process's own), at each size:

    index      the first ingest's index of the N rows (components/data/index.py): once per shard, ever
    ingest 1k  components.data.ingest.ingest of a 1k batch: validated against the index (duplicates, ids, eval
               leakage), written as a shard, `dvc add` + push
    ingest 100k  the same with a 100k batch
    validate   the retrain's validation of the new version (flows/stages.validate: validate_dataset over every row;
               a version that passed before is reused, not measured here)

The Prefect flow around an ingest and the command's start (imports, a temporary Prefect server) are measured once,
end to end, by `rlhf ingest` of 1k comparisons into the demo (`--cli`).

Writes benchmarks/results/data_scale.json and prints a table.

    .venv/bin/python benchmarks/data_scale.py                    # 10k, 100k, 1M
    .venv/bin/python benchmarks/data_scale.py --sizes 10000      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "data_scale.json"

MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
from components.config import compose
root, what, arg = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = compose([f"root={root}", "data=own", "infra.dvc_push=true"])
from components.data.ingest import ingest
from components.data.validation import validate_dataset
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
if what == "ingest":
    r = ingest(cfg, Path(arg), "preferences")
    out = {"rows": r.n_good, "refused": r.n_bad}
else:
    report = validate_dataset(cfg.data_path, cfg.data, cfg.state_path / "gx")
    out = {"rows": sum(report.rows.values()), "ok": report.ok}
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["rss_growth_mb"] = out["peak_rss_mb"] - rss0
print("RESULT " + json.dumps(out))
"""


def rows(start: int, n: int, tag: str) -> list[str]:
    return [
        json.dumps(
            {
                "id": f"{tag}-{i}",
                "prompt": f"How do I set up device number {i} of batch {tag}?",
                "chosen": f"Open the settings of device {i}, choose setup and follow the three steps shown.",
                "rejected": f"Device {i} cannot be set up.",
            }
        )
        for i in range(start, start + n)
    ]


def measure(root: Path, what: str, arg: str = "") -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), what, arg], capture_output=True, text=True, timeout=7200
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def project(where: Path, n: int) -> Path:
    """A `data=own` project whose data set is one shard of n comparisons, 100 eval prompts and 100 prompts."""
    from components.config import compose
    from components.data.versioning import add_and_push, open_repo

    root = where / f"n{n}"
    cfg = compose([f"root={root}", "data=own"])
    (cfg.data_path / "preferences").mkdir(parents=True)
    (cfg.data_path / "preferences" / "base.jsonl").write_text("\n".join(rows(0, n, "base")) + "\n")
    for kind in ("eval", "prompts"):
        (cfg.data_path / kind).mkdir()
        body = [json.dumps({"id": f"{kind}-{i}", "prompt": f"A {kind} question number {i}?"}) for i in range(100)]
        (cfg.data_path / kind / "base.jsonl").write_text("\n".join(body) + "\n")
    add_and_push(cfg, open_repo(cfg))
    return root


def cli_ingest(where: Path) -> dict:
    """`rlhf ingest` of 1k comparisons into the demo, end to end, as a user runs it (a temporary Prefect server)."""
    root = where / "demo"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    subprocess.run([rlhf, "data", "data=demo"], cwd=root, env=env, check=True, capture_output=True)
    batch = where / "demo-1k.jsonl"
    batch.write_text("\n".join(rows(0, 1000, "cli")) + "\n")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", rlhf, "ingest", str(batch), "--kind", "preferences"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    rss = next((ln.split(":")[1].strip() for ln in proc.stderr.splitlines() if "Maximum resident" in ln), "0")
    return {"seconds": seconds, "peak_rss_mb": int(rss) / 1024, "ok": proc.returncode == 0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--no-cli", action="store_true")
    args = p.parse_args()
    results: dict = {"machine": f"{os.cpu_count()} cores", "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        where = Path(tmp)
        for n in map(int, args.sizes.split(",")):
            root = project(where, n)
            small, large = where / f"b1k-{n}.jsonl", where / f"b100k-{n}.jsonl"
            small.write_text("\n".join(rows(0, 1000, f"small{n}")) + "\n")
            large.write_text("\n".join(rows(0, 100_000, f"large{n}")) + "\n")
            warm = where / f"warm-{n}.jsonl"
            warm.write_text("\n".join(rows(0, 10, f"warm{n}")) + "\n")
            res = {"index": measure(root, "ingest", str(warm))}  # builds the index of the N rows once
            res["ingest_1k"] = measure(root, "ingest", str(small))
            res["ingest_100k"] = measure(root, "ingest", str(large))
            res["validate"] = measure(root, "validate")
            results["sizes"][str(n)] = res
            print(
                f"{n:>8} rows: "
                + ", ".join(f"{k} {v['seconds']:.1f} s {v['peak_rss_mb']:.0f} MB" for k, v in res.items())
            )
        if not args.no_cli:
            results["cli_ingest_1k_demo"] = cli_ingest(where)
            c = results["cli_ingest_1k_demo"]
            print(f"rlhf ingest 1k into the demo, end to end: {c['seconds']:.1f} s, {c['peak_rss_mb']:.0f} MB")
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
