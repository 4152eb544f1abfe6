"""Registry and serving with real MLflow (SQLite): a policy is logged as a self-contained pyfunc,
registered, aliased, promoted, rolled back; `mlflow models serve` answers /invocations."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from components import tracking
from components.registry.registry import CHALLENGER, CHAMPION, alias_version, log_and_register, promote, rollback

NAME = "test-policy"


@pytest.fixture(scope="module")
def registry(stages):
    """Two registered versions of the SFT policy (base + SFT adapter)."""
    tracking.setup(stages.cfg)
    adapter = str(Path(stages.root) / "sft" / "adapter")
    versions = []
    for i in range(2):
        with mlflow.start_run(run_name=f"register-{i}"):
            versions.append(log_and_register(NAME, stages.base_dir, adapter, {"data_version": "v1", "try": str(i)}))
    return stages, versions


def test_register_promote_and_rollback(registry):
    _, (v1, v2) = registry
    assert alias_version(NAME, CHALLENGER) == v2.version  # the newest registered version is the challenger
    assert alias_version(NAME, CHAMPION) is None
    with pytest.raises(ValueError, match="no champion"):
        rollback(NAME)
    assert promote(NAME, v1.version, approver="auto") is None
    assert promote(NAME, v2.version, approver="alice") == v1.version
    version = mlflow.MlflowClient().get_model_version(NAME, v2.version)
    assert version.tags["approver"] == "alice" and version.tags["previous_champion"] == v1.version
    assert version.tags["data_version"] == "v1"
    assert rollback(NAME) == (v2.version, v1.version)
    assert alias_version(NAME, CHAMPION) == v1.version


def test_cli_rollback(registry, capsys):
    from flows.cli import main

    stages, (v1, v2) = registry
    overrides = [f"root={stages.root}", f"tracking.registered_model_name={NAME}"]
    promote(NAME, v1.version, approver="a")
    assert main(["rollback", *overrides]) == 1  # v1 replaced no earlier champion
    assert "nothing to roll back to" in capsys.readouterr().err
    promote(NAME, v2.version, approver="b")
    assert main(["rollback", *overrides]) == 0
    assert f"moved from v{v2.version} back to v{v1.version}" in capsys.readouterr().out
    assert alias_version(NAME, CHAMPION) == v1.version


def test_registered_model_is_self_contained_and_generates(registry):
    _, (v1, _) = registry
    model = mlflow.pyfunc.load_model(v1.model_uri)
    out = model.predict(pd.DataFrame({"prompt": ["The film was", "These headphones"]}), params={"seed": 0, "max_new_tokens": 8})
    assert list(out.columns) == ["response"] and len(out) == 2 and all(isinstance(r, str) for r in out["response"])
    again = model.predict(pd.DataFrame({"prompt": ["The film was", "These headphones"]}), params={"seed": 0, "max_new_tokens": 8})
    assert out.equals(again), "a seed makes generation reproducible"
    assert len(model.predict(["One prompt"], params={"temperature": 0.0, "max_new_tokens": 4})) == 1
    local = Path(mlflow.artifacts.download_artifacts(v1.model_uri))
    weights = {p.suffix for p in local.rglob("*") if p.is_file()}
    assert ".safetensors" in weights and not ({".bin", ".pt", ".pkl"} & weights), "safetensors only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_mlflow_models_serve_answers_invocations(registry):
    stages, (v1, _) = registry
    promote(NAME, v1.version, approver="test")
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(stages.cfg),
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    mlflow_bin = str(Path(venv_bin) / "mlflow")
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{NAME}@{CHAMPION}", "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"server did not start:\n{proc.stdout.read().decode()[-3000:]}")
                time.sleep(1)
        params = {"max_new_tokens": 8, "seed": 0}
        records = post(port, {"dataframe_records": [{"prompt": "The film was"}, {"prompt": "My new kettle"}], "params": params})
        split = post(port, {"dataframe_split": {"columns": ["prompt"], "data": [["The film was"], ["My new kettle"]]}, "params": params})
        plain = post(port, {"inputs": ["The film was", "My new kettle"], "params": params})
        for answer in (records, split, plain):
            rows = answer["predictions"]
            assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows), answer
        assert records == split == plain, "the same prompts and seed give the same text whatever the input format"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
