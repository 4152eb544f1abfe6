"""A killed retrain never blocks the next one: the real `rlhf run model.dtype=bfloat16`, as a user runs it (its own
temporary Prefect server, SQLite MLflow), SIGKILLed with its whole process group (as the OOM killer or a lost node
does) during PPO; the next plain `rlhf run` completes with no manual step, resumes PPO from its checkpoint, leaves
no RUNNING MLflow run, and registers a bf16 champion that serves in bf16. An ingest landing during that last run
does not change what it trains on. (The reward model's resume: tests/training/test_reward.py; each stage in bf16:
tests/training/test_dtypes.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from safetensors import safe_open

from components.data.versioning import data_version
from components.tracking import tracking_uri
from tests.conftest import OPEN_GATE, make_project

STAGES = (
    "model.dtype=bfloat16",
    "model.pretrain_steps=30",
    "sft.max_steps=10",
    "sft.save_steps=5",
    "reward.max_steps=60",
    "reward.save_steps=5",
    "reward.stats_max_responses=64",
    "ppo.steps=8",
    "ppo.save_every=2",
    "ppo.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.eval_max_prompts=8",
)


def start(root: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    with log.open("w") as fh:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("rlhf")), *extra],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**env, "TQDM_DISABLE": "1"},
            cwd=root,
            start_new_session=True,
        )


def kill_when(proc: subprocess.Popen, log: Path, pattern: str, root: Path, timeout: float = 600) -> Path:
    """SIGKILL the process group as soon as a checkpoint matching `pattern` exists under the stage dirs."""
    deadline = time.time() + timeout
    while True:
        found = sorted((root / ".rlhf" / "stages").glob(pattern))
        if found:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return found[0]
        assert proc.poll() is None, f"finished before the kill point {pattern}:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_sigkilled_runs_never_block_the_next_and_it_resumes(tmp_path):
    root = tmp_path / "proj"
    cfg = make_project(root, *STAGES, *OPEN_GATE, "tracking.registered_model_name=crash-test")
    run = ["run", f"root={root}", "data=demo_small", *STAGES, *OPEN_GATE, "tracking.registered_model_name=crash-test"]

    # 1. killed during PPO, after its first checkpoint
    log1 = tmp_path / "run1.log"
    kill_when(start(root, log1, *run), log1, "ppo-*/checkpoints/step-*", root)
    before = data_version(root)

    # 2. a plain rerun completes with no manual step; an ingest lands while it runs
    log3 = tmp_path / "run3.log"
    third = start(root, log3, *run)
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"late-{i}",
                    "prompt": f"A late prompt {i}",
                    "chosen": f"a fine answer {i}",
                    "rejected": f"a poor answer {i}",
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    while "this run reads its snapshot" not in log3.read_text():  # the run has pinned its data version
        assert third.poll() is None, log3.read_text()[-3000:]
        time.sleep(0.2)
    ingest = subprocess.run(
        [
            str(Path(sys.executable).with_name("rlhf")),
            "ingest",
            str(batch),
            "--kind",
            "preferences",
            f"root={root}",
            "data=demo_small",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")},
    )
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    assert third.wait(timeout=900) == 0, log3.read_text()[-5000:]
    text = log3.read_text()
    assert "freed the retrain slot" in text or "cleaned up after a crash" in text, text[-5000:]
    assert "registered crash-test version 1" in text, text[-3000:]

    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "no RUNNING run left behind"
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and all("ended without finishing" in r.data.tags["rlhf.ended_because"] for r in killed)
    assert {r.data.tags.get("stage") for r in killed} >= {"ppo"}

    def metric(stage: str, key: str) -> list[float]:
        return [
            r.data.metrics[key]
            for r in runs
            if r.data.tags.get("stage") == stage and r.info.status == "FINISHED" and key in r.data.metrics
        ]

    assert max(metric("ppo", "ppo/resumed_from_iteration")) > 0

    # the ingest landed mid-run, yet the run trained on, and is registered with, the version it pinned
    assert data_version(root) != before
    assert client.get_model_version("crash-test", "1").tags["data_version"] == before

    # bf16 throughout: the registered base weights, and the served model
    local = Path(mlflow.artifacts.download_artifacts("models:/crash-test/1", dst_path=str(tmp_path / "model")))
    with safe_open(str(next(local.rglob("model.safetensors"))), "pt") as f:  # the SFT weights; adapters: adapter_*
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    served = mlflow.pyfunc.load_model("models:/crash-test/1")
    assert str(served.unwrap_python_model().model.get_base_model().dtype) == "torch.bfloat16"
    answer = served.predict(["The film was", "My new kettle"], params={"n": 2, "seed": 0, "max_new_tokens": 8})
    assert len(answer) == 2 and answer["score"].notna().all(), answer
