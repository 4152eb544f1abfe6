"""A command's temporary Prefect server boots in the background while the command imports the rest, and Prefect's
client then uses that server: one server per process, flows run on it."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    from service.env import start_temporary_server_early
    boot = start_temporary_server_early()  # returns at once; the boot runs on in a thread
    from prefect.server.api.server import SubprocessASGIServer
    boot.join()
    # the background thread itself started the server (not Prefect's first call, later)
    assert SubprocessASGIServer().server_process is not None, "the background boot did not start the server"
    from prefect import flow

    @flow
    def add(a, b):
        return a + b

    assert add(1, 2) == 3
    servers = [s for s in SubprocessASGIServer._instances.values() if s.server_process is not None]
    print("RESULT", len(servers), flush=True)
    """
)


def test_the_temporary_server_boots_in_the_background_and_prefect_uses_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    _, servers = line.split()
    assert servers == "1", "the flow ran on the server booted early, not on a second one"


def test_no_temporary_server_with_a_shared_one(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    from service.env import start_temporary_server_early

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    before = dict(SubprocessASGIServer._instances)
    start_temporary_server_early()
    assert SubprocessASGIServer._instances == before
