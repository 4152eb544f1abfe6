"""retrain.mode=auto's decision (components/data/lineage.py): incremental only when the champion's shards are all in
today's data, unchanged, the config is the same and nothing new needs a full retrain."""

import pytest

from components.data.lineage import Parent, decide, manifest

CHAMPION = {"preferences/a.jsonl": "1", "demonstrations/a.jsonl": "2", "eval/a.jsonl": "3", "prompts/a.jsonl": "4"}


def parent(shards=CHAMPION, config="c1", version="3"):
    return Parent(version, {"manifest": dict(shards), "training_hash": config, "data_version": "d1"})


def test_new_judgements_on_the_champions_data_are_incremental():
    today = CHAMPION | {"preferences/b.jsonl": "5", "feedback/b.jsonl": "6"}
    d = decide("auto", parent(), today, "c1")
    assert d.incremental and d.new == ["feedback/b.jsonl", "preferences/b.jsonl"]
    assert "champion v3's data is contained in today's; 2 new shard(s)" in d.reason
    assert decide("incremental", parent(), today, "c1").incremental


@pytest.mark.parametrize(
    ("mode", "champion", "today", "config", "why"),
    [
        ("full", parent(), CHAMPION | {"preferences/b.jsonl": "5"}, "c1", "retrain.mode=full"),
        ("auto", None, CHAMPION, "c1", "no champion to continue from"),
        ("auto", Parent("3", None), CHAMPION | {"preferences/b.jsonl": "5"}, "c1", "no warm-start bundle"),
        ("auto", parent(), CHAMPION | {"preferences/b.jsonl": "5"}, "c2", "the config differs from champion v3's"),
        ("auto", parent(), CHAMPION | {"demonstrations/b.jsonl": "5"}, "c1", "new demonstrations since champion v3's"),
        ("auto", parent(), CHAMPION | {"eval/b.jsonl": "5"}, "c1", "new eval since champion v3's"),
        # another lineage: a shard of the champion's rewritten, or gone (e.g. `rlhf forget`, another project's data)
        ("auto", parent(), CHAMPION | {"preferences/a.jsonl": "9"}, "c1", "shard preferences/a.jsonl changed"),
        (
            "auto",
            parent(),
            {k: v for k, v in CHAMPION.items() if k != "prompts/a.jsonl"},
            "c1",
            "prompts/a.jsonl is gone",
        ),
        ("auto", parent(), CHAMPION, "c1", "no shard is new"),
    ],
)
def test_what_forces_a_full_retrain(mode, champion, today, config, why):
    d = decide(mode, champion, today, config)
    assert not d.incremental and why in d.reason, d.reason


def test_a_pool_and_an_unknown_mode():
    assert (
        "infra.training_pool" in decide("auto", parent(), CHAMPION | {"feedback/x.jsonl": "1"}, "c1", pool=True).reason
    )
    with pytest.raises(ValueError, match="retrain.mode='sometimes': expected auto | incremental | full"):
        decide("sometimes", None, {}, "c1")


def test_the_manifest_names_each_shard_by_kind_with_the_md5_of_its_bytes(tmp_path):
    (tmp_path / "preferences").mkdir()
    (tmp_path / "preferences" / "a.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "feedback").mkdir()
    (tmp_path / "feedback" / "b.jsonl").write_text("")
    m = manifest(tmp_path)
    # md5 of the bytes, hand-computed: `printf '{"id": 1}\n' | md5sum`; the empty file's is md5's of nothing
    assert m == {
        "preferences/a.jsonl": "c894a41c29657d70e0cc42a6e2ac7cba",
        "feedback/b.jsonl": "d41d8cd98f00b204e9800998ecf8427e",
    }


def test_the_training_hash_leaves_out_the_gate_and_the_incremental_settings():
    from components.config import compose
    from flows.caching import config_hash, training_hash

    base = ["data=demo_small"]
    h = training_hash(compose(base))
    for same in ("gate.min_win_rate=0.6", "reward.incremental_steps=5", "reward.replay_ratio=2", "retrain.mode=full"):
        assert training_hash(compose([*base, same])) == h, same
    assert training_hash(compose([*base, "ppo.learning_rate=1e-4"])) != h
    assert config_hash(compose([*base, "gate.min_win_rate=0.6"])) != config_hash(compose(base))  # "nothing new" sees it
