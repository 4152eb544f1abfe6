"""Issue 39: a project of the user's own. The three attempts of the issue, each now doing the right thing: the first
ingest into an empty project starts the data set, a data/ holding the user's files is refused without a row
written (the demo never writes beside them), and data=demo_small runs on a fresh clone whose data.dvc pins the full
demo. Also: `rlhf init` and its rlhf.yaml, the frozen eval set, and what a retrain needs of the data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, compose_project, project_overrides
from components.data.ingest import IngestRefused, ingest
from components.data.needs import missing
from components.data.versioning import DataVersionError, data_version, demo_mark, ensure_data
from service.project import InitRefused, ProjectExists, init_project

REPO = Path(__file__).resolve().parents[2]
ROWS = {
    "demonstrations": [
        {"id": f"d{i}", "prompt": f"How do I reset router {i}?", "response": f"Hold it {i} s."} for i in range(4)
    ],
    "preferences": [
        {"id": f"p{i}", "prompt": f"Help with printer {i}?", "chosen": "Open the tray.", "rejected": "No."}
        for i in range(4)
    ],
    "eval": [{"id": f"e{i}", "prompt": f"Explain the kettle {i}."} for i in range(3)],
}


def batch(where: Path, kind: str) -> Path:
    f = where / f"{kind}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS[kind]))
    return f


def tree(root: Path) -> dict[str, bytes]:
    """Every file of the directory but the state dir (.rlhf/: the data lock lives there)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and ".rlhf" not in p.relative_to(root).parts)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_init_makes_a_project_whose_first_ingest_starts_the_data_set(tmp_path):
    project = init_project(tmp_path / "team")
    root = project.root
    assert (root / "rlhf.yaml").exists() and (root / ".dvc").is_dir() and (root / "README.md").exists()
    assert "/.rlhf/" in (root / ".gitignore").read_text()
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(
        ["demonstrations", "preferences", "prompts", "eval", "feedback"]
    )
    cfg = compose_project([f"root={root}"])
    assert not cfg.data.demo and cfg.tracking.registered_model_name == "team"
    assert cfg.overrides[: len(project_overrides(root))] == project_overrides(root), "the file travels in overrides"
    with pytest.raises(DataVersionError, match=r"no data yet .* `rlhf ingest FILE --kind demonstrations`"):
        ensure_data(cfg)  # an own project is never generated
    assert not (root / "data.dvc").exists() and not list((root / "data").rglob("*.jsonl"))

    first = ingest(cfg, batch(tmp_path, "demonstrations"), "demonstrations")
    assert first.version_before == "" and first.version_after == data_version(root)
    assert demo_mark(root) is None
    second = ingest(cfg, batch(tmp_path, "preferences"), "preferences")
    assert second.version_before == first.version_after != second.version_after == data_version(root)
    ingest(cfg, batch(tmp_path, "eval"), "eval")  # the first eval batch sets the eval prompts
    frozen = data_version(root)
    more = tmp_path / "more-eval.jsonl"
    more.write_text(json.dumps({"id": "e9", "prompt": "Explain the lamp."}) + "\n")
    with pytest.raises(IngestRefused, match="eval prompts are frozen: .* already holds 3"):
        ingest(cfg, more, "eval")
    assert data_version(root) == frozen
    state = ensure_data(cfg)
    assert (state.origin, state.rows["demonstrations"], state.rows["preferences"]) == ("present", 4, 4)

    with pytest.raises(ProjectExists, match="already holds a project"):
        init_project(root)


