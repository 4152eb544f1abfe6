"""Cross-run caching of the training stages by Prefect (`cache_key_fn`), under the session's Prefect test
server: an unchanged stage is not recomputed, a changed stage and everything downstream of it is, and a
cached result whose files are gone is recomputed. A gate nobody passes keeps the registry empty, so the
"nothing new" shortcut (same data + config as the champion) never hides the stages."""

import shutil
from pathlib import Path

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.retrain import retrain
from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("prefect_server")

STAGES = ("sft", "reward-model", "ppo", "rejection-sampling")
RS_FAST = ("rounds=1", "prompts_per_round=4", "samples_per_prompt=2", "keep_fraction=0.5")
CLOSED_GATE = ("gate.min_win_rate=1.01", "gate.max_prompts=8", "tracking.registered_model_name=cache-test")


def run(tmp_path, *overrides):
    """One retrain; returns its summary, {stage task: Prefect state name}, and the stage child runs in MLflow."""
    state = retrain(make_project(tmp_path / "proj", *CLOSED_GATE, *overrides), return_state=True)
    assert state.is_completed() and state.message.startswith("not promoted"), state.message
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    states = {t.name.rsplit("-", 1)[0]: t.state.name for t in task_runs if t.name.rsplit("-", 1)[0] in STAGES}
    s = state.result()
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{s.run_id}'", output_format="list")
    return s, states, {c.data.tags["stage"]: c.info.run_id for c in children}


def test_unchanged_stages_are_cached_and_changes_recompute_downstream(tmp_path):
    first, states, children = run(tmp_path)
    assert states == {"sft": "Completed", "reward-model": "Completed", "ppo": "Completed"}
    assert {"sft", "reward", "ppo", "evaluate"} <= set(children)

    # same inputs: Prefect skips all three stages; the parent run points at the runs that computed them
    again, states, children2 = run(tmp_path)
    assert states == {"sft": "Cached", "reward-model": "Cached", "ppo": "Cached"}
    assert not {"sft", "reward", "ppo"} & set(children2) and "evaluate" in children2  # the gate always runs
    parent = mlflow.get_run(again.run_id).data
    tags = parent.tags
    # the stages' metrics are on the parent run even when cached: runs compare side by side in the UI
    assert {
        "sft/eval_loss",
        "rm/eval_accuracy",
        "ppo/eval_reward",
        "gate/win_rate",
        "eval/candidate/judge_mean",
    } <= set(parent.metrics)
    assert parent.metrics["rm/eval_accuracy"] == mlflow.get_run(first.run_id).data.metrics["rm/eval_accuracy"]
    assert tags["cached.sft"] == children["sft"] and tags["cached.ppo"] == children["ppo"]
    assert (again.sft.dir, again.reward.dir, again.policy.dir) == (first.sft.dir, first.reward.dir, first.policy.dir)
    assert again.policy.metrics == first.policy.metrics and again.cached == ["sft", "reward-model", "ppo"]
    # the version passed before under the same rules: its validation is reused, and says whose it was (issue 40)
    assert mlflow.get_run(children2["validate"]).data.tags["validation_reused_from"] == children["validate"]
    assert again.validation.ok and again.validation.rows == first.validation.rows
    assert "validation_reused_from" not in mlflow.get_run(children["validate"]).data.tags

    # a PPO setting changed: SFT and RM reused, PPO recomputed into a new dir
    ppo_changed, states, _ = run(tmp_path, "ppo.learning_rate=5e-4")
    assert states == {"sft": "Cached", "reward-model": "Cached", "ppo": "Completed"}
    assert ppo_changed.reward.dir == first.reward.dir and ppo_changed.policy.dir != first.policy.dir

    # the other policy algorithm: SFT and RM reused, the policy trained by rejection sampling in PPO's place
    rs_overrides = ("policy=rejection_sampling", *(f"policy.rejection_sampling.{k}" for k in RS_FAST))
    rs, states, children_rs = run(tmp_path, *rs_overrides)
    assert states == {"sft": "Cached", "reward-model": "Cached", "rejection-sampling": "Completed"}
    assert "rejection-sampling" in children_rs and "ppo" not in children_rs and "evaluate" in children_rs
    assert rs.reward.dir == first.reward.dir and "/rejection-sampling-" in rs.policy.dir
    assert rs.cached == ["sft", "reward-model"] and rs.policy.metrics["rs/kept"] == 4
    rs_again, states, _ = run(tmp_path, *rs_overrides)
    assert states["rejection-sampling"] == "Cached" and rs_again.policy.dir == rs.policy.dir

    # an SFT setting changed: everything downstream of it is recomputed too
    sft_changed, states, _ = run(tmp_path, "sft.learning_rate=1e-3")
    assert states == {"sft": "Completed", "reward-model": "Completed", "ppo": "Completed"}
    assert len({sft_changed.sft.dir, first.sft.dir}) == 2 and sft_changed.reward.dir != first.reward.dir

    # a cached result whose output was deleted is recomputed, in place
    shutil.rmtree(first.policy.dir)
    restored, states, children5 = run(tmp_path)
    assert states["sft"] == "Cached" and states["reward-model"] == "Cached"
    assert "ppo" in children5 and restored.policy.dir == first.policy.dir and restored.cached == ["sft", "reward-model"]
    assert (tmp_path / "proj" / first.policy.dir / "adapter_model.safetensors").is_file()

    # keep one output dir per stage: the other runs' dirs go, this run's (cached) dirs stay
    pruned, states, _ = run(tmp_path, "infra.keep_stage_outputs=1")
    assert set(states.values()) == {"Cached"}
    stages = tmp_path / "proj" / ".rlhf" / "stages"
    assert len(list(stages.iterdir())) == 4  # this run's three, and the newest rejection-sampling output
    assert all(Path(p).exists() for p in (first.sft.dir, first.reward.dir, first.policy.dir))
    assert not any(Path(p).exists() for p in (ppo_changed.policy.dir, sft_changed.sft.dir, sft_changed.reward.dir))


