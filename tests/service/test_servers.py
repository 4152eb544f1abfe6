"""Issue 28, item 12: `rlhf services up` waits for its own servers. A squatter (or another instance's server) that
answers 200 on the port is not taken for health, and never receives the Prefect auth string. Real processes."""

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from service import servers
from tests.registry.test_registry import free_port

SQUATTER = textwrap.dedent(
    """
    import http.server, sys
    seen = open(sys.argv[2], "a")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.write(repr(self.headers.get("Authorization")) + "\\n"); seen.flush()
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def test_a_squatter_on_the_port_is_not_taken_for_our_server_nor_sent_the_auth_string(tmp_path):
    layout = servers.Layout(tmp_path / "services")
    layout.root.mkdir()
    ports = servers.Ports(free_port(), free_port(), free_port())
    seen = tmp_path / "seen.txt"
    squatters = [
        subprocess.Popen([sys.executable, "-c", SQUATTER, str(port), str(seen)])
        for port in (ports.mlflow, ports.prefect)
    ]
    ours = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]  # not listening
    try:
        for name, proc in zip(("mlflow", "prefect"), ours, strict=True):
            layout.pidfile(name).write_text(f"{proc.pid} {psutil.Process(proc.pid).create_time()}")
        assert not servers.listens_on(layout, "prefect", ports.prefect)
        with pytest.raises(servers.ServiceError, match="not healthy after 3 s: mlflow, prefect"):
            servers.wait_healthy(layout, ports, {"PREFECT_API_AUTH_STRING": "admin:secret-pw"}, timeout_s=3)
        assert "secret" not in (seen.read_text() if seen.exists() else "")
        assert servers.listens_on(servers.Layout(tmp_path / "none"), "prefect", ports.prefect) is False
        # the process of the pid file listening on the port: ours
        port = free_port()
        listening = subprocess.Popen([sys.executable, "-c", SQUATTER, str(port), str(tmp_path / "ours.txt")])
        ours.append(listening)
        layout.pidfile("mlflow").write_text(f"{listening.pid} {psutil.Process(listening.pid).create_time()}")
        deadline = time.monotonic() + 30
        while not servers.listens_on(layout, "mlflow", port):
            assert time.monotonic() < deadline, "our own listening process was not recognised"
            time.sleep(0.1)
    finally:
        for p in squatters + ours:
            p.kill()
            p.wait()
