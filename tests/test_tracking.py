import mlflow
import pytest

from components import tracking
from components.config import compose, to_dict

SECRET_KEYS = [
    "hf_token",
    "api_token",
    "token",
    "PREFECT_API_KEY",
    "api-key",
    "apikey",
    "password",
    "db_passwd",
    "client_secret",
    "secrets",
    "credentials",
    "auth_string",
    "hubToken",
    "AWS_SECRET_ACCESS_KEY",
    "registry.hf_token",
    "credentials.user",
]
SETTING_KEYS = [
    "ppo.max_new_tokens",
    "ppo.max_prompt_tokens",
    "gate.max_new_tokens",
    "tokenizer",
    "model.tokenizer",
    "tokens_per_second",
    "max_tokens",
    "author",
    "monkey",
    "sort_key",
    "keyword",
]


def test_flatten_respects_limits_and_redacts_secrets():
    flat = tracking.flatten({"a": {"b": 1, "api_token": "s3cr3t"}, "uri": "postgresql://u:pw@db/x", "long": "x" * 7000})
    assert flat["a.b"] == "1"
    assert flat["a.api_token"] == "***"
    assert "pw" not in flat["uri"] and flat["uri"].startswith("postgresql://***@")
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_looking_keys_are_redacted(key):
    assert tracking.redact(key, "s3cr3t") == "***"
    assert tracking.flatten({key: "s3cr3t"})[key] == "***"


@pytest.mark.parametrize("key", SETTING_KEYS)
def test_settings_that_merely_contain_a_secret_word_are_logged(key):
    assert tracking.redact(key, 128) == 128
    assert tracking.flatten({key: 128})[key] == "128"


def test_default_config_logs_token_limits_in_clear(tmp_path):
    flat = tracking.flatten(to_dict(compose([f"root={tmp_path}"])))
    assert flat["ppo.max_new_tokens"] != "***" and flat["gate.max_new_tokens"] != "***"
    assert "***" not in flat.values()


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
