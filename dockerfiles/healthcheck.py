"""Container health checks with the standard library only (the images have neither curl nor procps).

    healthcheck.py http URL                     exit 0 when GET URL answers 2xx within the timeout
    healthcheck.py process PATTERN [--prefect]  exit 0 when a process whose command line contains PATTERN
                                                runs (and, with --prefect, $PREFECT_API_URL/health answers)

The images copy this file to /usr/local/lib/rlhf/healthcheck.py; their HEALTHCHECK calls it.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

TIMEOUT_S = 5.0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            if 200 <= response.status < 300:
                return True
            print(f"unhealthy: GET {url} answered {response.status}", file=sys.stderr)
    except Exception as e:  # refused, timeout, 4xx/5xx (HTTPError): all unhealthy
        print(f"unhealthy: GET {url}: {e}", file=sys.stderr)
    return False


def process_running(pattern: str, proc: Path = Path("/proc")) -> bool:
    """A process other than this one whose argv, joined by spaces, contains `pattern`."""
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if pattern in " ".join(a.decode(errors="replace") for a in argv):
            return True
    print(f"unhealthy: no process matching {pattern!r}", file=sys.stderr)
    return False


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "http":
        return 0 if http_ok(argv[1]) else 1
    if len(argv) in (2, 3) and argv[0] == "process" and argv[2:] in ([], ["--prefect"]):
        if not process_running(argv[1]):
            return 1
        if argv[2:]:
            api = os.environ.get("PREFECT_API_URL", "")
            if not api:
                print("unhealthy: --prefect but PREFECT_API_URL is not set", file=sys.stderr)
                return 1
            return 0 if http_ok(api.rstrip("/") + "/health") else 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