def test_the_demo_never_writes_beside_the_users_files(tmp_path):
    """The issue's attempt 2: the user's files where the contracts say, then `rlhf data` (the demo config): refused,
    naming them, with nothing written (no row, no DVC repo). The same in a project of one's own."""
    root = tmp_path / "clone"
    (root / "data" / "demonstrations").mkdir(parents=True)
    theirs = root / "data" / "demonstrations" / "mine.jsonl"
    theirs.write_text(json.dumps(ROWS["demonstrations"][0]) + "\n")
    before = tree(root)
    cfg = compose_project([f"root={root}", "data=demo_small"])
    with pytest.raises(DataVersionError, match=r"holds files no data version has \(data/demonstrations/mine.jsonl\)"):
        ensure_data(cfg)
    assert tree(root) == before and not (root / ".dvc").exists()

    own = init_project(tmp_path / "own").root
    (own / "data" / "prompts" / "mine.jsonl").write_text(json.dumps({"id": "q", "prompt": "hello there"}) + "\n")
    with pytest.raises(DataVersionError, match=r"data/prompts/mine.jsonl.* `rlhf ingest FILE --kind K`"):
        ensure_data(compose_project([f"root={own}"]))
    assert not (own / "data.dvc").exists()
    with pytest.raises(DataVersionError, match="data/prompts/mine.jsonl"):  # nor does an ingest version them
        ingest(compose_project([f"root={own}"]), batch(tmp_path, "demonstrations"), "demonstrations")
    assert not (own / "data.dvc").exists()


def test_demo_small_runs_on_a_fresh_clone_and_the_committed_demo_comes_back(tmp_path):
    """The issue's attempt 3: a clone's data.dvc pins the full demo (marked as the demo alone), its data/ is not
    there; data=demo_small switches to the small set, and the default config switches back to the committed file,
    byte for byte. A version that is not the demo alone (after an ingest) is never switched."""
    root = tmp_path / "clone"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    committed = (REPO / "data.dvc").read_text()
    (root / "data.dvc").write_text(committed)
    assert demo_mark(root) is not None, "the repository's data.dvc says it is the demo alone"

    small = ensure_data(compose_project([f"root={root}", "data=demo_small"]))
    assert small.origin == "switched" and small.rows["demonstrations"] == 300
    assert data_version(root) == small.version != yaml.safe_load(committed)["outs"][0]["md5"]
    full = ensure_data(compose_project([f"root={root}"]))
    assert full.origin == "switched" and full.rows["demonstrations"] == 2000
    assert (root / "data.dvc").read_text() == committed

    ingest(compose_project([f"root={root}"]), batch(tmp_path, "preferences"), "preferences")
    assert demo_mark(root) is None, "an ingest makes it more than the demo"
    again = ensure_data(compose_project([f"root={root}", "data=demo_small"]))
    assert again.origin == "present" and again.rows["preferences"] == 2004, "never replaced by another demo set"
    shutil.rmtree(root / "data")  # a clone of it elsewhere, without the remote
    shutil.rmtree(root / ".rlhf" / "dvc-remote")
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
    with pytest.raises(DataVersionError, match="not the demo alone"):
        ensure_data(compose_project([f"root={root}", "data=demo_small"]))


def test_a_retrain_names_what_the_data_lacks_and_the_command_that_adds_it():
    full = {"demonstrations": 300, "preferences": 300, "feedback": 0, "prompts": 100, "eval": 30}
    assert missing("ppo", full) == []
    assert missing("ppo", {**full, "preferences": 0}) == [
        "no comparisons or feedback: the reward model needs one of them: rlhf ingest FILE --kind preferences"
    ]
    assert missing("ppo", {**full, "preferences": 0, "feedback": 5}) == []
    assert missing("dpo", {**full, "prompts": 0}) == [], "the direct methods sample no prompts"
    lacking = missing("grpo", {"demonstrations": 0, "preferences": 0, "feedback": 0, "prompts": 0, "eval": 0})
    assert [s.split(":")[0] for s in lacking] == [
        "no demonstrations",
        "no comparisons or feedback",
        "no prompts",
        "no eval prompts",
    ]
    assert all("rlhf ingest FILE --kind" in s for s in lacking)


