"""Which process owns a run, a lock or a journal, and whether that process is still alive.

A crash (SIGKILL, OOM, a lost node) leaves records behind: a RUNNING MLflow run, a Running Prefect
flow run, the retrain slot, an ingest journal. Each records its owner as `host:pid:start` (the start
time tells a reused pid apart), so the next command can tell "still working" from "dead".
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import psutil

HOST = socket.gethostname()


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float  # process start time, epoch seconds (0: unknown)

    @classmethod
    def me(cls) -> Owner:
        return cls(HOST, os.getpid(), _start_time(os.getpid()) or 0.0)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        """`host:pid:start` or Prefect's `host:pid` (infrastructure_pid); None when it is neither."""
        if not text:
            return None
        parts = text.rsplit(":", 2)
        try:
            if len(parts) == 3 and "." in parts[2]:
                return cls(parts[0], int(parts[1]), float(parts[2]))
            host, pid = text.rsplit(":", 1)
            return cls(host, int(pid), 0.0)
        except ValueError:
            return None

    def alive(self, began_by: float | None = None) -> bool | None:
        """True/False on this host; None for a process on another host (the caller uses heartbeats).
        `began_by`: when the start time was not recorded (Prefect's `host:pid`), a process started after
        this epoch time (what it owns already existed then) is a newer process that reused the pid."""
        if self.host != HOST:
            return None
        started = _start_time(self.pid)
        if started is None:
            return False
        if self.started:  # a pid reused by a newer process is not the owner
            return abs(started - self.started) < 1.0
        return began_by is None or started <= began_by + 1.0

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _start_time(pid: int) -> float | None:
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
