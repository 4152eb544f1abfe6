"""What a worker of another machine gets, without servers: data by DVC version from the remote alone, the
orchestrator's overrides minus its own paths, client credentials from a file outside the repo."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import ConfigError, compose
from components.data.versioning import DVC_FILE, DataVersionError, ensure_data, fetch_version
from flows.dispatch import remote_overrides
from service import credentials
from tests.conftest import make_project


def test_a_worker_fetches_a_data_version_from_the_dvc_remote_alone(tmp_path):
    orch = make_project(tmp_path / "orchestrator")
    state = ensure_data(orch)  # demo data, `dvc add` + push to <state>/dvc-remote
    before = (orch.root_path / DVC_FILE).read_text()
    worker = compose([f"root={tmp_path / 'worker'}", f"infra.dvc_remote_url={orch.state_path / 'dvc-remote'}"])

    got = fetch_version(worker, state.version)

    assert got.version == state.version and got.rows == state.rows and got.origin == "fetched"
    cmp = filecmp.dircmp(orch.data_path, got.path, ignore=[".snapshot-complete", ".gitignore"])
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files), cmp.report()
    assert Path(got.path).is_relative_to(worker.state_path)  # the worker's own state, nothing of the orchestrator
    assert (orch.root_path / DVC_FILE).read_text() == before
    assert fetch_version(worker, state.version).path == got.path  # fetched once, then read from the snapshot


def test_a_version_missing_from_the_remote_says_what_to_do(tmp_path):
    (tmp_path / "empty-remote").mkdir()
    worker = compose([f"root={tmp_path / 'worker'}", f"infra.dvc_remote_url={tmp_path / 'empty-remote'}"])
    with pytest.raises(DataVersionError, match="is not on the DVC remote .*RLHF_DVC_REMOTE"):
        fetch_version(worker, "0123456789abcdef0123456789abcdef.dir")
    assert not any(p.name.startswith(".") for p in (worker.state_path / "snapshots").iterdir())  # no leftovers


def test_a_worker_gets_the_overrides_but_not_the_orchestrators_paths_or_credentials(tmp_path):
    cfg = compose(
        [f"root={tmp_path}", "infra.state_dir=st", "infra=server", "ppo.steps=3", "++seed=1"]
        + ["infra.dvc_remote_url=https://user:s3cret@host/dvc"]
    )
    assert remote_overrides(cfg) == ["infra=server", "ppo.steps=3", "++seed=1"]


def test_a_lost_worker_is_retried_a_failed_stage_is_not():
    from prefect.states import Failed

    from flows.dispatch import StageFailed, StageLost
    from flows.stages import transient

    def state(exc):
        return Failed(data=exc)

    assert transient(None, None, state(StageLost("flow run crashed")))
    assert not transient(None, None, state(StageFailed("ValueError: bad data")))


def test_credentials_come_from_a_file_outside_the_repo_and_the_environment_wins(tmp_path, monkeypatch):
    cfg = compose([f"root={tmp_path / 'proj'}"])
    creds = tmp_path / "outside" / "credentials.env"
    creds.parent.mkdir()
    creds.write_text(
        "# a comment\nMLFLOW_TRACKING_USERNAME=alice\nMLFLOW_TRACKING_PASSWORD=from-file\n"
        "RLHF_DB_PASSWORD=server-side-only\nPREFECT_API_AUTH_STRING=alice:pw=with=equals\n"
    )
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "RLHF_DB_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    monkeypatch.setenv("RLHF_CREDENTIALS_FILE", str(creds))

    credentials.load(cfg)

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-env"
    assert os.environ["PREFECT_API_AUTH_STRING"] == "alice:pw=with=equals"
    assert "RLHF_DB_PASSWORD" not in os.environ  # a server's secret is not a client's


def test_a_credentials_file_inside_the_repo_is_refused(tmp_path, monkeypatch):
    cfg = compose([f"root={tmp_path}"])
    inside = tmp_path / "conf" / "credentials.env"
    inside.parent.mkdir()
    inside.write_text("MLFLOW_TRACKING_PASSWORD=x\n")
    monkeypatch.setenv("RLHF_CREDENTIALS_FILE", str(inside))
    with pytest.raises(ConfigError, match="inside the project .*outside any repository"):
        credentials.load(cfg)


def test_rlhf_worker_without_a_shared_prefect_server_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RLHF_"))}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("rlhf")), "worker", "--pool", "gpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "needs a shared Prefect server" in proc.stderr, proc.stderr


def test_a_worker_whose_conf_differs_from_the_orchestrators_is_named_key_by_key(tmp_path):
    from flows.dispatch import config_differences, config_digest

    orch = compose([f"root={tmp_path / 'o'}", "ppo.steps=3", "tracking.experiment=x", "infra=server"])
    same = compose([f"root={tmp_path / 'w'}", "ppo.steps=3"])  # where and how it tracks may differ
    other = compose([f"root={tmp_path / 'w'}", "ppo.steps=3", "gate.min_win_rate=0.9"])
    assert config_differences(config_digest(orch), same) == []
    assert config_differences(config_digest(orch), other) == ["gate.min_win_rate: orchestrator '0.52', worker '0.9'"]


# ---- what a worker reads from a request (issue 28, item 2): anyone who reaches the Prefect API can send one ----
def test_a_worker_reads_only_run_outputs_of_the_requesting_experiment_or_the_configured_model(tmp_path):
    import mlflow

    from components import tracking
    from flows.locations import UntrustedInput, check_input

    cfg = compose([f"root={tmp_path}", "tracking.experiment=worker-inputs"])
    tracking.setup(cfg)
    experiment = mlflow.get_experiment_by_name("worker-inputs").experiment_id
    with mlflow.start_run() as finished:
        pass
    running = mlflow.MlflowClient().create_run(experiment)  # still RUNNING
    other = mlflow.create_experiment("someone-else", artifact_location=str(tmp_path / "other-artifacts"))
    with mlflow.start_run(experiment_id=other) as elsewhere:
        pass
    ok = f"runs:/{finished.info.run_id}/output/merged"
    check_input("sft_dir", ok, cfg, experiment)
    check_input("base_path", cfg.model.name_or_path, cfg, experiment)  # the configured model itself
    refused = {
        "mlflow-artifacts://evil.example:5000/api/2.0/mlflow-artifacts/artifacts/x": "runs:/<run id>/output",
        "runs:/0123/output": "runs:/<run id>/output",  # not a run id
        f"runs:/{finished.info.run_id}/output/../../secrets": "runs:/<run id>/output",
        f"runs:/{finished.info.run_id}/checkpoints": "runs:/<run id>/output",
        "models:/rlhf-policy@champion": "runs:/<run id>/output",
        "/home/worker/.ssh/id_rsa": "runs:/<run id>/output",  # a worker-local path
        f"runs:/{'f' * 32}/output": "no such run",
        f"runs:/{elsewhere.info.run_id}/output": "not a finished run of the requesting retrain's experiment",
        f"runs:/{running.info.run_id}/output": "not a finished run of the requesting retrain's experiment",
    }
    for location, why in refused.items():
        with pytest.raises(UntrustedInput, match="refused: .*" + why.replace("(", r"\(")) as e:
            check_input("sft_dir", location, cfg, experiment)
        assert "\n" not in str(e.value)
    with pytest.raises(UntrustedInput, match="base_path='/etc' refused"):  # a path that is not the model
        check_input("base_path", "/etc", cfg, experiment)
    with pytest.raises(UntrustedInput):
        check_input("sft_dir", {"not": "a string"}, cfg, experiment)


def test_the_reuse_key_of_a_built_base_is_what_it_was_built_from_not_where(tmp_path):
    """The orchestrator looks a built demo base up by `reuse_key_of`; the worker tags it with the key of the config
    and data it actually used (a request carries no key): the same on both sides, whatever their paths."""
    from components.data.versioning import DataState
    from flows.caching import reuse_key_of, stage_key

    data = DataState("0123456789abcdef0123456789abcdef.dir", "generated", {}, "")
    orch = compose([f"root={tmp_path / 'o'}", "infra.training_pool=gpu", "infra.state_dir=st"])
    worker = compose([f"root={tmp_path / 'w'}", "infra.training_pool=null"])
    assert reuse_key_of("base", orch, data) == reuse_key_of("base", worker, data)
    assert stage_key("base", orch, data) != stage_key("base", worker, data)  # the local cache keeps paths apart
    bigger = compose([f"root={tmp_path / 'w'}", "model.pretrain_steps=7"])
    assert reuse_key_of("base", bigger, data) != reuse_key_of("base", worker, data)
    other = DataState("f" * 32 + ".dir", "generated", {}, "")
    assert reuse_key_of("base", worker, other) != reuse_key_of("base", worker, data)


@pytest.mark.usefixtures("prefect_server")
def test_a_stage_whose_worker_is_gone_is_crashed_and_retried_not_waited_for_forever():
    """Issue 28, item 6: Prefect OSS never crashes the flow run of a worker that vanished. The retrain watches the
    run's worker: with it (or, before one took the run, every worker of the pool) offline for infra.worker_lost_s it marks the stage Crashed and raises StageLost (retried).
    With a worker online it waits on, up to infra.stage_timeout_s (a day by default; here 3 s)."""
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Running

    from flows.dispatch import StageLost, wait_for_stage

    @flow(name="lost-stage")
    def lost_stage() -> None:
        pass

    assert compose([]).infra.stage_timeout_s == 86400.0, "a lost stage never waits forever by default"
    with get_client(sync_client=True) as client:
        pool = f"lost-{os.getpid()}"
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        deployment = client.create_deployment(client.create_flow(lost_stage), "d", work_pool_name=pool)
        run = client.create_flow_run_from_deployment(deployment)
        client.set_flow_run_state(run.id, Running(), force=True)  # picked up by a worker that then vanished
        started = time.monotonic()
        with pytest.raises(StageLost, match=rf"no worker of work pool '{pool}' has been online for \d+ s"):
            wait_for_stage(run.id, pool, timeout_s=None, worker_lost_s=2)
        assert time.monotonic() - started < 30
        assert client.read_flow_run(run.id).state.is_crashed()

        second = client.create_flow_run_from_deployment(deployment)
        client.set_flow_run_state(second.id, Running(), force=True)
        client.send_worker_heartbeat(pool, "alive-worker")  # a live worker: not lost, the timeout governs
        assert not wait_for_stage(second.id, pool, timeout_s=3, worker_lost_s=2).state.is_final()

        # the worker that took a run is the one watched: lost while another worker of the pool polls on
        third = client.create_flow_run_from_deployment(deployment)
        client.set_flow_run_state(third.id, Running(), force=True)
        client.update_flow_run_labels(third.id, {"prefect.worker.name": "gone-worker"})
        client.send_worker_heartbeat(pool, "alive-worker")
        with pytest.raises(StageLost, match=r"its worker 'gone-worker' has not been online for \d+ s"):
            wait_for_stage(third.id, pool, timeout_s=None, worker_lost_s=2)
        assert client.read_flow_run(third.id).state.is_crashed()


def test_a_worker_trusts_a_request_the_orchestrator_signed_and_nothing_else(tmp_path, monkeypatch):
    """Issue 38: stage parameters carry the orchestrator's HMAC (the deployment's keyring, RLHF_SIGNING_KEYS). A signed
    request brings the operator's whole config (gate settings included); a direct Prefect call to a stage deployment,
    unsigned or tampered with, gets the worker's remote list alone and is refused before anything is fetched."""
    from components.config import OverrideNotAllowed
    from flows import dispatch

    monkeypatch.setenv("RLHF_SIGNING_KEYS", str(tmp_path / "deployment" / "signing-keys.json"))
    monkeypatch.setenv("RLHF_WORKER_DIR", str(tmp_path / "worker"))
    orch = compose([f"root={tmp_path / 'orch'}", "sft.max_steps=5", "gate.min_win_rate=0.7"])
    request = {
        "stage": "sft",
        "config": {},
        "overrides": ["sft.max_steps=5", "gate.min_win_rate=0.7"],
        "data_version": "x.dir",
        "inputs": {},
        "parent_run_id": "r",
    }
    signed = dispatch.sign_request(orch, request)
    local = compose([f"root={tmp_path / 'worker'}"])
    assert dispatch.request_trust(signed, local) == "ok"
    tampered = {**signed, "overrides": [*signed["overrides"], "ppo.guide.model=http://evil/guide"]}
    assert dispatch.request_trust(tampered, local) == "bad signature"
    assert dispatch.request_trust(request, local) == "unsigned"
    for unsafe in (request, tampered):
        with pytest.raises(OverrideNotAllowed, match="sft.max_steps=5: `sft.max_steps` is not listed"):
            dispatch._run_here(unsafe, body=lambda *a, **k: pytest.fail("the stage ran"))
    monkeypatch.setenv("RLHF_SIGNING_KEYS", str(tmp_path / "elsewhere.json"))  # a worker without the keyring
    assert "no signing keyring" in dispatch.request_trust(signed, local)
    assert not (tmp_path / "elsewhere.json").exists(), "a worker never makes a keyring"


