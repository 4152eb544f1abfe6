"""Concurrent changes to data/ with real processes: writers take turns, recovery never rolls back a live
ingest, and a retrain reads one pinned version however data/ changes meanwhile."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from components.data.ingest import IngestRefused, ingest
from components.data.schemas import shard_files
from components.data.versioning import Dvc, data_version, ensure_data, pinned_data, recover
from tests.data.test_ingest import GOOD, batch


@pytest.fixture
def versioned(project):
    ensure_data(project)
    return project


def slow_ingest(cfg, file: Path, marker: Path, hold_s: float, until: Path | None = None) -> subprocess.Popen:
    """`ingest` in its own process that, once it has validated and holds the lock, touches `marker` and
    then takes `hold_s` longer (or, with `until`, until that file exists) before writing its shard (as a slow
    `dvc push` would)."""
    script = textwrap.dedent(f"""
        import pathlib, time
        from components.config import compose
        from components.data.ingest import ingest
        cfg = compose({[f"root={cfg.root_path}", "data=demo_small"]!r})
        def step(s):
            print(s, flush=True)
            if s == "write shard":
                pathlib.Path({str(marker)!r}).touch()
                time.sleep({hold_s})
                until = {str(until) if until else None!r}
                deadline = time.time() + 120
                while until and not pathlib.Path(until).exists() and time.time() < deadline:
                    time.sleep(0.05)
        try:
            r = ingest(cfg, {str(file)!r}, "preferences", on_step=step)
            print("INGESTED", r.n_good, r.version_after)
        except Exception as e:
            print("REFUSED", e)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.2)


def test_two_ingests_of_the_same_ids_take_turns_and_only_one_lands(versioned, tmp_path):
    """Without the lock both would validate against the same data/ and commit the same ids twice."""
    cfg = versioned
    marker, release = tmp_path / "first-holds-the-lock", tmp_path / "second-is-waiting"
    first = slow_ingest(cfg, batch(tmp_path, GOOD, "a.jsonl"), marker, hold_s=0, until=release)
    wait_for(marker, first)
    second = slow_ingest(cfg, batch(tmp_path, GOOD, "b.jsonl"), tmp_path / "second", hold_s=0)
    said = []  # the first holds the lock until the second says it waits for it
    for line in second.stdout:
        said.append(line)
        if "waiting for data/" in line:
            release.touch()
            break
    release.touch()  # (the second ended without waiting: the assertions below say so)
    rest, err2 = second.communicate(timeout=300)
    out2 = "".join(said) + rest
    out, err = first.communicate(timeout=300)
    assert "INGESTED 5" in out, out + err
    assert "waiting for data/" in out2 and "in use by ingest a.jsonl" in out2, out2 + err2
    assert "REFUSED" in out2 and "already exists in data/" in out2, out2 + err2
    ids = [
        json.loads(line)["id"]
        for p in shard_files(cfg.data_path / "preferences")
        for line in p.read_text().splitlines()
    ]
    assert sorted(i for i in ids if i.startswith("new-")) == [f"new-{i}" for i in range(5)]
    assert Dvc(cfg.root_path).status() == {}


def test_recovery_waits_for_a_live_ingest_instead_of_rolling_it_back(versioned, tmp_path):
    cfg = versioned
    before = data_version(cfg.root_path)
    marker = tmp_path / "holding"
    first = slow_ingest(cfg, batch(tmp_path, GOOD), marker, hold_s=3)
    wait_for(marker, first)
    started = time.time()
    assert recover(cfg) is None, "the journal belongs to a live ingest: nothing to roll back"
    assert time.time() - started > 1, "recovery waited for the lock"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert data_version(cfg.root_path) != before and Dvc(cfg.root_path).status() == {}
    assert not (cfg.state_path / "ingest-journal.json").exists()


def test_a_retrain_reads_its_pinned_version_while_an_ingest_lands(versioned, tmp_path):
    cfg = versioned
    pinned = pinned_data(cfg)
    rows_before = sum(1 for p in shard_files(Path(pinned.path) / "preferences") for _ in p.read_text().splitlines())
    out, err = slow_ingest(cfg, batch(tmp_path, GOOD), tmp_path / "landing", hold_s=0).communicate(timeout=300)
    assert "INGESTED 5" in out, out + err  # in another process, as `rlhf ingest` (tests/data/test_ingest.py)
    assert data_version(cfg.root_path) != pinned.version
    rows_after = sum(1 for p in shard_files(Path(pinned.path) / "preferences") for _ in p.read_text().splitlines())
    assert rows_after == rows_before == pinned.rows["preferences"], "the snapshot did not change"
    assert pinned_data(cfg).path != pinned.path, "the next retrain pins the new version"


def test_a_refused_batch_behind_a_lock_holder_still_changes_nothing(versioned, tmp_path):
    cfg = versioned
    with pytest.raises(IngestRefused):
        ingest(cfg, batch(tmp_path, ['{"id": "x", "prompt": "no responses"}']), "preferences")
    assert Dvc(cfg.root_path).status() == {}
