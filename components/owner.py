"""Which process owns a run, a lock or a journal, and whether that process is still alive.

A crash (SIGKILL, OOM, a lost node) leaves records behind: a RUNNING MLflow run, a Running Prefect
flow run, the retrain slot, an ingest journal. Each records its owner as `host:pid:start:ticks` (the start time
tells a reused pid apart), so the next command can tell "still working" from "dead".

The start is recorded twice: as epoch seconds (shown, and compared by records of earlier versions, which hold
`host:pid:start`) and as clock ticks since boot (Linux: /proc/<pid>/stat). The epoch start of a process moves
with the wall clock (psutil derives it from the boot time, which an NTP step or a VM resume shifts); its ticks
since boot never do. So on Linux a live owner stays alive across a clock step: only the ticks are compared.
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
    ticks: int | None = None  # process start, clock ticks since boot (None: not recorded, or not Linux)

    @classmethod
    def me(cls) -> Owner:
        return cls(HOST, os.getpid(), _start_time(os.getpid()) or 0.0, boot_ticks(os.getpid()))

    def __str__(self) -> str:
        base = f"{self.host}:{self.pid}:{self.started:.2f}"
        return base if self.ticks is None else f"{base}:{self.ticks}"

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        """`host:pid:start:ticks`, `host:pid:start` (earlier versions) or Prefect's `host:pid` (infrastructure_pid);
        None when it is none of them."""
        if not text:
            return None
        try:
            parts = text.rsplit(":", 3)
            if len(parts) == 4 and "." in parts[2] and parts[3].isdigit():
                return cls(parts[0], int(parts[1]), float(parts[2]), int(parts[3]))
            parts = text.rsplit(":", 2)
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
        if self.ticks is not None and (ticks := boot_ticks(self.pid)) is not None:
            return ticks == self.ticks  # immune to wall-clock steps; a reused pid started at another tick
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


def boot_ticks(pid: int) -> int | None:
    """The process's start in clock ticks since boot (field 22 of /proc/<pid>/stat); None off Linux or when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: count fields after its closing one
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None