def test_the_orchestrator_takes_only_a_stage_record_its_worker_signed(tmp_path, monkeypatch):
    """Found in review: a run tagged with a stage's flow-run and parent ids (both visible through the Prefect API) and a
    forged `stage_output.json` (a passing evaluation, another policy dir) was taken as the stage's result. Now the
    worker signs its record for the request and flow run; a forged or re-bound record is skipped."""
    import json

    import mlflow

    from components import tracking
    from flows import dispatch

    monkeypatch.setenv("RLHF_SIGNING_KEYS", str(tmp_path / "deployment" / "signing-keys.json"))
    monkeypatch.setenv("RLHF_WORKER_DIR", str(tmp_path / "worker"))
    cfg = compose([f"root={tmp_path / 'orch'}"])
    tracking.setup(cfg)
    with mlflow.start_run() as parent:
        pass
    binding = {"flow_run_id": "fr-1", "parent_run_id": parent.info.run_id, "request": "k:sig"}
    tags = {"rlhf.flow_run_id": "fr-1", "mlflow.parentRunId": parent.info.run_id}
    with mlflow.start_run(tags=tags) as forged:
        mlflow.log_text(json.dumps({"result": {"dir": "/home/op/.aws"}}), dispatch.RECORD)
    assert dispatch._read_record(cfg, "fr-1", parent.info.run_id, "k:sig") is None
    with mlflow.start_run(tags=tags):
        assert dispatch._write_record({"result": {"dir": "runs:/x/output"}}, binding, reuse_key="base-key")
    got = dispatch._read_record(cfg, "fr-1", parent.info.run_id, "k:sig")
    assert got is not None and got["result"]["dir"] == "runs:/x/output"
    assert dispatch._read_record(cfg, "fr-1", parent.info.run_id, "k:other-request") is None, "bound to its request"
    assert forged.info.run_id  # the forged run is still there: skipped, not trusted
    reused = dispatch._first_record(cfg, f"tags.`{dispatch.REUSE_TAG}` = 'base-key'", {"reuse_key": "base-key"})
    assert reused is not None and reused["result"]["dir"] == "runs:/x/output"  # the real one, signed for its key
    with mlflow.start_run(tags={dispatch.REUSE_TAG: "other-key"}):  # a forged reusable base
        mlflow.log_text(json.dumps({"result": {"dir": str(tmp_path)}}), dispatch.RECORD)
    assert dispatch._first_record(cfg, f"tags.`{dispatch.REUSE_TAG}` = 'other-key'", {"reuse_key": "other-key"}) is None


def test_a_signed_request_is_not_replayed_for_another_stage_or_months_later(tmp_path, monkeypatch):
    from unittest import mock

    from flows import dispatch

    local = compose([f"root={tmp_path}", "infra.stage_timeout_s=60"])
    now = __import__("time").time()
    with mock.patch("prefect.runtime.flow_run.flow_name", "stage-sft"):
        assert dispatch._replayed({"stage": "sft", "issued_at": now}, local) is None
        assert "signed for stage 'ppo'" in dispatch._replayed({"stage": "ppo", "issued_at": now}, local)
        assert "s ago" in dispatch._replayed({"stage": "sft", "issued_at": now - 3600}, local)
