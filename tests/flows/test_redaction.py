"""Issue 12: no credential from the config reaches what a run records or what commands print: the
retrain's config.yaml artifact, the data version's remote, `rlhf config`, the MLflow/Prefect hints."""

import mlflow
import pytest

from cli.commands import _prefect_server, _where
from cli.main import main
from components import tracking
from components.data.versioning import DataVersionError, ensure_data
from flows import retrain as retrain_module
from tests.conftest import make_project

DVC_REMOTE = "https://dvcuser:dvc-pw/1@dvc.example.com/store?token=dvctok"
CREDENTIALS = [
    f"infra.dvc_remote_url='{DVC_REMOTE}'",  # quoted: the value has `=`
    "infra.prefect_api_url=https://prefect-key@prefect.example.com/api",
    "tracking.artifact_root='s3://bucket/mlartifacts?X-Amz-Signature=amzsig'",
]
SECRETS = ("dvcuser", "dvc-pw", "dvctok", "prefect-key", "amzsig")


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_the_retrain_run_logs_a_redacted_config_yaml(tmp_path, monkeypatch):
    """The pipeline's own record step on a real SQLite MLflow store (stopped right after it: no data)."""
    cfg = make_project(tmp_path / "proj", *CREDENTIALS[:2])  # the artifact root must be writable here

    def no_data(cfg):
        raise DataVersionError("no data in this test")

    monkeypatch.setattr(retrain_module, "prepare_data", no_data)
    tracking.setup(cfg)
    state = retrain_module.pipeline(cfg)
    assert state.is_failed()
    (run,) = mlflow.search_runs(output_format="list")
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "dvc_remote_url: https://***@dvc.example.com/store?token=***" in text
    assert not leaked(text) and not leaked(str(run.data.params)) and not leaked(str(run.data.tags))


def test_the_data_state_records_the_remote_without_credentials(tmp_path):
    """DataState.remote becomes the run's dvc_remote tag, a task result and `rlhf data`'s output."""
    cfg = make_project(tmp_path / "proj", CREDENTIALS[0], "infra.dvc_push=false")
    state = ensure_data(cfg)
    assert state.remote == "https://***@dvc.example.com/store?token=***"


def test_rlhf_config_prints_the_config_redacted(capsys):
    assert main(["config", *CREDENTIALS]) == 0
    out = capsys.readouterr().out
    assert "prefect_api_url: https://***@prefect.example.com/api" in out and not leaked(out)


def test_printed_hints_carry_no_credentials(tmp_path):
    from components.config import compose

    cfg = compose([f"root={tmp_path}", *CREDENTIALS, "tracking.uri=postgresql://mlf:mlf-pw@db/mlflow"])
    hints = f"{_where(cfg)}\n{_prefect_server(cfg)}"
    assert "postgresql://***@db/mlflow" in hints and "https://***@prefect.example.com/api" in hints
    assert not leaked(hints) and "mlf-pw" not in hints


def test_flows_taking_the_config_store_it_redacted_in_prefect(tmp_path, prefect_server):
    """The flow run's parameters as the Prefect API keeps them (a real run of `ingest`, refused: no file)."""
    from prefect.client.orchestration import get_client

    from flows.ingest import ingest_flow
    from flows.retrain import retrain
    from service.redaction import ConfigFlow

    assert isinstance(retrain, ConfigFlow) and isinstance(ingest_flow, ConfigFlow)
    cfg = make_project(tmp_path / "proj", *CREDENTIALS[:2])
    state = ingest_flow(cfg, str(tmp_path / "missing.jsonl"), "preferences", return_state=True)
    with get_client(sync_client=True) as client:
        params = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert params["cfg"]["infra"]["dvc_remote_url"] == "https://***@dvc.example.com/store?token=***"
    assert params["cfg"]["ppo"]["steps"] == cfg.ppo.steps and params["kind"] == "preferences"
    assert not leaked(str(params))


def test_a_failed_dvc_command_names_the_remote_without_credentials(tmp_path):
    from components.data.versioning import Dvc

    with pytest.raises(DataVersionError) as e:
        Dvc(tmp_path).set_remote("rlhf", DVC_REMOTE)  # no DVC repo here: fails, naming its arguments
    assert "https://***@dvc.example.com" in str(e.value) and not leaked(str(e.value))
