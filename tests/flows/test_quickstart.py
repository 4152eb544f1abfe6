"""Issue 39: docs/quickstart.md, run as written, from an empty directory: a team's own 300 demonstrations, 300
comparisons, 100 prompts and 30 eval prompts (written here, nothing like the demo's), a small model saved here, then
init, ingest of each kind, run, serve, feedback, and a retrain on the judged answers. Every command of the page runs
(the install line is tests/test_packaging.py's); the test adds only small step counts and an open gate to the
project's rlhf.yaml, because it proves the loop, not the learning (tests/training does)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from components.config import compose

REPO = Path(__file__).resolve().parents[2]
THINGS = ["router", "printer", "kettle", "scanner", "speaker", "monitor", "camera", "keyboard", "lamp", "heater"]
ACTS = ["reset", "update", "clean", "pair", "mount", "charge", "restart", "label", "store", "test"]

# what the test adds to the project's rlhf.yaml: the loop in seconds (tests/conftest.py FAST_STAGES, OPEN_GATE)
TEST_SIZES = {
    "sft": {"max_steps": 6, "save_steps": 6},
    "reward": {"max_steps": 6, "save_steps": 6, "stats_max_responses": 32},
    "ppo": {"steps": 1, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 1, "eval_max_prompts": 8},
    "gate": {
        "min_reward_gain": -100.0,
        "min_win_rate": 0.0,
        "min_judge_gain": None,
        "max_kl": 1.0e9,
        "max_prompts": 8,
        "max_repeated_word_gain": None,
        "min_distinct_2_ratio": None,
        "max_disagreement_ratio": None,
    },
}


def own_data() -> dict[str, list[dict]]:
    """A support team's examples: how to operate ten devices. Ids and prompts nothing like the demo's reviews."""
    thing, act = (lambda i: THINGS[(i // 10) % 10]), (lambda i: ACTS[i % 10])
    return {
        "demonstrations": [
            {
                "id": f"mine-d{i}",
                "prompt": f"How do I {act(i)} the {thing(i)} model {i}?",
                "response": f"To {act(i)} the {thing(i)}, open its menu, choose {act(i)} and wait {i % 7 + 2} seconds.",
            }
            for i in range(300)
        ],
        "preferences": [
            {
                "id": f"mine-p{i}",
                "prompt": f"Can you help me {act(i)} my {thing(i)} unit {i}?",
                "chosen": f"Sure: open the menu of the {thing(i)}, choose {act(i)} and wait a few seconds.",
                "rejected": "No.",
            }
            for i in range(300)
        ],
        "prompts": [
            {"id": f"mine-q{i}", "prompt": f"What is the best way to {act(i)} a {thing(i)} number {i}?"}
            for i in range(100)
        ],
        "eval": [
            {"id": f"mine-e{i}", "prompt": f"Please explain how to {act(i)} the {THINGS[(i // 3) % 10]} series {i}."}
            for i in range(30)
        ],
    }


def save_small_model(rows: dict[str, list[dict]], where: Path) -> None:
    """A one-layer Llama over a tokenizer trained on these texts, saved as any checkpoint is (`save_pretrained`)."""
    import torch

    from components.models.demo_base import build_llama, train_tokenizer

    texts = [r[k] for kind in rows.values() for r in kind for k in ("prompt", "response", "chosen") if k in r]
    tok = train_tokenizer(texts, 512)
    torch.manual_seed(0)
    model = build_llama(replace(compose([]).model, vocab_size=512, num_hidden_layers=1), tok)
    model.save_pretrained(where, safe_serialization=True)
    tok.save_pretrained(where)


def bash_blocks(page: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)


def steps(trace: Path) -> str:
    """The seconds each `rlhf` command of the page took, from bash's timestamped xtrace."""
    lines = [ln.split(" ", 2) for ln in trace.read_text().splitlines() if ln.startswith("+ ")] if trace.exists() else []
    rows = [(float(t), cmd) for _, t, cmd in (ln for ln in lines if len(ln) == 3) if cmd.startswith(("rlhf", "curl"))]
    return "\n".join(f"{b[0] - a[0]:6.1f} s  {a[1][:70]}" for a, b in zip(rows, rows[1:], strict=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script: str, cwd: Path, env: dict, timeout: int) -> str:
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # what it printed so far says where it stopped
        out = f"{e.stdout or ''}{e.stderr or ''}"
        raise AssertionError(
            f"timed out after {timeout} s in {cwd}:\n{script}\n--- output ---\n{out[-8000:]}"
        ) from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode} in {cwd}:\n{script}\n--- output ---\n{out[-8000:]}"
    return out


@pytest.mark.usefixtures("prefect_server")
def test_the_quickstart_runs_from_an_empty_directory(tmp_path):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    rows = own_data()
    mine, model, empty = tmp_path / "mine", tmp_path / "model", tmp_path / "empty"
    mine.mkdir()
    empty.mkdir()
    for kind, kind_rows in rows.items():
        (mine / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kind_rows))
    save_small_model(rows, model)

    install, init, *session = bash_blocks(REPO / "docs" / "quickstart.md")
    assert install.strip().startswith("pip install rlhf-ops"), install  # tests/test_packaging.py installs the wheel
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MINE": str(mine),
        "MODEL": str(model),
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's server: no temporary one per command
        "HF_HUB_OFFLINE": "1",
    }
    out = run(init, empty, env, timeout=120)
    project = empty / "my-project"
    assert "✓ project in" in out and (project / "rlhf.yaml").exists(), out
    assert "does not fit" not in out, out
    settings = yaml.safe_load((project / "rlhf.yaml").read_text())
    assert settings["model"]["name_or_path"] == str(model) and {"data": "own"} in settings["defaults"]
    for group, values in TEST_SIZES.items():  # into the file's own groups: a key given twice is refused
        settings[group] = {**settings.get(group, {}), **values}
    (project / "rlhf.yaml").write_text(
        "# with test sizes (tests/flows/test_quickstart.py)\n" + yaml.safe_dump(settings)
    )

    # each command's start time into trace.log (bash's xtrace on its own descriptor): what each step costs
    timed = f"exec 9>{tmp_path / 'trace.log'}; BASH_XTRACEFD=9; PS4='+ $EPOCHREALTIME '; set -x\n"
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + timed + "\n".join(session)
    try:
        out = run(script.replace("5001", str(port)), project, env, timeout=900)
    finally:
        print(steps(tmp_path / "trace.log"))

    # the data: the team's rows and the judged served answer, nothing else; its version is in data.dvc
    ours = {r["prompt"] for kind_rows in rows.values() for r in kind_rows} | {"How do I reset the router?"}
    shards = sorted(p for p in (project / "data").rglob("*.jsonl"))
    assert shards and not [p for p in shards if p.name.startswith("demo")], shards
    prompts = [json.loads(line)["prompt"] for p in shards for line in p.read_text().splitlines() if line.strip()]
    assert len(prompts) == 300 + 300 + 100 + 30 + 1, len(prompts)
    assert set(prompts) <= ours, set(prompts) - ours
    version = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert '"trace_id"' in out, out[-4000:]

    # two champions: the first on the four ingests, the second retrained on the version with the judged answer
    client = MlflowClient(f"sqlite:///{project / '.rlhf' / 'mlflow.db'}")
    versions = sorted(client.search_model_versions("name='my-project'"), key=lambda v: int(v.version))
    assert len(versions) == 2, [(v.version, v.tags) for v in versions]
    first, second = (v.tags["data_version"] for v in versions)
    assert second == version != first, (first, second, version)
    assert client.get_model_version_by_alias("my-project", "champion").version == versions[1].version
