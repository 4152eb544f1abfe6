"""Warm starts (issue 40): an incremental reward model starts from the champion's, trains on the new rows plus a replay
sample of the earlier ones, keeps what it knew, and resumes after a kill where an uninterrupted run ends; every policy
method's roles start from the champion's policy adapter (and PPO's value from its value head)."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from components.data.demo import write_demo
from components.data.lineage import manifest
from components.data.readers import read_preferences
from components.models import warm_start
from components.models.roles import ScalarHead
from components.training.policy_run import build_policy_roles
from components.training.ppo import build_roles
from components.training.reward import replay_size, train_reward


@pytest.fixture(scope="module")
def grown(stages, reward, tmp_path_factory):
    """The champion's data (the demo) grown by one shard of 200 new comparisons, and the champion's bundle: its reward
    model (the session's) and lineage."""
    root = tmp_path_factory.mktemp("incremental")
    today = root / "data"
    shutil.copytree(stages.cfg.data_path, today)
    other = root / "other"
    write_demo(replace(stages.cfg.data, seed=99, n_preferences=200, n_feedback=0), other)
    rows = [json.loads(line) for line in next((other / "preferences").glob("*.jsonl")).read_text().splitlines()]
    (today / "preferences" / "zz-new.jsonl").write_text(
        "".join(json.dumps(r | {"id": f"new-{i}"}) + "\n" for i, r in enumerate(rows))
    )
    (root / "policy").mkdir()
    lineage = {"manifest": manifest(stages.cfg.data_path), "data_version": "d1", "config_hash": "c", "chain": []}
    bundle = warm_start.stage(root / "warm", reward.head_dir, str(root / "policy"), lineage)
    return today, bundle, rows


def test_an_incremental_reward_model_learns_the_new_rows_keeps_the_old_and_resumes_after_a_kill(
    stages, grown, tmp_path
):
    today, bundle, rows = grown
    cfg = stages.cfg
    short = replace(cfg.reward, max_steps=20, save_steps=10, log_steps=10, stats_max_responses=64)
    a = train_reward(short, cfg.model, stages.sft_dir, today, tmp_path / "a", seed=1, warm_from=str(bundle))
    m = a.metrics
    new_train, new_held = read_preferences(today, short.eval_fraction, lambda s: s == "preferences/zz-new.jsonl")
    assert len(new_train) + len(new_held) == len(rows) == 200
    # trained on the new rows plus, of each kind, one replayed earlier row per new row (reward.replay_ratio=1): new
    # comparisons alone still rehearse the thumbs; held out: all of them, as a full run holds them out
    assert m["rm/new_rows"] == len(new_train) and m["rm/replayed_rows"] == 2 * len(new_train)
    assert m["rm/train_examples"] == 2 * len(new_train) and m["rm/train_feedback_rows"] == len(new_train)
    old_train, old_held = read_preferences(cfg.data_path, short.eval_fraction)
    assert m["rm/eval_examples"] == len(old_held) + len(new_held)
    # it started from the champion's: on the earlier comparisons it is as good as the champion (0.8 and more), not
    # the 0.5 of a fresh head after 20 steps; the new comparisons it learned (the champion's own accuracy on them first)
    assert m["rm/eval_accuracy_old"] > 0.8, m
    assert "rm/eval_accuracy_new_parent" in m and m["rm/eval_accuracy_new"] > 0.5, m

    # killed after step 10: only the checkpoint of step 10 exists; the resumed run ends where the uninterrupted one did
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000010", b / "checkpoints" / "step-0000010")
    resumed = train_reward(short, cfg.model, stages.sft_dir, today, b, seed=1, warm_from=str(bundle))
    assert resumed.metrics["rm/resumed_from_step"] == 10
    ha, hb = load_file(str(tmp_path / "a" / "head.safetensors")), load_file(str(b / "head.safetensors"))
    assert all(torch.allclose(ha[k], hb[k], atol=1e-5) for k in ha)
    assert resumed.metrics["rm/eval_accuracy_new"] == pytest.approx(m["rm/eval_accuracy_new"], abs=1e-6)
    # a full run does not resume from an incremental run's checkpoints (another fingerprint)
    fresh = train_reward(short, cfg.model, stages.sft_dir, today, b, seed=1)
    assert fresh.metrics["rm/resumed_from_step"] == 0 and "rm/new_rows" not in fresh.metrics


def test_every_policy_method_starts_from_the_champions_policy_and_ppo_from_its_value(stages, reward, tmp_path):
    cfg = stages.cfg
    # a champion's policy adapter and value head: the fresh ones, moved off their init
    roles = build_policy_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, "cpu")
    with torch.no_grad():
        for name, p in roles.model.named_parameters():
            if ".policy." in name and "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))
    bundle = tmp_path / "warm"
    roles.model.save_pretrained(str(bundle), selected_adapters=["policy"], safe_serialization=True)  # bundle/policy
    value = ScalarHead(roles.model.config.hidden_size)
    value.save(bundle / "value")
    saved = load_file(str(bundle / "policy" / "adapter_model.safetensors"))

    def policy_weights(r) -> dict[str, torch.Tensor]:
        return {n: p for n, p in r.model.named_parameters() if ".policy." in n and "lora_" in n}

    critic_free = build_policy_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, "cpu", str(bundle))
    ppo = build_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, "cpu", str(bundle))
    for warm in (critic_free, ppo):
        got = policy_weights(warm)
        assert len(got) == len(saved) and all(torch.equal(p, policy_weights(roles)[n]) for n, p in got.items())
    assert ppo.value_head is not None
    assert torch.equal(ppo.value_head.linear.weight, value.linear.weight)  # not the reward head's copy
    cold = build_policy_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, "cpu")
    assert not all(torch.equal(p, policy_weights(roles)[n]) for n, p in policy_weights(cold).items())


def test_the_replay_sample_by_hand():
    # one earlier row per new row (of both kinds), and at least enough for two passes of the run's draws
    assert replay_size(1.0, 20, 18, 80 * 16) == 640 - 18  # a few new rows are not fitted on their own
    assert replay_size(1.0, 200, 182, 20 * 16) == 200
    assert replay_size(0.5, 200, 0, 10 * 16) == 100  # new thumbs only: the comparisons are still rehearsed
    assert replay_size(0.0, 5, 5, 8) == 0
