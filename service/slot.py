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
thread, as `rlhf run` unwinds on it), so two retrains never train, register and promote at once.

The fence (issue 38): each holder gets a generation number, one more than any before it in the project (the counter
Variable `<slot>_generation` survives release), and everything that registers or moves `champion` calls `fence()`
right before: not `lost`, a heartbeat written within the stale limit, and the record, addressed by the id of the
Variable this holder created, still there with its token and generation. A holder whose heartbeat could not be
written for `infra.retrain_slot_stale_s` treats the slot as lost, as its waiters will. The heartbeat writes by that
id too (PATCH /variables/{id}): a record freed and created anew by the next holder has another id, so a late
heartbeat can never overwrite it. Prefect's own global concurrency limits were not used for this:
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
from dataclasses import asdict, dataclass, replace

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
    generation: int = 0  # the fencing token: larger for each new holder of the project's slot (0: an older record)

    def describe(self) -> str:
        owner = Owner.parse(self.owner)
        return (
            f"flow run {self.flow_run_name or '?'} ({self.flow_run_id or 'no flow run'}), "
            f"{owner.describe() if owner else self.owner}, since {_when(self.since)}"
            + (f", slot generation {self.generation}" if self.generation else "")
        )


class SlotLost(Exception):
    """This process no longer holds the retrain slot (or cannot confirm that it does): what it was about to register or
    promote must not be. The message is one clause, to which the caller adds what it did not do and what to do."""


