"""The whole `rlhf run model.dtype=bfloat16` on demo_small, as a user runs it (the session's Prefect server
and demo base, SQLite MLflow, the default stage settings): it completes, raises the held-out reward over the SFT policy, passes the
default gate, and registers a champion whose weights are bf16 and which serves in bf16."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
from safetensors import safe_open

from components.tracking import tracking_uri
from tests.conftest import make_project


def test_a_bf16_run_completes_learns_registers_and_serves_in_bf16(tmp_path, prefect_server, stages):
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "proj"
    # the session's demo base (a real model is downloaded, not built): SFT, RM, PPO, registry and serving in bf16
    base = ("model.build_demo_base=false", f"model.name_or_path={stages.base_dir}")
    cfg = make_project(root, "model.dtype=bfloat16", "tracking.registered_model_name=bf16-run", *base)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("rlhf")),
            "run",
            f"root={root}",
            "data=demo_small",
            "model.dtype=bfloat16",
            "tracking.registered_model_name=bf16-run",
            f"infra.prefect_api_url={PREFECT_API_URL.value()}",  # the session's server: no start-up of its own
            *base,
        ],
        cwd=root,
        env={**env, "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    held_out = re.search(r"PPO on (\d+) held-out prompts: reward ([-+][\d.]+) \(SFT ([-+][\d.]+)\)", proc.stdout)
    assert held_out, proc.stdout[-3000:]
    reward, sft = float(held_out[2]), float(held_out[3])
    assert reward > sft + 0.3, f"held-out reward {reward} vs SFT {sft}: bf16 PPO must raise it"
    assert "gate PASSED" in proc.stdout and "registered bf16-run version 1, alias champion" in proc.stdout

    mlflow.set_tracking_uri(tracking_uri(cfg))
    version = mlflow.MlflowClient().get_model_version_by_alias("bf16-run", "champion")
    assert str(version.version) == "1"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/bf16-run/{version.version}", dst_path=str(tmp_path)))
    weights = next(local.rglob("model.safetensors"))  # the base (SFT weights); adapters are adapter_model.*
    with safe_open(str(weights), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}, dtypes
    served = mlflow.pyfunc.load_model("models:/bf16-run@champion")
    assert str(served.unwrap_python_model().model.get_base_model().dtype) == "torch.bfloat16"
    answer = served.predict(["The film was", "My new kettle"], params={"n": 2, "seed": 0, "max_new_tokens": 8})
    assert len(answer) == 2 and answer["score"].notna().all(), answer
    assert json.loads(json.dumps(answer["response"].tolist()))  # plain strings
