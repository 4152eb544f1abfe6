"""Each expectation catches its bad case, with the rule name and line number in the report."""

import json
from pathlib import Path

import pytest

from components.config import DataConfig
from components.data.demo import write_demo
from components.data.validation import validate_batch, validate_dataset

CFG = DataConfig(n_demonstrations=150, n_preferences=150, n_prompts=60, n_eval=25, n_feedback=100)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(CFG, root / "data")
    return root


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


GOOD_PAIR = {"id": "n1", "prompt": "A brand new prompt", "chosen": "good text", "rejected": "bad text"}
# (kind, rows, rule, line of the offending row)
CASES = [
    (
        "preferences",
        [GOOD_PAIR, {**GOOD_PAIR, "id": "n2", "chosen": "same", "rejected": "same"}],
        "chosen_differs_from_rejected",
        2,
    ),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "chosen": "other"}], "ids_unique", 2),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "id": "n2"}], "no_duplicates", 2),
    ("preferences", [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "rejected": "x"}], "chosen_present", 2),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "id": "n2", "prompt": 42}], "prompt_type", 2),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "id": "n2", "prompt": "   \t"}], "prompt_not_blank", 2),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "id": "n2", "chosen": "x" * 5000}], "chosen_length", 2),
    ("preferences", [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "responses": ["only one"]}], "ranking_size", 2),
    (
        "preferences",
        [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "responses": [f"r{i}" for i in range(10)]}],
        "ranking_size",
        2,
    ),
    (
        "preferences",
        [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "responses": ["a", "A ", "b"]}],
        "responses_distinct",
        2,
    ),
    ("preferences", [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "responses": ["a", ""]}], "responses_text", 2),
    ("preferences", [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "responses": "a, b"}], "responses_type", 2),
    (
        "preferences",
        [GOOD_PAIR, {**GOOD_PAIR, "id": "n2", "chosen": "c", "responses": ["a", "b"]}],
        "preference_shape",
        2,
    ),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "id": ["x"]}], "id_type", 2),
    ("preferences", [GOOD_PAIR, {**GOOD_PAIR, "id": None, "chosen": "c2"}], "id_present", 2),
    (
        "demonstrations",
        [{"id": "d1", "prompt": "Hello there", "response": "ok"}, {"id": "d2", "prompt": "Hello there"}],
        "response_present",
        2,
    ),
    ("prompts", [{"id": "p1", "prompt": "Hello there"}, {"id": "p2", "prompt": "hello   THERE"}], "no_duplicates", 2),
    ("prompts", [{"id": "p1", "prompt": "Hello there"}, "{bad json"], "json", 2),
    ("prompts", [{"id": "p1", "prompt": "Hello there"}, "[1, 2]"], "not_object", 2),
    # the six characters \ud83d: valid JSON, but half an emoji that no UTF-8 writer can encode
    (
        "prompts",
        [{"id": "p1", "prompt": "Hello there"}, '{"id": "p2", "prompt": "half an emoji \\ud83d"}'],
        "valid_unicode",
        2,
    ),
    ("preferences", [GOOD_PAIR, '{"id": "n2", "prompt": "p p p", "responses": ["a", "b\\udc00"]}'], "valid_unicode", 2),
]


GOOD_FB = {"id": "f1", "prompt": "A brand new prompt", "response": "a lovely answer", "label": 1}
FEEDBACK_CASES = [  # thumbs up/down (issue 14): each rule, with a good row first
    ("feedback", [GOOD_FB, {"id": "f2", "prompt": "Another prompt", "response": "ok"}], "label_present", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": None}], "label_present", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": 2}], "label_values", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": True}], "label_values", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": "1"}], "label_values", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": 0.5}], "label_values", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "rating": "five"}], "rating_type", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "rating": True}], "rating_type", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "rating": 9}], "rating_range", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "rating": 0}], "rating_range", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": 0, "rating": 4}], "label_matches_rating", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "label": 1, "rating": 1.5}], "label_matches_rating", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "response": "  "}], "response_not_blank", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "prompt": 7}], "prompt_type", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "id": "f2", "response": "A LOVELY  answer"}], "no_duplicates", 2),
    ("feedback", [GOOD_FB, {**GOOD_FB, "response": "other"}], "ids_unique", 2),
]
CASES += FEEDBACK_CASES


