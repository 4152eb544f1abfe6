"""benchmarks/gpu_suite.sh, the one script a device call runs, on CPU in its tiny shape: stages, then PPO and TRL's
RLOOTrainer side by side with marginal samples/s from two run lengths, then PPO with the static KV cache."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_suite_runs_on_cpu_in_its_tiny_shape(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "SUITE_OUT": str(out)}
    env.pop("OUT", None)
    args = ["--shape", "tiny", "--batches", "8", "--lengths", "1", "2", "--stage-steps", "2"]
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["shape"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32" and r["skipped"] == []
    assert {"sft", "reward", "ppo"} <= set(r["stages"])
    assert all(s["tokens_per_second"] > 0 for s in r["stages"].values())
    assert r["stages"]["ppo"]["achieved_tflops"] > 0 and r["stages"]["ppo"]["mfu"] is None  # no CPU peak known
    (row,) = r["side_by_side"]
    assert row["batch"] == 8 and row["lengths"] == [1, 2]
    for side in ("ppo", "trl_rloo"):  # the marginal rate: batch x the extra iterations / the extra seconds
        short, long = row[side]["seconds"]
        assert short > 0 and long > 0, row
        assert row[side]["samples_per_second"] == (8 / (long - short) if long > short else None), row
    rates = [row[side]["samples_per_second"] for side in ("ppo", "trl_rloo")]
    assert row.get("speedup") == (rates[0] / rates[1] if all(rates) else None)
    short, long = row["ppo_static"]["seconds"]  # then PPO again with the static KV cache
    assert row["ppo_static"]["samples_per_second"] == (8 / (long - short) if long > short else None), row
    table = out.with_suffix(".md").read_text()
    assert "| 8 |" in table and "TRL RLOO samples/s" in table and "static cache" in table
    assert f"wrote {out}" in proc.stdout


def test_a_part_past_the_time_budget_is_skipped_and_said(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "SUITE_OUT": str(out), "SUITE_BUDGET_S": "0"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--shape", "tiny", "--batches", "8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["skipped"] == ["stages", "side_by_side batch 8"] and r["side_by_side"] == []
    assert "skipped (time budget): stages, side_by_side batch 8" in out.with_suffix(".md").read_text()
