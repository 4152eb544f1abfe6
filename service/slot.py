"""The retrain slot: one retrain of a project at a time, through a slot that a crashed holder cannot keep.

The slot is a Prefect Variable per project (`rlhf_retrain_slot_<project>`): creating it is atomic on
the Prefect database (its name is unique), so it works across processes on one machine (every
temporary server of a project shares `<state>/prefect`) and across machines on a shared server. Its
value names the holder: flow run, owner process (`host:pid:start`), since, heartbeat (every 15 s).

A waiting retrain frees the slot when its holder is stale: the owner process is gone (same host), its
flow run has ended, or (another host) its heartbeat has not changed for `infra.retrain_slot_stale_s` by the
waiter's own monotonic clock: two hosts' clocks are never compared, so clock skew or a step of the waiter's wall
clock frees no live holder. Two waiters never both free it: the one that creates the claim `<slot>_reap_<token>`
does, after checking that the slot still names that holder; a claim whose creator died is removed the same way
(its process gone, or standing for the stale limit). A holder whose slot was freed all the same (a Prefect
outage longer than the limit) stops its run at the next heartbeat (`on_lost`, by default SIGTERM to its main
thread, as `rlhf run` unwinds on it), so two retrains never train, register and promote at once. Prefect's own global concurrency limits were not used for this:
on a temporary server their leases live in that server's memory, so a SIGKILLed holder's slot was
never given back (issue 10).
"""

from __future__ import annotations

import _thread
import contextlib
import contextvars
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from components.config import Config
from components.owner import Owner
from service.lifecycle import (
    _client,
    _crash_flow_run,
    _current_flow_run,
    _final_state,
    _when,
    reap_orphans,
    slot_name,
)

HEARTBEAT_S = 15.0
POLL_S = 2.0
SAY_EVERY_S = 30.0


# ----------------------------------------------------------------------------------------
# The retrain slot
# ----------------------------------------------------------------------------------------
@dataclass
class Holder:
    token: str
    flow_run_id: str
    flow_run_name: str
    owner: str  # host:pid:start
    since: float
    heartbeat: float

    def describe(self) -> str:
        owner = Owner.parse(self.owner)
        return (
            f"flow run {self.flow_run_name or '?'} ({self.flow_run_id or 'no flow run'}), "
            f"{owner.describe() if owner else self.owner}, since {_when(self.since)}"
        )


def stale_reason(
    holder: Holder, unchanged_s: float, owner_alive: bool | None, run_final: str | None, stale_after_s: float
) -> str | None:
    """Why a slot holder is dead, or None while it may be alive.
    unchanged_s: how long this process has seen the holder's heartbeat value unchanged, by its own monotonic
    clock; owner_alive: the owner process on this host (None: another host); run_final: the name of the final
    state its flow run ended in (None: not ended, or unknown)."""
    if owner_alive is False:
        return f"its process ({Owner.parse(holder.owner).describe()}) is gone"
    if run_final:
        return f"its flow run ended ({run_final}) without releasing the slot"
    if owner_alive is None and unchanged_s > stale_after_s:
        return (
            f"no heartbeat for {unchanged_s:.0f} s (its value unchanged by this process's clock; limit "
            f"infra.retrain_slot_stale_s={stale_after_s:g})"
        )
    return None


def stop_main_thread() -> None:
    """The default `on_lost`: the signal the main thread unwinds on (SIGTERM where Python handles it, as `rlhf run`
    does; else SIGINT, a KeyboardInterrupt), delivered to it from the heartbeat thread."""
    handled = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    _thread.interrupt_main(signal.SIGTERM if handled else signal.SIGINT)


