import mlflow

from components import tracking
from components.config import compose


def test_flatten_respects_limits_and_redacts_secrets():
    flat = tracking.flatten({"a": {"b": 1, "api_token": "s3cr3t"}, "uri": "postgresql://u:pw@db/x", "long": "x" * 7000})
    assert flat["a.b"] == "1"
    assert flat["a.api_token"] == "***"
    assert "pw" not in flat["uri"] and flat["uri"].startswith("postgresql://***@")
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE


def test_setup_uses_sqlite_under_state_dir_and_logs_config(tmp_path):
    cfg = compose([f"root={tmp_path}"])
    tracking.setup(cfg)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / '.rlhf' / 'mlflow.db'}"
    with mlflow.start_run() as run:
        params = tracking.log_config(cfg)
    logged = mlflow.get_run(run.info.run_id).data.params
    assert logged == params  # every key logged (in batches within MLflow's limit)
    assert logged["ppo.lora.r"] == str(cfg.ppo.lora.r)
    assert (tmp_path / ".rlhf" / "mlflow.db").exists()
