"""Issue 38, item 6: forget on request. On a real DVC repo (demo_small, a local remote) and a real MLflow store, with
signed answers and votes as the serving process makes them (tests/registry/signed_answers.py), harvested into the data
by `rlhf ingest --from-traces`'s own steps: a forgotten trace's row leaves the data as a new data version and a later
harvest does not bring it back; `--rater alice --purge` removes her rows (bob's stay), her votes (bob's stay) and the
old shard objects that held them from the DVC cache and remote, in every older version; the record names ids, never
a prompt."""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from cli.main import main
from components.data.forget import BadSelector, drop_rows, ids_in, selector, version_range
from components.data.ingest import ingest
from components.data.schemas import read_jsonl, shard_files
from components.data.versioning import data_version, ensure_data, open_repo, remote_url, require_clean
from components.registry.feedback import FEEDBACK
from flows.forget import FORGOTTEN, ForgetRefused, forget, summary
from flows.ingest import HarvestState, traces_to_file
from tests.conftest import make_project
from tests.registry.signed_answers import serving_desk

PROMPTS = ["Tell me about the lake", "What is a good soup", "Name a quiet place", "Describe the hills"]
ANSWERS = ["the lake is cold and deep", "a leek soup is good", "a library is quiet", "the hills are green"]


def feedback_ids(cfg) -> set[str]:
    return {row["id"] for p in shard_files(cfg.data_path / "feedback") for _, row in read_jsonl(p, "feedback").rows}


def harvest(cfg):
    batch = traces_to_file(cfg, since_ms=0)
    result = ingest(cfg, batch.path, "feedback", quarantine=True) if batch.path else None
    batch.landed(result)
    return batch, result


def object_paths(cfg, md5: str) -> list:
    """Where DVC keeps object `md5`: the local cache and the local remote."""
    rel = f"files/md5/{md5[:2]}/{md5[2:]}"
    return [cfg.root_path / ".dvc" / "cache" / rel, __import__("pathlib").Path(remote_url(cfg)) / rel]


def thumbs_by(trace_id: str) -> list[str]:
    trace = mlflow.get_trace(trace_id)
    return sorted(a.source.source_id for a in trace.info.assessments if a.name == FEEDBACK)


def test_drop_rows_keeps_every_other_line_and_deletes_an_emptied_shard():
    shards = {
        "a.jsonl": '{"id": "tr-1", "prompt": "p"}\n{"id": "x", "prompt": "q"}\nnot json\n\n',
        "b.jsonl": '{"id": "tr-1", "prompt": "p"}\n',
        "c.jsonl": '{"id": "y"}\n',
    }
    edits = drop_rows(shards, {"tr-1"})
    assert [(e.name, e.removed, e.kept) for e in edits] == [
        ("a.jsonl", ["tr-1"], '{"id": "x", "prompt": "q"}\nnot json\n'),
        ("b.jsonl", ["tr-1"], None),
    ]
    assert ids_in(shards["a.jsonl"], {"tr-1", "tr-2"}) == {"tr-1"} and ids_in("no ids", {"tr-1"}) == set()
    assert version_range(["5", "3", "4"]) == "v3..v5" and version_range(["3", "5"]) == "v3, v5"
    for bad in ({}, {"rater": "a", "user": "u"}, {"traces": ["tr-'1"]}, {"rater": ""}):
        with pytest.raises(BadSelector):
            selector(**bad)


def test_bad_input_gets_one_sentence_and_a_usage_exit_code(capsys):
    assert main(["forget"]) == 2
    assert "say whose rows to forget" in capsys.readouterr().err
    assert main(["forget", "--rater", "alice", "--trace", "tr-1"]) == 2
    assert "one selector at a time, got --rater and --trace" in capsys.readouterr().err
    assert main(["forget", "--user", "o'brien"]) == 2
    assert "is not an id" in capsys.readouterr().err