class RetrainSlot:
    """`with RetrainSlot(cfg, say):` runs the body as the only retrain of the project. Waits while
    another live retrain holds it (saying so every 30 s), frees it from a dead one."""

    def __init__(self, cfg: Config, say: Callable[[str], None], on_lost: Callable[[], None] = stop_main_thread):
        self.cfg, self.say, self.on_lost = cfg, say, on_lost
        self.name = slot_name(cfg)
        self.mine: Holder | None = None
        self.lost = False
        self.heartbeat_s = HEARTBEAT_S
        self._seen: dict[str, tuple[float, float]] = {}  # holder token -> (heartbeat value, monotonic first seen)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- public
    def __enter__(self) -> RetrainSlot:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        run_id, run_name = _current_flow_run()
        waiting_since, said = time.time(), 0.0
        while True:
            now = time.time()
            holder = Holder(uuid.uuid4().hex, run_id, run_name, str(Owner.me()), now, now)
            if self._create(holder):
                self.mine = holder
                if now - waiting_since > POLL_S:
                    self.say(f"took the retrain slot after waiting {now - waiting_since:.0f} s")
                self._start_heartbeat()
                return
            current = self.read()
            if current is None:
                continue  # released in between: try again at once
            if (reason := self.verdict(current)) and self.free(current, reason):
                continue
            if now - said >= SAY_EVERY_S:
                said = now
                self.say(
                    f"waiting for the retrain slot ({now - waiting_since:.0f} s so far): held by "
                    f"{current.describe()}, its heartbeat last changed {self.unchanged_s(current):.0f} s ago"
                )
            time.sleep(POLL_S)  # in the main thread: SIGTERM / Ctrl-C stop the wait at once

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.mine is not None:
            current = self.read()
            if current is not None and current.token == self.mine.token:
                with _client() as client:
                    client.delete_variable_by_name(self.name)
            self.mine = None

    # -- holder records
    def read(self) -> Holder | None:
        with _client() as client:
            var = client.read_variable_by_name(self.name)
        if var is None:
            return None
        try:
            return Holder(**var.value)
        except TypeError:  # not written by this version: treat as a holder with no owner and no heartbeat
            return Holder("unknown", "", "", "", 0.0, 0.0)

    def _create(self, holder: Holder) -> bool:
        from prefect.client.schemas.actions import VariableCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            with _client() as client:
                client.create_variable(
                    VariableCreate(name=self.name, value=asdict(holder), tags=["rlhf", "retrain-slot"])
                )
            return True
        except ObjectAlreadyExists:
            return False

    def unchanged_s(self, holder: Holder) -> float:
        """How long this process has seen `holder`'s heartbeat value unchanged, by its own monotonic clock."""
        value, first = self._seen.get(holder.token, (None, 0.0))
        if value != holder.heartbeat:
            self._seen[holder.token] = (holder.heartbeat, time.monotonic())
            return 0.0
        return time.monotonic() - first

    def verdict(self, holder: Holder) -> str | None:
        owner = Owner.parse(holder.owner)
        return stale_reason(
            holder,
            self.unchanged_s(holder),
            owner.alive() if owner else None,
            _final_state(holder.flow_run_id),
            self.cfg.infra.retrain_slot_stale_s,
        )

    def free(self, holder: Holder, reason: str) -> bool:
        """Delete a stale holder's record (only one waiter does) and end what it left running. False when another
        waiter holds the claim to free it (the caller waits a poll, then looks again)."""
        from prefect.client.schemas.actions import VariableCreate
        from prefect.exceptions import ObjectAlreadyExists

        claim = f"{self.name}_reap_{holder.token}"[:255]
        with _client() as client:
            try:
                client.create_variable(VariableCreate(name=claim, value=str(Owner.me())))
            except ObjectAlreadyExists:
                self._clear_leftover_claim(claim)
                return False  # another waiter frees it, or its leftover claim is gone now: look again
            try:
                current = self.read()
                if current is None or current.token != holder.token:
                    return False
                client.delete_variable_by_name(self.name)
            finally:
                client.delete_variable_by_name(claim)
        self.say(f"freed the retrain slot held by {holder.describe()}: {reason}")
        if holder.flow_run_id:
            _crash_flow_run(holder.flow_run_id, f"crashed: {reason} (slot freed by {Owner.me().describe()})")
        reap_orphans(self.cfg, self.say)
        return True

    def _clear_leftover_claim(self, claim: str) -> None:
        """A claim to free a holder lives for a few requests. One whose creator died in between (same host: its
        process is gone; another host: it has stood for `infra.retrain_slot_stale_s` by this process's monotonic
        clock) would block the slot forever: delete it, said once."""
        from prefect.exceptions import ObjectNotFound

        with _client() as client:
            var = client.read_variable_by_name(claim)
            if var is None:
                return
            owner = Owner.parse(str(var.value))
            first = self._seen.setdefault(f"claim:{claim}:{var.value}", (0.0, time.monotonic()))[1]
            alive = owner.alive() if owner else None
            standing_s = time.monotonic() - first
            if alive is False or (alive is None and standing_s > self.cfg.infra.retrain_slot_stale_s):
                why = "its process is gone" if alive is False else f"it has stood for {standing_s:.0f} s"
                with contextlib.suppress(ObjectNotFound):  # another waiter removed it first
                    client.delete_variable_by_name(claim)
                self.say(f"removed a leftover claim to free the retrain slot ({claim}, by {var.value}): {why}")

    # -- heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        ctx = contextvars.copy_context()  # Prefect settings (API URL, test harness) live in context vars
        self._beat = threading.Thread(target=ctx.run, args=(self._heartbeat,), name="rlhf-slot-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        from prefect.client.schemas.actions import VariableUpdate

        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.read()
                if current is None or self.mine is None or current.token != self.mine.token:
                    self.lost = True
                    self.say(
                        "lost the retrain slot: another process judged this run dead (its heartbeat unseen for "
                        f"more than infra.retrain_slot_stale_s={self.cfg.infra.retrain_slot_stale_s:g} s); stopping "
                        "this run, so that two retrains never train, register or promote at once"
                    )
                    self.on_lost()
                    return
                self.mine.heartbeat = time.time()
                with _client() as client:
                    client.update_variable(VariableUpdate(name=self.name, value=asdict(self.mine)))
            except Exception as e:  # a missed beat is not fatal; the next one retries
                self.say(f"retrain slot heartbeat failed ({type(e).__name__}: {e}); retrying in {self.heartbeat_s:g} s")
