"""benchmarks/gpu_ppo.py's CPU path: the same script a GPU runs, on a few-layer model of the same family."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_ppo_benchmark_reports_throughput_flops_and_memory(tmp_path):
    out = tmp_path / "gpu_ppo.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_ppo.py",
            "--shape=tiny",
            "--iterations=2",
            f"--out={out}",
            "--set",
            "ppo.batch_size=8",
            "ppo.minibatch_size=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["shape"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["parameters"] > 0 and r["batch_size"] == 8
    assert r["tokens_per_second"] > 0 and r["response_tokens_per_second"] > 0
    assert r["achieved_tflops"] > 0
    assert r["mfu"] is None  # no peak FLOP/s known for a CPU
    assert r["memory"]["peak_rss_mb"] > 0
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout


def test_the_mfu_divides_by_the_given_peak(tmp_path):
    """--peak-tflops makes an MFU on any device: achieved / peak."""
    out = tmp_path / "gpu_ppo.json"
    subprocess.run(
        [sys.executable, "benchmarks/gpu_ppo.py", "--shape=tiny", "--iterations=2", "--peak-tflops=1", f"--out={out}"]
        + ["--set", "ppo.batch_size=4", "ppo.minibatch_size=4", "ppo.max_new_tokens=4"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    r = json.loads(out.read_text())
    assert r["peak_tflops"] == 1.0 and abs(r["mfu"] - r["achieved_tflops"]) < 1e-12
