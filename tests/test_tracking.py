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


# ---- URL credentials (issue 12) ----
LEAKING_URLS = [
    ("https://user:pw@host/x", "https://***@host/x"),
    ("https://TOKEN@host", "https://***@host"),  # a bare token, no colon
    ("redis://:pw@cache:6379/0", "redis://***@cache:6379/0"),  # empty user
    ("postgresql://u:pa/ss@db/mlflow", "postgresql://***@db/mlflow"),  # `/` in the password
    ("postgresql+psycopg2://u:p:w@db:5432/x", "postgresql+psycopg2://***@db:5432/x"),
    ("https://h/d?token=abc&page=2", "https://h/d?token=***&page=2"),
    ("https://h/d?page=2&access_token=abc", "https://h/d?page=2&access_token=***"),
    ("https://h/d?api_key=abc", "https://h/d?api_key=***"),
    ("https://h/d?password=abc", "https://h/d?password=***"),
    (
        "https://acct.blob.core.windows.net/c/f?sv=2022&sig=abc%2F",
        "https://acct.blob.core.windows.net/c/f?sv=2022&sig=***",
    ),
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature=f00&X-Amz-Security-Token=t",
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***",
    ),
    ("https://maps.example.com/api?key=AIza123", "https://maps.example.com/api?key=***"),
    ("https://app/cb#access_token=abc&state=1", "https://app/cb#access_token=***&state=1"),
    ("https://u:pw@h/d?token=abc", "https://***@h/d?token=***"),
]
ORDINARY_VALUES = [
    "s3://bucket/path",
    "s3://rlhf-data/dvc",
    "file:///tmp/x",
    "http://localhost:5000",
    "http://127.0.0.1:4200/api",
    "sqlite:////home/me/.rlhf/mlflow.db",
    "user@example.com",
    "git@github.com:org/repo.git",
    "https://medium.com/@user/post",
    "https://huggingface.co/gpt2?revision=main&max_tokens=5",
    "https://h/d?token=",  # nothing to hide
    "ppo.max_new_tokens=24",
    "HuggingFaceTB/SmolLM2-135M",
    "",
]


@pytest.mark.parametrize("url,expected", LEAKING_URLS)
def test_redact_url_removes_credentials(url, expected):
    assert tracking.redact_url(url) == expected
    assert tracking.redact("tracking.uri", url) == expected


@pytest.mark.parametrize("url,expected", LEAKING_URLS)
def test_redact_url_in_longer_text(url, expected):
    text = f"could not reach {url}: retrying\n  and 'https://tok@other/x' too"
    assert tracking.redact_url(text) == f"could not reach {expected}: retrying\n  and 'https://***@other/x' too"


@pytest.mark.parametrize("value", ORDINARY_VALUES)
def test_redact_url_leaves_ordinary_values_alone(value):
    assert tracking.redact_url(value) == value
    assert tracking.redact_url(f"at {value} now") == f"at {value} now"


def test_lists_are_redacted_item_by_item():
    assert tracking.flatten({"urls": ["s3://b/p", "https://t@h"]})["urls"] == "['s3://b/p', 'https://***@h']"


SECRET_URLS = [
    "infra.dvc_remote_url='https://dvcuser:dvc-pw/1@dvc.example.com/store?token=dvctok'",  # quoted: it has `=`
    "infra.prefect_api_url=https://prefect-key@prefect.example.com/api",
    "model.name_or_path='https://hub.example.com/m?access_token=hubtok'",
]
SECRETS = ("dvcuser", "dvc-pw", "dvctok", "prefect-key", "hubtok")


def test_redacted_yaml_is_the_config_less_credentials(tmp_path):
    from omegaconf import OmegaConf

    from components.config import to_yaml

    plain = compose([f"root={tmp_path}"])
    assert tracking.redacted_yaml(plain) == to_yaml(plain)  # nothing to redact: the same text
    cfg = compose([f"root={tmp_path}", *SECRET_URLS])
    text = tracking.redacted_yaml(cfg)
    assert not [s for s in SECRETS if s in text]
    loaded = OmegaConf.to_container(OmegaConf.create(text))
    assert loaded["infra"]["dvc_remote_url"] == "https://***@dvc.example.com/store?token=***"
    assert loaded["ppo"] == to_dict(cfg)["ppo"]  # the rest is unchanged


def test_redacted_hides_secret_named_keys_at_any_depth():
    d = {"registry": {"hf_token": "hf_abc", "max_tokens": 5, "mirrors": ["https://t@h"]}, "apiKey": "k"}
    assert tracking.redacted(d) == {
        "registry": {"hf_token": "***", "max_tokens": 5, "mirrors": ["https://***@h"]},
        "apiKey": "***",
    }


def test_nothing_secret_reaches_a_real_mlflow_run(tmp_path):
    """Params, the config.yaml artifact and the dataset input's tags of an SQLite MLflow run."""
    cfg = compose([f"root={tmp_path}", *SECRET_URLS])
    tracking.setup(cfg)
    with mlflow.start_run() as run:
        tracking.log_config(cfg)
        mlflow.log_text(tracking.redacted_yaml(cfg), "config.yaml")
        tracking.log_data_input(tmp_path, "0" * 32, {"preferences": 3}, "s3://u:pw@bucket/dvc?sig=dvctok")
    r = mlflow.get_run(run.info.run_id)
    (dataset_input,) = r.inputs.dataset_inputs
    tags = {t.key: t.value for t in dataset_input.tags}
    logged = "\n".join(
        [*r.data.params.values(), *tags.values(), mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")]
    )
    assert not [s for s in (*SECRETS, "pw@") if s in logged]
    assert tags["dvc_remote"] == "s3://***@bucket/dvc?sig=***"
    assert r.data.params["infra.prefect_api_url"] == "https://***@prefect.example.com/api"


def test_ui_command_redacts_the_tracking_uri(tmp_path):
    cfg = compose([f"root={tmp_path}", "tracking.uri=https://mlf-user:mlf-pw@mlflow.example.com"])
    assert tracking.ui_command(cfg) == "open https://***@mlflow.example.com"
    local = compose([f"root={tmp_path}"])
    uri = tracking.tracking_uri(local)
    assert tracking.ui_command(local) == f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000"
    # with the store made: the page of the training runs, and of the served answers (MLflow 3.17 opens an experiment
    # on its global GenAI overview unless the route names the workflow: issue 41)
    runs = tracking.setup(local)
    serving = tracking.serving_experiment(local)
    assert tracking.ui_command(local).endswith(f":5000/#/experiments/{runs}/runs?workflowType=machine_learning")
    assert tracking.ui_command(local, serving=True).endswith(f"/#/experiments/{serving}/traces?workflowType=genai")


@pytest.mark.parametrize(
    "override,shown",
    [
        ("ppo.steps=3", "ppo.steps=3"),
        ("~ppo.max_approx_kl", "~ppo.max_approx_kl"),
        ("+registry.hf_token=hf_abc", "+registry.hf_token=***"),
        ("infra.dvc_remote_url='https://u:pw@h/x?token=t'", "infra.dvc_remote_url='https://***@h/x?token=***'"),
        ("tracking.uri=postgresql://u:pa/ss@db/mlflow", "tracking.uri=postgresql://***@db/mlflow"),
    ],
)
def test_redact_override(override, shown):
    assert tracking.redact_override(override) == shown