def test_prune_keeps_the_most_recently_used_outputs_per_stage_and_never_one_in_use(tmp_path):
    import os

    from flows.caching import prune_stage_outputs

    stages = tmp_path / "stages"
    dirs = {}
    for i, name in enumerate(["sft-a", "sft-b", "sft-c", "sft-d", "ppo-a", "ppo-b", "reward-model-a"]):
        d = stages / name
        (d / "final").mkdir(parents=True)
        os.utime(d, (1000 + i, 1000 + i))  # later in the list = used more recently
        dirs[name] = d
    in_use = {dirs["sft-a"].resolve(), dirs["ppo-a"].resolve()}  # the oldest ones, but this run's

    removed = prune_stage_outputs(stages, 2, in_use)
    assert sorted(d.name for d in removed) == ["sft-b", "sft-c"]  # kept: sft-a (in use) and sft-d (newest)
    assert sorted(d.name for d in stages.iterdir()) == ["ppo-a", "ppo-b", "reward-model-a", "sft-a", "sft-d"]
    assert len(prune_stage_outputs(stages, 0, in_use)) == 3  # 0: only what this run uses survives
    assert sorted(d.name for d in stages.iterdir()) == ["ppo-a", "sft-a"]
    assert prune_stage_outputs(stages, None, set()) == []  # None keeps everything


def test_one_writer_per_stage_dir_and_a_killed_writer_leaves_no_lock(tmp_path):
    """Issue 28, item 3: a stage dir is locked while a stage writes it; a second writer is refused at once in one
    sentence naming the holder, pruning skips the locked dir, and a SIGKILLed holder's lock is gone with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.caching import StageDirBusy, prune_stage_outputs, stage_dir_lock

    stages = tmp_path / "state" / "stages"
    out = stages / "sft-0123456789abcdef"
    out.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from flows.caching import stage_dir_lock\n"
            f"import time\nwith stage_dir_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageDirBusy, match=f"stage dir {out} is being written by pid {holder.pid} on "):
            with stage_dir_lock(out):
                pass
        older = stages / "sft-older"
        older.mkdir()
        os.utime(older, (1, 1))
        os.utime(out, (2, 2))
        assert prune_stage_outputs(stages, 0, set()) == [older], "the locked dir is not pruned"
        assert out.is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 5
    while True:  # the kernel drops a dead process's lock
        try:
            with stage_dir_lock(out):
                break
        except StageDirBusy:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_validation_is_reused_only_for_the_same_version_and_rules(tmp_path):
    from components.config import compose
    from components.data.versioning import DataState
    from flows.caching import validation_key

    cfg = compose([f"root={tmp_path}", "data=demo_small"])
    data = DataState("a" * 32 + ".dir", "present", {}, "")
    key = validation_key(cfg, data)
    assert validation_key(compose([f"root={tmp_path}", "data=demo_small", "sft.max_steps=3"]), data) == key
    assert validation_key(cfg, DataState("b" * 32 + ".dir", "present", {}, "")) != key
    assert validation_key(compose([f"root={tmp_path}", "data=demo_small", "data.max_prompt_chars=50"]), data) != key
