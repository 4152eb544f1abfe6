import hashlib
from pathlib import Path

from components.config import DataConfig
from components.data.demo import DemoGenerator, lexicon_sentiment, write_demo
from components.data.schemas import normalise_text


def tree_md5(d: Path) -> str:
    h = hashlib.md5()
    for p in sorted(d.rglob("*.jsonl")):
        h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = DataConfig(n_demonstrations=200, n_preferences=200, n_prompts=50, n_eval=20)
    write_demo(cfg, tmp_path / "a")
    write_demo(cfg, tmp_path / "b")
    write_demo(
        DataConfig(seed=cfg.seed + 1, n_demonstrations=200, n_preferences=200, n_prompts=50, n_eval=20), tmp_path / "c"
    )
    assert tree_md5(tmp_path / "a") == tree_md5(tmp_path / "b")
    assert tree_md5(tmp_path / "a") != tree_md5(tmp_path / "c")


def test_sizes_shapes_and_disjoint_eval():
    cfg = DataConfig(n_demonstrations=300, n_preferences=400, n_prompts=80, n_eval=30)
    sets = DemoGenerator(cfg).generate()
    assert {k: len(v) for k, v in sets.items()} == {
        "demonstrations": 300,
        "preferences": 400,
        "prompts": 80,
        "eval": 30,
        "feedback": 1000,
    }
    ranked = [r for r in sets["preferences"] if "responses" in r]
    assert 0.15 < len(ranked) / 400 < 0.45
    assert all(3 <= len(r["responses"]) <= cfg.max_rank_k for r in ranked)
    train = {
        normalise_text(r["prompt"]) for k in ("demonstrations", "preferences", "prompts", "feedback") for r in sets[k]
    }
    assert not train & {normalise_text(r["prompt"]) for r in sets["eval"]}


def test_annotator_is_realistic_not_perfect():
    """Bradley-Terry labels agree with the latent order most of the time, not always."""
    gen = DemoGenerator(DataConfig(seed=3))
    agree = n = 0
    for _ in range(2000):
        a, b = gen.response("film"), gen.response("film")
        if a.score == b.score:
            continue
        n += 1
        agree += gen.prefer(a, b) == (a.score > b.score)
    assert 0.85 < agree / n < 0.97, agree / n


def test_rankings_favour_positive_fluent_responses():
    gen = DemoGenerator(DataConfig(seed=5))
    firsts, lasts = [], []
    for _ in range(300):
        ranked = gen.rank([gen.response("product") for _ in range(5)])
        firsts.append(ranked[0].score)
        lasts.append(ranked[-1].score)
    assert sum(firsts) / 300 > sum(lasts) / 300 + 1.0


def test_lexicon_sentiment_sign():
    assert lexicon_sentiment("the story was superb. I loved it.") > 0.5
    assert lexicon_sentiment("the battery was awful. Avoid it.") < -0.5
    assert lexicon_sentiment("the screen was") == 0.0


def test_feedback_thumbs_follow_the_annotator_and_ratings_agree_with_them():
    cfg = DataConfig(n_demonstrations=50, n_preferences=50, n_prompts=20, n_eval=20, n_feedback=2000)
    rows = DemoGenerator(cfg).generate()["feedback"]
    assert len(rows) == 2000 and len({r["id"] for r in rows}) == 2000
    assert 0.4 < sum(r["label"] for r in rows) / 2000 < 0.6  # about half up
    rated = [r for r in rows if "rating" in r]
    assert 0.2 < len(rated) / 2000 < 0.4 and {r["rating"] for r in rated} == {1, 2, 3, 4, 5}
    assert all(r["rating"] >= 3 if r["label"] else r["rating"] <= 3 for r in rated)
    # thumbs up goes to more positive responses (the independent lexicon), not perfectly
    up = [lexicon_sentiment(r["response"]) for r in rows if r["label"] == 1]
    down = [lexicon_sentiment(r["response"]) for r in rows if r["label"] == 0]
    assert sum(up) / len(up) > sum(down) / len(down) + 0.3


def test_feedback_is_generated_last_so_the_other_kinds_do_not_change():
    few = DemoGenerator(DataConfig(n_feedback=0)).generate()
    many = DemoGenerator(DataConfig(n_feedback=500)).generate()
    assert all(few[k] == many[k] for k in ("demonstrations", "preferences", "prompts", "eval"))
