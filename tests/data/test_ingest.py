"""Ingest against a real DVC repo in a tmp dir: versions change only for good batches, never half-way."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.data.ingest import IngestRefused, ingest
from components.data.versioning import DVC_FILE, Dvc, data_version, ensure_data, recover


def snapshot(cfg) -> tuple[str, str]:
    """(hash of every file under data/, bytes of data.dvc)"""
    h = hashlib.sha256()
    for p in sorted(cfg.data_path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(cfg.data_path)).encode() + p.read_bytes())
    return h.hexdigest(), (cfg.root_path / DVC_FILE).read_text()


def batch(tmp_path: Path, rows: list, name: str = "batch.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


GOOD = [
    {"id": f"new-{i}", "prompt": f"A fresh prompt number {i}", "chosen": f"great answer {i}", "rejected": f"bad {i}"}
    for i in range(5)
]


@pytest.fixture
def versioned(project):
    ensure_data(project)
    return project


def test_demo_is_generated_versioned_and_pushed(versioned):
    cfg = versioned
    assert data_version(cfg.root_path).endswith(".dir")
    assert Dvc(cfg.root_path).status() == {}
    assert any((cfg.state_path / "dvc-remote").rglob("*")), "dvc push did not reach the local remote"


def test_fresh_clone_pulls_from_remote_else_regenerates(versioned):
    cfg = versioned
    version = data_version(cfg.root_path)
    # a clone of the repo: data.dvc present, data/ and the DVC cache absent
    shutil.rmtree(cfg.data_path)
    shutil.rmtree(cfg.root_path / ".dvc" / "cache")
    assert ensure_data(cfg).origin == "pulled"
    # remote gone too: the deterministic generator reproduces the recorded version
    shutil.rmtree(cfg.data_path)
    shutil.rmtree(cfg.root_path / ".dvc" / "cache")
    shutil.rmtree(cfg.state_path / "dvc-remote")
    state = ensure_data(cfg)
    assert (state.origin, state.version) == ("generated", version)
    assert Dvc(cfg.root_path).status() == {}


def test_good_batch_changes_version_and_adds_shard(versioned, tmp_path):
    cfg = versioned
    before = data_version(cfg.root_path)
    result = ingest(cfg, batch(tmp_path, GOOD), "preferences")
    assert result.n_good == 5 and result.n_bad == 0
    assert result.version_before == before != result.version_after == data_version(cfg.root_path)
    assert Path(result.shard).parent == cfg.data_path / "preferences"
    assert [json.loads(line)["id"] for line in Path(result.shard).read_text().splitlines()] == [r["id"] for r in GOOD]
    assert Dvc(cfg.root_path).status() == {}


def test_feedback_ingests_through_the_cli_and_a_bad_batch_changes_nothing(versioned, tmp_path, capsys, prefect_server):
    from cli.main import main

    cfg = versioned
    rows = [
        {"id": f"thumb-{i}", "prompt": f"A served prompt {i}", "response": f"a served answer {i}", "label": i % 2}
        for i in range(4)
    ]
    overrides = [f"root={cfg.root_path}", "data=demo_small"]
    before = snapshot(cfg)
    bad = [*rows, {**rows[0], "id": "thumb-9", "label": "up"}]
    assert main(["ingest", str(batch(tmp_path, bad, "bad.jsonl")), "--kind", "feedback", *overrides]) == 1
    err = capsys.readouterr().err
    assert "label_values" in err and "line 5" in err and "Traceback" not in err
    assert snapshot(cfg) == before
    assert main(["ingest", str(batch(tmp_path, rows, "thumbs.jsonl")), "--kind", "feedback", *overrides]) == 0
    shards = sorted((cfg.data_path / "feedback").glob("ingest-*.jsonl"))
    assert len(shards) == 1 and len(shards[0].read_text().splitlines()) == 4
    assert Dvc(cfg.root_path).status() == {} and data_version(cfg.root_path) != before[1]


def test_bad_batch_changes_nothing(versioned, tmp_path):
    cfg = versioned
    before = snapshot(cfg)
    bad = GOOD[:4] + [{**GOOD[0], "id": "dup-content"}]
    with pytest.raises(IngestRefused) as e:
        ingest(cfg, batch(tmp_path, bad), "preferences")
    assert "no_duplicates" in str(e.value) and "line 5" in str(e.value)
    assert snapshot(cfg) == before
    with pytest.raises(IngestRefused, match="eval prompts are frozen"):
        ingest(cfg, batch(tmp_path, GOOD), "eval")  # the data set has its eval prompts: one batch starts them
    assert snapshot(cfg) == before


def test_quarantine_ingests_good_rows_and_keeps_bad_ones_with_reasons(versioned, tmp_path):
    cfg = versioned
    rows = GOOD[:3] + ["{broken", {**GOOD[3], "chosen": "same", "rejected": "same"}]
    result = ingest(cfg, batch(tmp_path, rows), "preferences", quarantine=True)
    assert (result.n_good, result.n_bad) == (3, 2)
    q = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    assert {r["line"]: r["rules"] for r in q} == {4: ["json"], 5: ["chosen_differs_from_rejected"]}
    assert q[0]["raw"] == "{broken"
    assert not Path(result.quarantine).is_relative_to(cfg.data_path)
    assert len(Path(result.shard).read_text().splitlines()) == 3


# Valid JSON holding the six characters \ud83d: Python parses it to a lone surrogate that no UTF-8 writer can encode.
HALF_EMOJI = '{"id": "new-half", "prompt": "A prompt with half an emoji \\ud83d", "chosen": "good", "rejected": "bad"}'


def test_lone_surrogate_row_is_refused_and_changes_nothing(versioned, tmp_path):
    cfg = versioned
    before = snapshot(cfg)
    with pytest.raises(IngestRefused) as e:
        ingest(cfg, batch(tmp_path, GOOD[:2] + [HALF_EMOJI] + GOOD[2:]), "preferences")
    assert "valid_unicode" in str(e.value) and "line 3" in str(e.value)
    assert [loc for f in e.value.report.findings for loc in f.locations] == [(str(tmp_path / "batch.jsonl"), 3)]
    assert snapshot(cfg) == before


def test_quarantine_ingests_good_rows_around_a_lone_surrogate(versioned, tmp_path):
    cfg = versioned
    result = ingest(cfg, batch(tmp_path, GOOD[:2] + [HALF_EMOJI] + GOOD[2:]), "preferences", quarantine=True)
    assert (result.n_good, result.n_bad, result.changed) == (5, 1, True)
    q = [json.loads(line) for line in Path(result.quarantine).read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["rules"], r["raw"]) for r in q] == [(3, ["valid_unicode"], HALF_EMOJI)]
    shard = Path(result.shard).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in shard] == [r["id"] for r in GOOD]
    assert Dvc(cfg.root_path).status() == {}


def test_failure_between_shard_and_dvc_add_rolls_back(versioned, tmp_path):
    cfg = versioned
    before = snapshot(cfg)

    def crash(step):
        if step == "dvc add":
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ingest(cfg, batch(tmp_path, GOOD), "preferences", on_step=crash)
    assert snapshot(cfg) == before


@pytest.mark.parametrize("kill_at", ["dvc add", "dvc push"])
def test_kill_half_way_is_rolled_back_by_next_command(versioned, tmp_path, kill_at):
    cfg = versioned
    before = snapshot(cfg)
    script = textwrap.dedent(f"""
        import os, signal
        from components.config import compose
        from components.data.ingest import ingest
        cfg = compose({[f"root={cfg.root_path}", "data=demo_small"]!r})
        def step(s):
            if s == {kill_at!r}:
                os.kill(os.getpid(), signal.SIGKILL)
        ingest(cfg, {str(batch(tmp_path, GOOD))!r}, "preferences", on_step=step)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (cfg.state_path / "ingest-journal.json").exists()
    assert list((cfg.data_path / "preferences").glob("ingest-*")), "the shard was written before the kill"
    assert "rolled back" in recover(cfg)
    assert snapshot(cfg) == before
    assert Dvc(cfg.root_path).status() == {}
    # and the batch can simply be ingested again
    assert ingest(cfg, batch(tmp_path, GOOD), "preferences").n_good == 5


