"""What `rlhf ingest --from-traces` costs as traffic grows (issue 38): the harvest of judged served answers.

A project of its own (SQLite MLflow under a temp dir). The first `--template` answers (200) are traced and signed by
the serving process's own Tracer, in requests of 16 prompts, and `judged_share` of them judged by raters through the
served app's FeedbackDesk (signed assessments, as POST /feedback writes them). Exporting a trace to SQLite costs
15-45 ms on this machine, so the rest of the N answers are copies of those rows made in SQL: every row of the trace
(trace_info, tags, metadata, spans, assessments) with a new trace id, a new prompt number and the signatures
recomputed for them, i.e. exactly what serving would have written. Then, each in a fresh subprocess (peak RSS is the
process's own), at checkpoints of the traffic served:

    harvest     flows.ingest.traces_to_file: MLflow's assessment filter, pages of registry.feedback.page_size
                judged traces, signatures verified, the harvest's rules; the batch file written
    load all    what the harvest did before issue 38: mlflow.search_traces over every trace, spans included

Writes benchmarks/results/harvest.json and prints a table.

    .venv/bin/python benchmarks/harvest.py                 # 100k answers, 10% judged
    .venv/bin/python benchmarks/harvest.py --answers 2000  # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "harvest.json"

MEASURE = r"""
import json, resource, sys, time
from components.config import compose
import mlflow
from components import tracking
from flows.ingest import traces_to_file
cfg = compose(json.loads(sys.argv[1]))
tracking.setup(cfg)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports and the store opened: the floor
t0 = time.perf_counter()
if sys.argv[2] == "harvest":
    batch = traces_to_file(cfg)
    out = {"rows": len(batch.harvest.rows), "judged": batch.harvest.judged}
