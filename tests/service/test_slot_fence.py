"""Issue 38, item 6: the retrain slot's fence. Each holder gets a larger generation; a holder another process took
the slot from, or whose heartbeat could not be written for the stale limit, is refused by `fence()` (what every
registration and promotion calls first), and its late heartbeat never overwrites the new holder's record.
Real Prefect (the session's test server); the outage is the slot's Prefect client failing to connect."""

import threading

import httpx
import pytest

from service import slot as slot_module
from service.slot import RetrainSlot, SlotLost
from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_stale_generation_is_refused_after_another_holder_took_the_slot(tmp_path):
    from prefect.client.orchestration import get_client

    project = make_project(tmp_path / "proj")
    said: list[str] = []
    first = RetrainSlot(project, said.append, on_lost=lambda: None)
    first.acquire()
    released = first.fence()
    first.release()

    old = RetrainSlot(project, said.append, on_lost=lambda: None)
    old.acquire()
    assert old.mine.generation > released, "a new holder after a release gets a larger generation"
    assert old.fence() == old.mine.generation
    # another process judged `old` dead (a Prefect outage longer than the stale limit), freed it and took the slot
    with get_client(sync_client=True) as client:
        client.delete_variable_by_name(old.name)  # what `free` does, less ending the old holder's runs
    new = RetrainSlot(project, said.append, on_lost=lambda: None)
    new.acquire()
    assert new.mine.generation > old.mine.generation

    with pytest.raises(SlotLost, match=f"lost the retrain slot .*generation {new.mine.generation}"):
        old.fence()
    assert old.lost and any("lost the retrain slot" in s for s in said), said
    # its heartbeat, written after a check that passed just before the slot changed hands, fails: by the record's id
    with pytest.raises(SlotLost):
        old._write_heartbeat()
    assert new.read() == new.mine, "the new holder's record is left as it was"
    assert new.fence() == new.mine.generation
    old.release()
    assert new.read().token == new.mine.token, "the old holder's release leaves the new holder's record"
    new.release()
    assert new.read() is None


def test_a_holder_whose_heartbeat_cannot_be_written_for_the_stale_limit_is_lost(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj", "infra.retrain_slot_stale_s=1.5")
    stopped, said = threading.Event(), []
    slot = RetrainSlot(project, said.append, on_lost=stopped.set)
    slot.heartbeat_s = 0.2
    slot.acquire()
    reachable = slot_module._client

    def outage():
        raise httpx.ConnectError("[Errno 111] Connection refused (a Prefect outage of the test)")

    monkeypatch.setattr(slot_module, "_client", outage)
    with pytest.raises(SlotLost, match="could not confirm that it still holds the retrain slot"):
        slot.fence()  # within the limit: not lost yet, but nothing is registered without a confirmation
    assert stopped.wait(10), f"the holder never gave up its slot: {said[-2:]}"
    assert slot.lost and "heartbeat could not be written for" in slot.lost_why
    assert any("retrain slot heartbeat failed" in s for s in said), said
    monkeypatch.setattr(slot_module, "_client", reachable)  # Prefect is back, its record still there: still lost
    with pytest.raises(SlotLost, match="heartbeat could not be written for .* infra.retrain_slot_stale_s=1.5"):
        slot.fence()
    slot.release()
    assert slot.read() is None


def test_a_release_from_another_thread_while_the_slot_is_being_taken_waits_for_it(tmp_path):
    """CI race (issue 38's chaos test): a release from one thread while another is between creating the slot's
    record and starting its heartbeat joined a thread not yet started, or left a heartbeat beating on a slot
    already released. Taking and releasing now take turns: the release waits, then ends the heartbeat too."""
    project = make_project(tmp_path / "proj")
    lost: list[bool] = []
    slot = RetrainSlot(project, lambda m: None, on_lost=lambda: lost.append(True))
    slot.heartbeat_s = 0.1
    between, go_on = threading.Event(), threading.Event()
    count = slot._count_generation

    def count_then_pause(generation: int) -> None:
        count(generation)
        between.set()  # the record is created and `mine` is set; the heartbeat is not started yet
        go_on.wait(10)

    slot._count_generation = count_then_pause
    taker = threading.Thread(target=slot.acquire)
    taker.start()
    assert between.wait(30)
    assert slot.mine is not None
    errors: list[BaseException] = []

    def release() -> None:
        try:
            slot.release()
        except BaseException as e:  # noqa: BLE001 - what the racer saw: RuntimeError from join
            errors.append(e)

    releaser = threading.Thread(target=release)
    releaser.start()
    releaser.join(0.5)
    assert releaser.is_alive(), "the release waits while the slot is being taken"
    go_on.set()
    taker.join(30)
    releaser.join(30)
    assert not errors, errors
    assert slot.mine is None and slot.read() is None, "released: no record left"
    assert slot._beat is not None and not slot._beat.is_alive(), "and no heartbeat left beating"
    assert not lost