class SlotBusy(Exception):
    """`acquire(wait_s=...)` gave up: a live holder kept the slot for longer. The message names the holder."""


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
    another live retrain holds it (saying so every 30 s), frees it from a dead one. Whatever registers or moves
    `champion` under it calls `fence()` first (module docstring)."""

    def __init__(self, cfg: Config, say: Callable[[str], None], on_lost: Callable[[], None] = stop_main_thread):
        self.cfg, self.say, self.on_lost = cfg, say, on_lost
        self.name = slot_name(cfg)
        self.counter = f"{self.name}_generation"[:255]  # the last generation handed out; outlives every holder
        self.mine: Holder | None = None
        self.lost = False
        self.lost_why = ""
        self.heartbeat_s = HEARTBEAT_S
        self._seen: dict[str, tuple[float, float]] = {}  # holder token -> (heartbeat value, monotonic first seen)
        self._highest_seen = 0  # the largest generation of any record this process read
        self._var_id = None  # the id of the Variable this holder created: what its heartbeat and release address
        self._written = 0.0  # monotonic time just before this holder's last heartbeat write that succeeded
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        # taking the slot (record, then heartbeat) and releasing it never interleave: a release from another thread
        # while the taker is between the two would join a heartbeat not yet started, or leave one beating
        self._turn = threading.RLock()

    @property
    def stale_s(self) -> float:
        return self.cfg.infra.retrain_slot_stale_s

    # -- public
    def __enter__(self) -> RetrainSlot:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self, wait_s: float | None = None) -> None:
        """Take the slot, waiting while a live holder keeps it; with `wait_s`, at most that long (SlotBusy after)."""
        run_id, run_name = _current_flow_run()
        waiting_since, said = time.time(), 0.0
        while True:
            now = time.time()
            holder = Holder(uuid.uuid4().hex, run_id, run_name, str(Owner.me()), now, now, self._next_generation())
            with self._turn:
                if self._create(holder):
                    self._start_heartbeat()
                    taken = True
                else:
                    taken = False
            if taken:
                if now - waiting_since > POLL_S:
                    self.say(f"took the retrain slot after waiting {now - waiting_since:.0f} s")
                return
            current = self.read()
            if current is None:
                continue  # released in between: try again at once
            if (reason := self.verdict(current)) and self.free(current, reason):
                continue
            if wait_s is not None and now - waiting_since >= wait_s:
                raise SlotBusy(f"the retrain slot is held by {current.describe()}")
            if now - said >= SAY_EVERY_S:
                said = now
                self.say(
                    f"waiting for the retrain slot ({now - waiting_since:.0f} s so far): held by "
                    f"{current.describe()}, its heartbeat last changed {self.unchanged_s(current):.0f} s ago"
                )
            time.sleep(POLL_S)  # in the main thread: SIGTERM / Ctrl-C stop the wait at once

    def release(self) -> None:
        with self._turn:
            self._stop.set()
            if self._beat is not None and self._beat.is_alive():
                self._beat.join(timeout=5)
            if self.mine is not None:
                record = self._record()
                if record is not None and record[1] == self._var_id and record[0].token == self.mine.token:
                    self._delete(self._var_id)  # by id: never a record another holder created since
                self.mine = None

    def fence(self) -> int:
        """Right before registering or moving an alias: is this process still the holder? Not lost, its heartbeat
        written within `infra.retrain_slot_stale_s`, its record still its own (token and generation), and a heartbeat
        written now by the record's id (a waiter's stale clock starts over). -> the generation, for the version's tag
        `slot_generation`. SlotLost otherwise (and `lost` set when the slot is gone); the caller refuses."""
        if self.mine is None:
            raise SlotLost("this process does not hold the retrain slot")
        if self.lost:
            raise SlotLost(f"this run lost the retrain slot ({self.lost_why})")
        if silent := self._silent():
            self._lose(silent)
            raise SlotLost(f"this run lost the retrain slot ({silent})")
        try:
            self._check_record()
            self._write_heartbeat()
        except SlotLost as e:
            self._lose(str(e))
            raise SlotLost(f"this run lost the retrain slot ({e})") from None
        except Exception as e:  # Prefect unreachable: it cannot tell, so it must not go ahead
            raise SlotLost(
                f"this run could not confirm that it still holds the retrain slot ({type(e).__name__}: {e})"
            ) from None
        return self.mine.generation

    # -- holder records
    def read(self) -> Holder | None:
        record = self._record()
        return record[0] if record else None

    def _record(self):
        """The slot's holder and the id of its Variable, or None when the slot is free."""
        with _client() as client:
            var = client.read_variable_by_name(self.name)
        if var is None:
            return None
        try:
            holder = Holder(**var.value)
        except TypeError:  # not written by this version: treat as a holder with no owner and no heartbeat
            holder = Holder("unknown", "", "", "", 0.0, 0.0)
        self._highest_seen = max(self._highest_seen, holder.generation)
        return holder, var.id

    def _create(self, holder: Holder) -> bool:
        """Create the slot's record (atomic: its name is unique), then count its generation as handed out."""
        from prefect.client.schemas.actions import VariableCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            with _client() as client:
                var = client.create_variable(
                    VariableCreate(name=self.name, value=asdict(holder), tags=["rlhf", "retrain-slot"])
                )
        except ObjectAlreadyExists:
            return False
        self.mine, self._var_id, self._written, self.lost, self.lost_why = holder, var.id, time.monotonic(), False, ""
        try:
            self._count_generation(holder.generation)
        except BaseException:
            self.release()  # a holder whose generation is not counted could be followed by one with the same number
            raise
        return True

    def _next_generation(self) -> int:
        """One more than the counter and than any holder's record this process has read (a holder freed before it
        counted its own generation is still outnumbered by whoever freed it, having read its record)."""
        with _client() as client:
            var = client.read_variable_by_name(self.counter)
        counted = var.value if var is not None and isinstance(var.value, int) else 0
        return max(counted, self._highest_seen) + 1

    def _count_generation(self, generation: int) -> None:
        """Raise the counter to `generation`. Only the holder writes it, right after it created the slot, so no two
        live holders race on it; a read-then-write all the same, it never lowers the counter."""
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        with _client() as client:
            var = client.read_variable_by_name(self.counter)
            if var is None:
                try:
                    client.create_variable(VariableCreate(name=self.counter, value=generation, tags=["rlhf"]))
                    return
                except ObjectAlreadyExists:
                    var = client.read_variable_by_name(self.counter)
            if not isinstance(var.value, int) or var.value < generation:
                client.update_variable(VariableUpdate(name=self.counter, value=generation))

    def _delete(self, var_id) -> bool:
        """Delete a record by the id of its Variable: False when it is gone already (freed, or released)."""
        import httpx

        try:
            with _client() as client:
                client.request("DELETE", "/variables/{id}", path_params={"id": var_id})
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 404:
                return False
            raise
        return True

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
            self.stale_s,
        )

    def free(self, holder: Holder, reason: str) -> bool:
        """Delete a stale holder's record (only one waiter does) and end what it left running. False when another
        waiter holds the claim to free it (the caller waits a poll, then looks again), or the holder beat meanwhile."""
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
                record = self._record()
                if record is None or record[0].token != holder.token or record[0].heartbeat != holder.heartbeat:
                    return False  # released, freed by another, or it beat: look again
                if not self._delete(record[1]):  # by id: never a record created since
                    return False
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
            if alive is False or (alive is None and standing_s > self.stale_s):
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
        """Every `heartbeat_s`: check the record is still this holder's, then write the heartbeat. A holder that
        lost the slot, or could not write its heartbeat for the stale limit (its waiters may free it by now), stops
        its run (`on_lost`); a missed beat short of that is said and retried."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._check_record()
                self._write_heartbeat()
            except SlotLost as e:
                self._lose(str(e), stop=True)
                return
            except Exception as e:
                if silent := self._silent():
                    self._lose(silent, stop=True)
                    return
                self.say(
                    f"retrain slot heartbeat failed ({type(e).__name__}: {e}); retrying in {self.heartbeat_s:g} s "
                    f"(the slot counts as lost once none was written for infra.retrain_slot_stale_s={self.stale_s:g} s)"
                )

    def _check_record(self) -> None:
        """SlotLost unless the slot's record is this holder's: its Variable, token and generation."""
        record = self._record()
        if record is None:
            raise SlotLost("another process judged this run dead and freed the slot; it is free now")
        current, var_id = record
        if var_id != self._var_id or current.token != self.mine.token or current.generation != self.mine.generation:
            raise SlotLost(
                f"another process judged this run dead and freed the slot; it is held by {current.describe()} now, "
                f"this run had slot generation {self.mine.generation}"
            )

    def _write_heartbeat(self) -> None:
        """Write the heartbeat into this holder's own record, addressed by its Variable's id: a record deleted since,
        or created anew under the same name by the next holder, has another id, and the write fails (404: SlotLost)
        instead of overwriting it. Prefect has no compare-and-set on a Variable's value; its id is the compare here."""
        import httpx
        from prefect.client.schemas.actions import VariableUpdate

        before, beat = time.monotonic(), replace(self.mine, heartbeat=time.time())
        try:
            with _client() as client:
                client.request(
                    "PATCH",
                    "/variables/{id}",
                    path_params={"id": self._var_id},
                    json=VariableUpdate(value=asdict(beat)).model_dump(mode="json", exclude_unset=True),
                )
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 404:
                raise SlotLost("another process judged this run dead and freed the slot") from None
            raise
        self.mine, self._written = beat, before

    def _silent(self) -> str | None:
        """Why this holder must count the slot as lost because its heartbeat went unwritten too long, or None."""
        silent_s = time.monotonic() - self._written
        if silent_s <= self.stale_s:
            return None
        return (
            f"its heartbeat could not be written for {silent_s:.0f} s, over infra.retrain_slot_stale_s="
            f"{self.stale_s:g}, so a waiter may have freed it"
        )

    def _lose(self, why: str, stop: bool = False) -> None:
        if not self.lost:
            self.lost, self.lost_why = True, why
            self.say(
                f"lost the retrain slot: {why}; stopping this run before it registers or promotes, so that two "
                "retrains never train, register or promote at once"
            )
        if stop:
            self.on_lost()