@pytest.mark.parametrize("kind,rows,rule,line", CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_catches_its_case(tmp_path, demo, kind, rows, rule, line):
    path = write_lines(tmp_path / "batch.jsonl", rows)
    report, _ = validate_batch(path, kind, CFG, tmp_path / "gx", demo / "data")
    assert not report.ok
    found = {f.rule: f for f in report.findings}
    assert rule in found, report.format("batch")
    assert (str(path), line) in found[rule].locations
    assert found[rule].fix  # every rule says what to do
    assert f"line {line}" in report.format("batch")


def test_lone_surrogate_row_is_refused_with_a_finding_among_good_rows(tmp_path, demo):
    bad = '{"id": "n2", "prompt": "A new prompt \\ud800 cut", "chosen": "good text", "rejected": "bad text"}'
    assert "\\ud800" in bad and len("\\ud800") == 6  # the escape as written in the file, not the character
    path = write_lines(tmp_path / "batch.jsonl", [GOOD_PAIR, bad, {**GOOD_PAIR, "id": "n3", "prompt": "Third prompt"}])
    report, parsed = validate_batch(path, "preferences", CFG, tmp_path / "gx", demo / "data")
    assert [f.rule for f in report.findings] == ["valid_unicode"], report.format("batch")
    (finding,) = report.findings
    assert finding.locations == [(str(path), 2)] and finding.source == str(path)
    assert finding.fix and "field 'prompt'" in finding.examples[0] and "\\ud800" in finding.examples[0]
    assert [line for line, _ in parsed.rows] == [1, 3]  # the good rows still parse
    report.format("batch").encode("utf-8")  # the report itself is printable


def test_good_batch_passes(tmp_path, demo):
    path = write_lines(
        tmp_path / "batch.jsonl", [GOOD_PAIR, {"id": "n2", "prompt": "p p p", "responses": ["a", "b", "c"]}]
    )
    report, parsed = validate_batch(path, "preferences", CFG, tmp_path / "gx", demo / "data")
    assert report.ok, report.format("batch")
    assert len(parsed.rows) == 2


def _first(demo: Path, kind: str) -> dict:
    return json.loads((demo / "data" / kind / "demo-000.jsonl").read_text().splitlines()[0])


def test_checks_against_existing_data(tmp_path, demo):
    existing = _first(demo, "preferences")
    eval_prompt = _first(demo, "eval")["prompt"]
    rows = [
        {**existing, "id": "fresh-1"},
        {**GOOD_PAIR, "id": existing["id"], "prompt": "another prompt"},
        {**GOOD_PAIR, "id": "fresh-2", "prompt": eval_prompt.upper()},
    ]
    report, _ = validate_batch(
        write_lines(tmp_path / "b.jsonl", rows), "preferences", CFG, tmp_path / "gx", demo / "data"
    )
    rules = {f.rule: f.locations[0][1] for f in report.findings}
    assert rules == {"not_already_in_data": 1, "id_new": 2, "no_eval_leakage": 3}, report.format("b")


def test_file_level_problems(tmp_path, demo):
    gx = tmp_path / "gx"
    missing, _ = validate_batch(tmp_path / "nope.jsonl", "prompts", CFG, gx, None)
    empty, _ = validate_batch(write_lines(tmp_path / "empty.jsonl", ["", "  "]), "prompts", CFG, gx, None)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"id": "1", "prompt": "café au lait"}\n'.encode("latin-1"))
    enc, _ = validate_batch(latin, "prompts", CFG, gx, None)
    assert [f.rule for f in missing.findings] == ["file_missing"]
    assert [f.rule for f in empty.findings] == ["file_empty"]
    assert [f.rule for f in enc.findings] == ["utf8"] and enc.findings[0].locations == [(str(latin), 1)]


def test_demo_data_passes_and_writes_data_docs(tmp_path, demo):
    report = validate_dataset(demo / "data", CFG, tmp_path / "gx")
    assert report.ok, report.format("demo")
    assert report.rows["demonstrations"] == CFG.n_demonstrations
    assert report.docs_index is not None and report.docs_index.exists()