def test_local_edits_to_data_are_refused(versioned, tmp_path):
    cfg = versioned
    with (cfg.data_path / "prompts" / "demo-000.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "sneaky", "prompt": "hand edited"}) + "\n")
    from components.data.versioning import DataVersionError

    with pytest.raises(DataVersionError, match="does not match"):
        ingest(cfg, batch(tmp_path, GOOD), "preferences")
    with pytest.raises(DataVersionError, match="differs from data.dvc"):
        ensure_data(cfg)


def test_the_ingest_index_stays_right_after_a_refusal_a_quarantine_and_a_checkout(versioned, tmp_path):
    """Issue 40: an ingest checks its batch against the per-shard index (components/data/index.py), not the data
    read again; at each step its findings are those of the same check reading every shard (index_dir=None)."""
    from components.data.validation import validate_batch

    cfg = versioned
    index = cfg.state_path / "index"

    def rules(path: Path, kind: str = "preferences") -> tuple[dict, dict]:
        with_index, _ = validate_batch(path, kind, cfg.data, cfg.state_path / "gx", cfg.data_path, index)
        reading_all, _ = validate_batch(path, kind, cfg.data, cfg.state_path / "gx", cfg.data_path, None)
        return ({f.rule: f.count for f in with_index.findings}, {f.rule: f.count for f in reading_all.findings})

    before = (cfg.root_path / DVC_FILE).read_text()
    first = batch(tmp_path, GOOD[:3], "first.jsonl")
    ingest(cfg, first, "preferences")
    indexed, read = rules(first)
    assert indexed == read and indexed == {"id_new": 3, "not_already_in_data": 3}, indexed
    assert {p.name for p in (index / "preferences").iterdir()} == {
        f"{p.name}.json" for p in (cfg.data_path / "preferences").glob("*.jsonl")
    }, "one entry per shard, the new one's made when it is first read"

    with pytest.raises(IngestRefused):  # refused: nothing lands, nothing in the index goes stale
        ingest(cfg, batch(tmp_path, [GOOD[0], "{broken"], "refused.jsonl"), "preferences")
    fresh = batch(tmp_path, GOOD[3:], "fresh.jsonl")
    assert rules(fresh) == ({}, {})

    mixed = batch(tmp_path, [*GOOD[3:], {**GOOD[0], "id": "other-id"}], "mixed.jsonl")
    assert ingest(cfg, mixed, "preferences", quarantine=True).n_good == 2  # the duplicate of a landed row set aside
    indexed, read = rules(fresh)
    assert indexed == read == {"id_new": 2, "not_already_in_data": 2}, indexed

    (cfg.root_path / DVC_FILE).write_text(before)  # back to the version before both ingests
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "-q", "--force", DVC_FILE], cwd=cfg.root_path, check=True)
    assert rules(first) == ({}, {}), "the rows of a version checked out away are no longer duplicates"
    assert ingest(cfg, first, "preferences").n_good == 3
    (shard,) = [p for p in (cfg.data_path / "preferences").glob("ingest-*.jsonl")]
    shard.write_text("".join(ln + "\n" for ln in shard.read_text().splitlines() if GOOD[0]["id"] not in ln))
    assert rules(batch(tmp_path, [GOOD[0]], "again.jsonl")) == ({}, {}), "a shard rewritten in place is read again"


def test_an_index_entry_made_by_other_key_code_is_made_again(tmp_path):
    """The key code is in every entry's stamp: a change to how keys are computed never checks a batch against keys of
    the old kind (duplicates and eval leakage would pass the ingest, and every retrain's full validation refuse it)."""
    from components.data.index import existing
    from components.data.validation import _content_key, _id_key

    data, index = tmp_path / "data", tmp_path / "index"
    (data / "preferences").mkdir(parents=True)
    (data / "preferences" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    first = existing(data, "preferences", index, _id_key, _content_key)
    assert first.ids == {r["id"] for r in GOOD} and len(first.keys["preferences_pairwise"]) == 5

    def other_key(frame, obj):  # what a later version might compute
        return "v2-" + _content_key(frame, obj)

    again = existing(data, "preferences", index, _id_key, other_key)
    assert all(k.startswith("v2-") for k in again.keys["preferences_pairwise"]), "made again, not read back"
    assert existing(data, "preferences", index, _id_key, _content_key).keys == first.keys
