"""Flows under a real Prefect test server, MLflow on SQLite, DVC in a tmp repo."""

import asyncio
import json
import time

import mlflow
import pytest

from cli.main import main
from components.data.versioning import data_version
from flows.ingest import DATA_UPDATED, ingest_flow
from flows.retrain import retrain

pytestmark = pytest.mark.usefixtures("prefect_server")


async def _events(name: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        r = await client.request("POST", "/events/filter", json={"filter": {"event": {"name": [name]}}, "limit": 50})
        return r.json()["events"]


def wait_for_event(name: str, version: str, timeout: float = 30.0, key=lambda e: e["payload"].get("data_version")):
    """The first `name` event whose key (by default its payload's data_version) is `version`, waiting up to timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in asyncio.run(_events(name)):
            if key(e) == version:
                return e
        time.sleep(1.0)
    raise AssertionError(f"no {name} event for {version}")


def test_retrain_records_a_validation_run_in_mlflow(project):
    state = retrain(project, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    parent = mlflow.get_run(summary.run_id)
    assert parent.data.tags["data_version"] == data_version(project.root_path)
    assert parent.data.params["data.n_demonstrations"] == "300"
    (data_input,) = parent.inputs.dataset_inputs  # the DVC-versioned data, digest = the md5 in data.dvc
    assert data_input.dataset.digest == data_version(project.root_path)[:36]
    assert {t.key: t.value for t in data_input.tags}["dvc_md5"] == data_version(project.root_path)
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{summary.run_id}'", output_format="list")
    (child,) = [c for c in children if c.data.tags.get("stage") == "validate"]
    assert child.data.metrics["data/valid"] == 1.0
    assert child.data.metrics["data/rows_demonstrations"] == 300
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id)}
    assert {"data_docs", "validation_report.txt"} <= artifacts
    # every training stage is a child run with its metrics; PPO curves go to MLflow as a plot
    stages = {c.data.tags.get("stage"): c for c in children}
    assert {"validate", "base", "sft", "reward", "ppo"} <= set(stages)
    assert "sft/eval_loss" in stages["sft"].data.metrics and "rm/eval_accuracy" in stages["reward"].data.metrics
    assert {"ppo/kl", "ppo/eval_reward", "ppo/eval_reward_ref"} <= set(stages["ppo"].data.metrics)
    assert stages["ppo"].data.params["ppo.steps"] == "2"
    assert "ppo_curves.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(stages["ppo"].info.run_id)}
    assert (project.root_path / summary.policy.dir / "adapter_model.safetensors").is_file()
    # what a person reads in the MLflow UI (issue 41): each stage run named by its retrain and the version it made,
    # the parent's one page with the gate table and the stages' curves, the version linked to its retrain
    retrain_name = parent.info.run_name.split(" ")[0]
    if (reg := summary.registered) is not None:
        ppo = mlflow.get_run(stages["ppo"].info.run_id)
        assert ppo.info.run_name == f"ppo · {retrain_name} → v{reg.version}", ppo.info.run_name
        assert ppo.data.tags["registered_version"] == reg.version
        description = mlflow.MlflowClient().get_model_version(reg.name, reg.version).description
        assert f"Trained by the retrain run [{retrain_name}" in description and summary.run_id in description
    page = mlflow.artifacts.load_text(f"runs:/{summary.run_id}/summary.md")
    assert (
        page.startswith(f"# {retrain_name}: ") and "## Gate\n\n```\ngate " in page and "- [ppo](#/experiments/" in page
    )
    assert "curves/ppo_ppo_curves.png" in {
        a.path for a in mlflow.MlflowClient().list_artifacts(summary.run_id, "curves")
    }


def test_ppo_divergence_fails_the_run_with_the_reason(tmp_path):
    from tests.conftest import make_project

    # a ceiling below zero is exceeded by any KL: the real divergence path, on the first iteration
    project = make_project(tmp_path / "proj", "ppo.kl_ceiling=-1")
    state = retrain(project, return_state=True)
    assert state.is_failed()
    assert "diverged" in state.message and "No policy was written" in state.message


def test_retrain_stops_on_bad_data(project):
    assert retrain(project, return_state=True).is_completed()
    # a bad shard versioned with dvc directly (bypassing ingest) must not get past validation
    with (project.data_path / "prompts" / "demo-000.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "prompt-000000", "prompt": "dup id"}) + "\n")
    from components.data.versioning import Dvc

    Dvc(project.root_path).add("data")
    state = retrain(project, return_state=True)
    assert state.is_failed()
    assert "ids_unique" in state.message and "no training ran" in state.message


def test_ingest_flow_emits_data_updated_with_new_version(project, tmp_path):
    from components.data.versioning import ensure_data

    ensure_data(project)
    rows = [{"id": f"x{i}", "prompt": f"Brand new review opening {i}", "response": "it was great."} for i in range(3)]
    f = tmp_path / "new.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = ingest_flow(project, str(f), "demonstrations", return_state=True)
    assert state.is_completed(), state.message
    version = data_version(project.root_path)
    assert state.result().version_after == version
    event = wait_for_event(DATA_UPDATED, version)
    assert event["payload"]["kind"] == "demonstrations" and event["payload"]["rows"] == 3


def test_cli_ingest_refuses_bad_batch_without_traceback(project, tmp_path, capsys):
    from components.data.versioning import ensure_data

    ensure_data(project)
    before = (project.root_path / "data.dvc").read_text()
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "1", "prompt": "Hello there", "chosen": "a", "rejected": "a"}\nnot json\n')
    code = main(["ingest", str(f), "--kind", "preferences", f"root={project.root_path}", "data=demo_small"])
    err = capsys.readouterr().err
    assert code == 1
    assert "chosen_differs_from_rejected" in err and "line 2" in err and "unchanged" in err
    assert "Traceback" not in err
    assert (project.root_path / "data.dvc").read_text() == before


def test_cli_validate_exit_codes(project, tmp_path, capsys):
    from components.data.versioning import ensure_data

    ensure_data(project)
    assert main(["validate", f"root={project.root_path}", "data=demo_small"]) == 0
    assert "all rules pass" in capsys.readouterr().out
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"id": "1", "prompt": "caf\xe9"}\n')
    assert main(["validate", str(f), f"root={project.root_path}", "data=demo_small"]) == 1
    out = capsys.readouterr().out
    assert "[utf8]" in out and "line 1" in out and "Traceback" not in out
    assert main(["validate", "data.n_eval=abc", f"root={project.root_path}"]) == 2


def test_a_policy_its_data_cannot_train_is_refused_before_any_model_loads(tmp_path, capsys):
    """Issue 29: comparisons only (no thumbs), `policy=kto`: one sentence naming the method the data supports; the
    base model, SFT and the reward model never start."""
    from cli.main import main

    root = tmp_path / "proj"
    overrides = [f"root={root}", "data=demo_small", "data.n_feedback=0", "policy=kto"]
    assert main(["run", *overrides]) == 1
    out = capsys.readouterr()
    said = out.out + out.err
    assert "policy=kto trains on thumbs up/down (data/feedback/) and this data version has 0 such rows" in said
    assert "or use policy=dpo, which trains on the 300 rows it has" in said and "Traceback" not in said
    assert not (root / ".rlhf" / "stages").exists() and not (root / ".rlhf" / "models").exists()
