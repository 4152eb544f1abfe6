"""Process environment for the service: where Prefect, GX, DVC and MLflow keep state.

Must run before prefect is imported (Prefect reads its settings at import time).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

from components.config import Config

EPHEMERAL_STARTUP_TIMEOUT_S = 180
# No telemetry, no hub downloads, quiet libraries (the tests set the same).
PROCESS_ENV = {
    "GX_ANALYTICS_ENABLED": "False",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # one progress bar per stage (ours, and the Trainer's for SFT): none for loading/saving weights or
    # dataset maps (transformers reads huggingface_hub's switch for its own bars)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per downloaded stage output is noise
}


def temporary_server_notice(cfg: Config) -> str | None:
    """What a command without a shared Prefect server says before it starts its temporary one."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    home = Path(os.environ.get("PREFECT_HOME", cfg.state_path / "prefect"))
    fresh = not (home / "prefect.db").exists()
    return f"Prefect: starting a temporary server on {home}" + (
        f" (first start: setting up its database, up to {EPHEMERAL_STARTUP_TIMEOUT_S} s)" if fresh else ""
    )


def start_temporary_server_early() -> threading.Thread | None:
    """Without a shared Prefect server (no PREFECT_API_URL), boot the command's temporary one now, in a background
    thread, instead of on the first Prefect call: its ~7-15 s start (a uvicorn subprocess that opens and migrates its
    SQLite database) then overlaps the command's own imports and setup (torch, transformers, MLflow). Prefect's
    client asks the same per-process singleton to `start()` when it first needs the API; that call waits for this
    boot, then starts it the usual way if the boot failed (so a failure is reported where Prefect reports it)."""
    from prefect.settings import PREFECT_API_URL

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():  # a shared server (env or profile): no boot
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running or "start" in vars(server):  # already up, or already booting
        return None
    start = server.start  # the class's start, bound: the instance attribute set below would wait for itself
    boot = threading.Thread(target=_boot, args=(start,), name="prefect-temporary-server", daemon=True)

    def start_after_boot(timeout: int | None = None) -> None:
        boot.join()
        start(timeout)  # a no-op when the boot succeeded

    server.start = start_after_boot
    boot.start()
    return boot


def _boot(start) -> None:
    try:
        start()
    except Exception:  # noqa: BLE001 - Prefect's own start() retries it in the main thread and reports the error
        pass


def configure_environment(cfg: Config) -> None:
    # TRL and peft still read transformers' deprecated `is_gradient_checkpointing`: not ours to fix, and
    # the warning repeats on every stage
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
    # MLflow guesses a dataset source for the data dir (a plain path) and warns that it may be ambiguous
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.data.*")
    from service import credentials

    credentials.load(cfg)  # RLHF_CREDENTIALS_FILE: a file outside the repo; the environment wins
    state = cfg.state_path
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    if cfg.infra.prefect_api_url:
        os.environ["PREFECT_API_URL"] = cfg.infra.prefect_api_url
    # A new Prefect home migrates its database on the temporary server's first start: on a busy 2-core
    # machine that took longer than Prefect's default 20 s and failed the first `rlhf run` (issue 10)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)