else:
    traces = mlflow.search_traces(locations=[tracking.serving_experiment(cfg)], return_type="list")
    out = {"traces": len(traces)}
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["rss_growth_mb"] = out["peak_rss_mb"] - rss0
print("RESULT " + json.dumps(out))
"""


def measure(overrides: list[str], what: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(overrides), what], capture_output=True, text=True, timeout=7200
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def clone(db: Path, templates: list[str], start: int, count: int, keyring) -> None:
    """Copy the template traces' rows `count` times as answers start..start+count-1 (see the module docstring)."""
    import base64
    import json as _json
    import sqlite3
    import uuid

    from components.registry import provenance

    kid, secret = keyring.signer()
    con = sqlite3.connect(db)
    tables = ("trace_info", "trace_tags", "trace_request_metadata", "spans", "assessments")
    idcol = {"trace_info": "request_id", "trace_tags": "request_id", "trace_request_metadata": "request_id"}
    rows = {}
    for t in tables:
        col = idcol.get(t, "trace_id")
        cols = [r[1] for r in con.execute(f"pragma table_info({t})")]
        marks = ",".join("?" * len(cols))
        got = con.execute(
            f"select {','.join(cols)} from {t} where {col} in ({','.join('?' * len(templates))})", templates
        ).fetchall()
        rows[t] = (cols, marks, col, got)
    info = {r[0]: r for r in rows["trace_info"][3]}
    ts0 = max(r[rows["trace_info"][0].index("timestamp_ms")] for r in info.values())
    batches: dict[str, list] = {t: [] for t in tables}
    for k in range(count):
        n = start + k
        old = templates[n % len(templates)]
        new = "tr-" + uuid.uuid4().hex
        old_b64 = base64.b64encode(bytes.fromhex(old[3:])).decode()
        new_b64 = base64.b64encode(bytes.fromhex(new[3:])).decode()
        old_num = f"Review {int(info[old][rows['trace_info'][0].index('request_preview')].split('Review ')[1][:6]):06d}"
        new_num = f"Review {n:06d}"

        def swap(v, old=old, new=new, old_b64=old_b64, new_b64=new_b64, old_num=old_num, new_num=new_num):
            if isinstance(v, str):
                return v.replace(old, new).replace(old[3:], new[3:]).replace(old_b64, new_b64).replace(old_num, new_num)
            return v

        for t in tables:
            cols, _, col, got = rows[t]
            for r in got:
                if r[cols.index(col)] != old:
                    continue
                r = [swap(v) for v in r]
                if t == "trace_info":
                    r[cols.index("timestamp_ms")] = ts0 + 1 + n
                if t == "spans":
                    doc = _json.loads(r[cols.index("content")])
                    attrs = doc["attributes"]
                    span_in = _json.loads(attrs["mlflow.spanInputs"])
                    span_out = _json.loads(attrs["mlflow.spanOutputs"])
                    fields = provenance.answer_fields(
                        new, span_in["prompt"], span_out["response"], "1", span_in["params"]
                    )
                    attrs["rlhf.signature"] = _json.dumps(provenance.sign(kid, secret, provenance.ANSWER, fields))
                    r[cols.index("content")] = _json.dumps(doc)
                if t == "assessments":
                    r[cols.index("assessment_id")] = "a-" + uuid.uuid4().hex
                    r[cols.index("trace_timestamp_ms")] = ts0 + 1 + n
                    meta = _json.loads(r[cols.index("assessment_metadata")])
                    rating = float(meta["rating"]) if "rating" in meta else None
                    value = _json.loads(r[cols.index("value")])
                    fields = provenance.vote_fields(
                        new, r[cols.index("source_id")], value, rating, int(meta["rlhf.at_ms"])
                    )
                    meta["rlhf.signature"] = provenance.sign(kid, secret, provenance.VOTE, fields)
                    r[cols.index("assessment_metadata")] = _json.dumps(meta)
                batches[t].append(r)
    for t in tables:
        cols, marks, _, _ = rows[t]
        con.executemany(f"insert into {t} ({','.join(cols)}) values ({marks})", batches[t])
    con.commit()
    con.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=100_000)
    parser.add_argument("--judged-share", type=float, default=0.1)
    parser.add_argument("--template", type=int, default=200, help="answers served for real; the rest are copies")
    parser.add_argument("--checkpoints", type=int, default=4, help="harvests measured along the way")
    parser.add_argument("--no-load-all", action="store_true", help="skip the pre-issue-38 full load")
    args = parser.parse_args()

    import mlflow

    from components.data.versioning import ensure_data
    from service import keys
    from tests.conftest import make_project
    from tests.registry.signed_answers import serving_desk

    root = Path(tempfile.mkdtemp(prefix="rlhf-harvest-")) / "proj"
    overrides = ["data=demo_small", "registry.feedback.votes_per_rater_per_day=1000000000"]
    cfg = make_project(root, *overrides)
    ensure_data(cfg)
    raters = [f"rater{i}" for i in range(20)]
    desk = serving_desk(cfg, raters)
    every = max(1, round(1 / args.judged_share))
    t0 = time.perf_counter()
    templates: list[str] = []
    for start in range(0, args.template, 16):
        n = min(16, args.template - start)
        ids = desk.answer(
            [f"Review {start + i:06d}: the product was" for i in range(n)], [f"answer {start + i}" for i in range(n)]
        )
        for i, trace_id in enumerate(ids):
            if (start + i) % every == 0:
                got = desk.vote(raters[(start + i) % len(raters)], trace_id, (start + i) % 3 != 0)
                assert got.status == 200, got
        templates += ids
    mlflow.flush_trace_async_logging()
    real_s = time.perf_counter() - t0
    print(f"{args.template} answers served and {len(range(0, args.template, every))} judged for real in {real_s:.0f} s")
    marks = sorted({round(args.answers * (k + 1) / args.checkpoints) for k in range(args.checkpoints)})
    results, served = [], args.template
    ring = keys.load(cfg)
    for mark in marks:
        t_gen = time.perf_counter()
        if mark > served:
            clone(root / ".rlhf" / "mlflow.db", templates, served, mark - served, ring)
            served = mark
        row = {
            "answers": served,
            "judged": sum(1 for n in range(served) if (n % len(templates)) % every == 0),  # a copy as its template
            "fill_s": round(time.perf_counter() - t_gen, 1),
        }
        h = measure([f"root={root}", *overrides], "harvest")
        assert h["rows"] == row["judged"], (h, row)
        row |= {f"harvest_{k}": v for k, v in h.items()}
        if not args.no_load_all:
            full = measure([f"root={root}", *overrides], "load-all")
            row |= {f"load_all_{k}": v for k, v in full.items()}
        results.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "what": "rlhf ingest --from-traces: the harvest (traces_to_file) against loading every trace as before issue 38",
        "machine": "2-core CPU, SQLite MLflow store",
        "judged_share": args.judged_share,
        "page_size": cfg.registry.feedback.page_size,
        "real_answers": args.template,
        "real_answers_s": round(real_s, 1),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }
    if args.answers >= 100_000:
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{'answers':>8} {'judged':>7} {'harvest s':>10} {'+MB':>6} {'load-all s':>11} {'+MB':>6}")
    for r in results:
        print(
            f"{r['answers']:>8} {r['judged']:>7} {r['harvest_seconds']:>10.1f} {r['harvest_rss_growth_mb']:>6.0f} "
            f"{r.get('load_all_seconds', float('nan')):>11.1f} {r.get('load_all_rss_growth_mb', float('nan')):>6.0f}"
        )
    print("(seconds: the call alone; +MB: peak RSS above the process after its imports)")
    print(f"\nwrote {RESULTS}" if args.answers >= 100_000 else "\n(not written: fewer than 100k answers)")


if __name__ == "__main__":
    main()