def test_forget_a_trace_then_a_rater_with_purge(tmp_path):
    t0 = time.time()
    cfg = make_project(tmp_path / "proj")
    ensure_data(cfg)
    desk = serving_desk(cfg, ["alice", "bob"])
    a1, a2, b1, both = desk.answer(PROMPTS, ANSWERS)
    for rater, trace_id, up in [
        ("alice", a1, True),
        ("alice", a2, False),
        ("bob", b1, True),
        ("alice", both, True),
        ("bob", both, True),
    ]:
        assert desk.vote(rater, trace_id, up).status == 200
    mlflow.flush_trace_async_logging()
    _, landed = harvest(cfg)
    assert landed.n_good == 4 and {a1, a2, b1, both} <= feedback_ids(cfg)
    v1 = landed.version_after
    client = mlflow.MlflowClient()  # a model trained on v1, another on the demo data alone
    client.create_registered_model(cfg.tracking.registered_model_name)
    for version in (v1, landed.version_before):
        client.create_model_version(
            cfg.tracking.registered_model_name, "file:///nowhere", tags={"data_version": version}
        )

    # unknown ids and users: one sentence, nothing changes
    with pytest.raises(ForgetRefused, match="0 rows matched: no feedback row has the id tr-nope"):
        forget(cfg, selector(traces=["tr-nope"]))
    with pytest.raises(ForgetRefused, match="found 0 traces .* record the user 'u-1'"):
        forget(cfg, selector(user="u-1"))
    assert data_version(cfg.root_path) == v1

    # --trace, no purge: the row leaves the data in a new version; a harvest does not bring it back
    one = forget(cfg, selector(traces=[a1]), reason="asked by the user")
    assert one.removed == [a1] and one.version_before == v1 and one.changed
    assert a1 not in feedback_ids(cfg) and require_clean(cfg, open_repo(cfg)) == one.version_after
    (old_md5,) = one.old_objects.values()  # the shard's md5 as DVC listed it in v1
    listing = json.loads(object_paths(cfg, v1)[0].read_text())
    assert old_md5 in {e["md5"] for e in listing}
    assert all(p.exists() for p in object_paths(cfg, old_md5)), "no purge: older versions keep their objects"
    assert one.history.versions == [v1] and one.history.models == ["1"], one.history
    text = "\n".join(summary(one))
    assert "still in the history" in text and "registered version(s) v1 were trained" in text, text
    again, _ = harvest(cfg)
    assert again.path is None and a1 not in feedback_ids(cfg)
    assert HarvestState.load(cfg).refused[a1] == [FORGOTTEN]

    # --rater alice --purge: her rows go (the one bob voted on too), bob's stay
    two = forget(cfg, selector(rater="alice"), reason="GDPR request 17", purge=True)
    assert sorted(two.removed) == sorted([a2, both]) and sorted(two.refused) == sorted([a1, a2, both])
    ids = feedback_ids(cfg)
    assert b1 in ids and not {a1, a2, both} & ids and require_clean(cfg, open_repo(cfg)) == two.version_after
    assert len(ids) == 300 + 1  # the demo's feedback rows are untouched
    # her votes are deleted, bob's stay
    assert thumbs_by(a1) == [] and thumbs_by(a2) == [] and thumbs_by(both) == ["bob"] and thumbs_by(b1) == ["bob"]
    # every object that held her rows is gone from the cache and the remote: v1's shard and the rewrite of `one`
    gone = {old_md5, *two.old_objects.values()}
    assert two.history.objects == gone and not any(p.exists() for m in gone for p in object_paths(cfg, m))
    assert two.purged.incomplete == sorted([v1, one.version_after]) and two.history.models == ["1"]
    text = "\n".join(summary(two))
    assert "now incomplete" in text and v1 in text and "`rlhf raters revoke alice`" in text, text
    assert "roll back or archive those versions" in text, text
    # a later harvest does not bring `both` back (bob's vote still stands)
    again, _ = harvest(cfg)
    assert again.path is None and again.harvest.known >= 2 and not {a1, a2, both} & feedback_ids(cfg)

    # the record: who, why, ids and versions; never a prompt or a response
    record = json.loads(open(two.record).read())
    assert record["selector"] == {"rater": "alice"} and record["reason"] == "GDPR request 17"
    assert (
        sorted(record["removed_row_ids"]) == sorted([a2, both]) and record["data_version_before"] == one.version_after
    )
    assert record["mlflow_run_id"] == two.run_id and record["purge"]["votes"] == 3
    raw = open(two.record).read() + open(one.record).read()
    assert not any(s in raw for s in PROMPTS + ANSWERS)
    run = client.get_run(two.run_id)
    assert run.info.run_name == "forget" and run.data.tags["selector"] == "rater=alice"
    assert run.data.tags["reason"] == "GDPR request 17"
    assert json.loads(open(mlflow.artifacts.download_artifacts(f"runs:/{two.run_id}/forget.json")).read()) == record

    print(f"forget test: {time.time() - t0:.1f} s")
