"""A killed retrain never blocks the next one: the real `rlhf run`, as a user runs it (its own temporary
Prefect server, SQLite MLflow), SIGKILLed with its whole process group (as the OOM killer or a lost node
does) during the reward model, then during PPO; the next plain `rlhf run` completes with no manual step,
resumes each stage from its checkpoint and leaves no RUNNING MLflow run. An ingest landing during that
last run does not change what it trains on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from components.data.versioning import data_version
from components.tracking import tracking_uri
from tests.conftest import OPEN_GATE, make_project

STAGES = (
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

    # 1. killed during the reward model, after its first checkpoint
    log1 = tmp_path / "run1.log"
    kill_when(start(root, log1, *run), log1, "reward-model-*/checkpoints/step-*", root)
    # 2. the next run: resumes the reward model, killed during PPO after its first checkpoint
    log2 = tmp_path / "run2.log"
    kill_when(start(root, log2, *run), log2, "ppo-*/checkpoints/step-*", root)
    before = data_version(root)

    # 3. a plain rerun completes with no manual step; an ingest lands while it runs
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
    assert {r.info.run_name for r in killed} >= {"reward", "ppo"}

    def metric(stage: str, key: str) -> list[float]:
        return [
            r.data.metrics[key]
            for r in runs
            if r.info.run_name == stage and r.info.status == "FINISHED" and key in r.data.metrics
        ]

    assert metric("reward", "rm/resumed_from_step") == [5.0] or max(metric("reward", "rm/resumed_from_step")) > 0
    assert max(metric("ppo", "ppo/resumed_from_iteration")) > 0

    # the ingest landed mid-run, yet the run trained on, and is registered with, the version it pinned
    assert data_version(root) != before
    assert client.get_model_version("crash-test", "1").tags["data_version"] == before