def test_the_project_file_is_read_on_top_of_the_defaults_and_a_bad_one_is_named(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "rlhf.yaml").write_text(
        'defaults:\n  - data: own\n  - policy: grpo\nmodel:\n  name_or_path: "/models/it\'s mine"\n'
        "  build_demo_base: false\nsft:\n  lora:\n    target_modules: [q_proj, v_proj]\n"
    )
    cfg = compose_project([f"root={root}", "sft.lora.r=4"])
    assert (cfg.policy.algorithm, cfg.model.name_or_path, cfg.sft.lora.target_modules, cfg.sft.lora.r) == (
        "grpo",
        "/models/it's mine",
        ["q_proj", "v_proj"],
        4,
    )
    assert compose_project([f"root={root}", "model.name_or_path=/other"]).model.name_or_path == "/other"
    (root / "rlhf.yaml").write_text("gate:\n  min_win_rate: lots\n")
    with pytest.raises(ConfigError, match=r"in .*rlhf.yaml: .*min_win_rate"):
        compose_project([f"root={root}"])
    (root / "rlhf.yaml").write_text("gate: [\n")
    with pytest.raises(ConfigError, match=r"rlhf.yaml line \d+: not valid YAML"):
        compose_project([f"root={root}"])
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "config"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "rlhf.yaml" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_init_refuses_a_missing_model_and_leaves_nothing_and_keeps_a_gitignore_of_ones_own(tmp_path):
    with pytest.raises(InitRefused, match=r"--model: model.name_or_path=.*nowhere: no such directory"):
        init_project(tmp_path / "p", model=str(tmp_path / "nowhere"))
    assert not (tmp_path / "p").exists(), "nothing left behind"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".gitignore").write_text("*.pyc\n")
    init_project(mine)
    assert (mine / ".gitignore").read_text().splitlines() == ["*.pyc", "/.rlhf/", "/data", "__pycache__/"], (
        "the state dir (signing keys, MLflow store) is never committed"
    )
    (mine / "rlhf.yaml").write_text("gate:\n  min_win_rate: 0.6\ngate:\n  max_kl: 5\n")
    with pytest.raises(ConfigError, match=r"rlhf.yaml line 3: not valid YAML \(`gate` is given twice\)"):
        compose_project([f"root={mine}"])


def test_the_demo_mark_holds_only_for_its_version_and_a_killed_demo_write_is_finished(tmp_path):
    """A pinned demo edited and versioned by hand (`dvc add`: DVC keeps the mark) is no longer the demo alone: another
    demo set never replaces it. A demo whose writing was killed half-way (a kind missing, a temporary file left) is
    written again. A project of one's own never ingests into a data set that is the demo."""
    root = tmp_path / "clone"
    root.mkdir()
    cfg = compose_project([f"root={root}", "data=demo_small"])
    ensure_data(cfg)
    assert demo_mark(root) is not None
    shard = root / "data" / "prompts" / "demo-000.jsonl"
    shard.write_text(shard.read_text() + json.dumps({"id": "mine", "prompt": "my own prompt"}) + "\n")
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data"], cwd=root, check=True)
    assert demo_mark(root) is None, "the mark names the version it was written for"
    again = ensure_data(compose_project([f"root={root}", "data=demo_small", "data.seed=7"]))
    assert again.origin == "present" and "my own prompt" in shard.read_text()

    fresh = tmp_path / "killed"
    fresh.mkdir()
    cfg = compose_project([f"root={fresh}", "data=demo_small"])
    from components.data.demo import write_demo

    write_demo(cfg.data, cfg.data_path)  # killed after some kinds: one missing, one left as its temporary file
    (cfg.data_path / "eval" / "demo-000.jsonl").unlink()
    (cfg.data_path / "prompts" / "demo-000.jsonl").rename(cfg.data_path / "prompts" / "demo-000.jsonl.tmp")
    state = ensure_data(cfg)
    assert state.origin == "generated" and state.rows["eval"] == 40 and state.rows["prompts"] == 100
    assert not list(cfg.data_path.rglob("*.tmp"))

    own = compose_project([f"root={fresh}", "data=own"])
    with pytest.raises(IngestRefused, match="pins the generated demo data set"):
        ingest(own, batch(tmp_path, "demonstrations"), "demonstrations")
