"""Client credentials for the shared servers: from the environment, or from a file outside the repository
named by RLHF_CREDENTIALS_FILE (KEY=VALUE lines; `rlhf services up` writes one). Never from conf/.

MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, Prefect PREFECT_API_AUTH_STRING, DVC's
S3 remote AWS_*. `check_access` tells a missing or wrong credential apart from a server that is down, before
any work starts.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from components.config import Config, ConfigError

CLIENT_KEYS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


class Unauthorised(Exception):
    """A server refused our credentials (or we sent none); the message says which and where to set them."""


def load(cfg: Config) -> None:
    """Fill the client credentials the environment lacks from RLHF_CREDENTIALS_FILE (the environment wins)."""
    name = os.environ.get("RLHF_CREDENTIALS_FILE")
    if not name:
        return
    path = Path(name).expanduser().resolve()
    if path.is_relative_to(cfg.root_path):
        raise ConfigError(
            f"RLHF_CREDENTIALS_FILE={path} is inside the project ({cfg.root_path}): a credentials file must live "
            "outside any repository (e.g. ~/.rlhf-services/credentials.env); move it and update the variable"
        )
    if not path.is_file():
        raise ConfigError(f"RLHF_CREDENTIALS_FILE={path} does not exist (`rlhf services up` writes one)")
    for key, value in read_env_file(path).items():
        if key in CLIENT_KEYS:
            os.environ.setdefault(key, value)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks skipped; a value may contain `=`)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def http_status(url: str, auth: str | None, token: str | None = None, timeout: float = 10) -> int | None:
    """HTTP status of a GET (None: no answer), with basic auth (`user:password`) or a bearer token."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    elif auth:
        req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def check_access(tracking_uri: str, prefect_api_url: str | None) -> None:
    """One authenticated request to each shared server: raise `Unauthorised` on 401/403 with what to set."""
    if tracking_uri.startswith(("http://", "https://")):
        user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        code = http_status(
            tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1",
            f"{user}:{pw}" if user and pw else None,
            os.environ.get("MLFLOW_TRACKING_TOKEN"),
        )
        if code in (401, 403):
            raise Unauthorised(
                f"the MLflow server at {tracking_uri} refused "
                + ("the credentials of MLFLOW_TRACKING_USERNAME" if user else "an anonymous client")
                + f" (HTTP {code}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                "RLHF_CREDENTIALS_FILE (a KEY=VALUE file outside the repo)"
            )
    if prefect_api_url and not os.environ.get("PREFECT_API_KEY"):  # Prefect Cloud keys: Prefect's own check
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        code = http_status(prefect_api_url.rstrip("/") + "/flows/count", auth)  # GET is refused: 405 means allowed
        if code in (401, 403):
            raise Unauthorised(
                f"the Prefect server at {prefect_api_url} refused "
                + ("PREFECT_API_AUTH_STRING" if auth else "an anonymous client")
                + f" (HTTP {code}): set PREFECT_API_AUTH_STRING=user:password, or RLHF_CREDENTIALS_FILE"
            )