def test_eval_leak_in_data_dir_is_caught(tmp_path, demo):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    leak = _first(demo, "eval")["prompt"]
    with (data / "prompts" / "demo-000.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "leak", "prompt": leak}) + "\n")
    report = validate_dataset(data, CFG, tmp_path / "gx")
    assert [f.rule for f in report.findings] == ["eval_disjoint"]


def test_docs_page_is_this_runs_own_result_and_does_not_grow(tmp_path, demo):
    gx = tmp_path / "gx"
    path = write_lines(
        tmp_path / "batch.jsonl", [GOOD_PAIR, {**GOOD_PAIR, "id": "n2", "chosen": "zz-same", "rejected": "zz-same"}]
    )
    reports = [validate_batch(path, "preferences", CFG, gx, demo / "data")[0] for _ in range(3)]
    assert all(list(r.docs_pages) == ["preferences_pairwise"] for r in reports)  # one page per frame validated
    pages = [r.docs_pages["preferences_pairwise"] for r in reports]
    site = reports[-1].docs_index.parent
    assert all(p.is_file() and p.suffix == ".html" and p.is_relative_to(site / "validations") for p in pages)
    assert len(set(pages)) == 3  # each run its own page; earlier pages stay in the site
    assert "zz-same" in pages[-1].read_text()  # it shows this run's failing values
    sizes = [p.stat().st_size for p in pages]
    assert max(sizes) - min(sizes) < 0.02 * min(sizes), sizes  # a page holds one result, not the history
    site_pages = sum(p.stat().st_size for p in (site / "validations").rglob("*.html"))
    assert site_pages >= 2.9 * sizes[-1]  # ...while the whole site keeps every result


def test_feedback_batch_passes_and_the_middle_rating_goes_with_either_label(tmp_path, demo):
    rows = [
        GOOD_FB,
        {**GOOD_FB, "id": "f2", "label": 0},  # the same answer down-voted by someone else: not a duplicate
        {**GOOD_FB, "id": 3, "response": "meh", "label": 1, "rating": 3},
        {**GOOD_FB, "id": 4, "response": "meh", "label": 0, "rating": 3.0},
        {**GOOD_FB, "id": "f5", "response": "great", "label": 1, "rating": 5, "user": "u1"},  # extra fields kept
    ]
    report, _ = validate_batch(
        write_lines(tmp_path / "fb.jsonl", rows), "feedback", CFG, tmp_path / "gx", demo / "data"
    )
    assert report.ok, report.format("feedback")
    assert report.rows == {"feedback": 5}


def test_feedback_checks_against_existing_data(tmp_path, demo):
    existing = json.loads((demo / "data" / "feedback" / "demo-000.jsonl").read_text().splitlines()[0])
    eval_prompt = json.loads((demo / "data" / "eval" / "demo-000.jsonl").read_text().splitlines()[0])["prompt"]
    rows = [GOOD_FB, existing, {**GOOD_FB, "id": "f9", "prompt": eval_prompt}]
    report, _ = validate_batch(
        write_lines(tmp_path / "fb.jsonl", rows), "feedback", CFG, tmp_path / "gx", demo / "data"
    )
    rules = {f.rule: f.locations for f in report.findings}
    assert (str(tmp_path / "fb.jsonl"), 2) in rules["id_new"] and (str(tmp_path / "fb.jsonl"), 2) in rules[
        "not_already_in_data"
    ]
    assert rules["no_eval_leakage"] == [(str(tmp_path / "fb.jsonl"), 3)]


def test_feedback_is_optional_but_the_reward_model_needs_comparisons_or_feedback(tmp_path, demo):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    assert validate_dataset(data, CFG, tmp_path / "gx").ok  # the demo, feedback included
    shutil.rmtree(data / "feedback")
    assert validate_dataset(data, CFG, tmp_path / "gx").ok  # no feedback: fine
    shutil.copytree(demo / "data" / "feedback", data / "feedback")
    shutil.rmtree(data / "preferences")
    assert validate_dataset(data, CFG, tmp_path / "gx").ok  # feedback instead of comparisons: fine
    shutil.rmtree(data / "feedback")
    report = validate_dataset(data, CFG, tmp_path / "gx")
    (finding,) = report.findings
    assert finding.rule == "no_shards" and "nor feedback" in finding.message and "--kind feedback" in finding.fix
