"""Checkpoints and completion markers survive a kill at any point: a re-saved step is never lost,
leftovers are cleaned, partial HF checkpoints are not resumed from, a stage dir is complete only
once its last step wrote COMPLETE.json. Kills are simulated by raising where the process would die,
or by building the state a kill leaves on disk."""

import json
import os
import sys
from pathlib import Path

import pytest

from components.training import checkpoint

FP = "fp-test"


class Killed(BaseException):
    """Stands for the process dying at this point (not an Exception: nothing may catch it)."""


def writer(text: str):
    def write(d: Path) -> None:
        (d / "weights.txt").write_text(text)

    return write


def content(found) -> str:
    path, _ = found
    return (path / "weights.txt").read_text()


def test_save_and_latest_round_trip(tmp_path):
    root = tmp_path / "ckpt"
    for step in (10, 20, 30):
        checkpoint.save(root, step, FP, writer(f"at {step}"))
    found = checkpoint.latest(root, FP)
    assert found == (root / "step-0000030", 30) and content(found) == "at 30"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000020", "step-0000030"], "keep=2"
    assert checkpoint.latest(root, "other-fingerprint") is None
    assert checkpoint.latest(tmp_path / "missing", FP) is None


def test_resaving_a_step_killed_before_the_new_dir_is_in_keeps_the_old_one(tmp_path, monkeypatch):
    # Before: the old step dir was deleted, then the new one renamed in; a kill in between lost the step.
    root = tmp_path / "ckpt"
    checkpoint.save(root, 10, FP, writer("old"))
    real_rename = os.rename

    def rename(src, dst, *a, **kw):
        if Path(src).name.startswith(".tmp-step-"):
            raise Killed  # dies just before the new checkpoint is renamed into place
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        checkpoint.save(root, 10, FP, writer("new"))
    monkeypatch.setattr(os, "rename", real_rename)
    found = checkpoint.latest(root, FP)  # the next run
    assert found is not None and found[1] == 10 and content(found) == "old"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000010"], "set-aside dir renamed back, tmp removed"


def test_resaving_a_step_replaces_it(tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(root, 10, FP, writer("old"))
    checkpoint.save(root, 10, FP, writer("new"))
    assert content(checkpoint.latest(root, FP)) == "new"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000010"]


def test_latest_renames_back_a_checkpoint_left_aside(tmp_path):
    # the state a kill leaves between "old dir aside" and "new dir in": no step-10, only its old copy
    root = tmp_path / "ckpt"
    checkpoint.save(root, 10, FP, writer("old"))
    (root / "step-0000010").rename(root / ".old-step-0000010")
    (root / ".tmp-step-0000010").mkdir()
    (root / ".tmp-step-0000010" / "weights.txt").write_text("half written")
    found = checkpoint.latest(root, FP)
    assert found == (root / "step-0000010", 10) and content(found) == "old"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000010"]


def test_latest_drops_the_old_copy_when_the_new_one_is_in(tmp_path):
    # the state a kill leaves between "new dir in" and "old dir deleted"
    root = tmp_path / "ckpt"
    checkpoint.save(root, 10, FP, writer("new"))
    aside = root / ".old-step-0000010"
    aside.mkdir()
    (aside / "weights.txt").write_text("old")
    assert content(checkpoint.latest(root, FP)) == "new"
    assert not aside.exists()


def test_leftover_tmp_dirs_are_cleaned_by_latest_and_save(tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(root, 10, FP, writer("a"))
    for step in (20, 30):  # killed while writing these
        (root / f".tmp-step-{step:07d}").mkdir()
        (root / f".tmp-step-{step:07d}" / "weights.txt").write_text("partial")
    assert checkpoint.latest(root, FP)[1] == 10
    assert not list(root.glob(".tmp-step-*"))
    (root / ".tmp-step-0000030").mkdir()
    checkpoint.save(root, 40, FP, writer("b"))
    assert not list(root.glob(".tmp-step-*"))
    assert sorted(p.name for p in root.iterdir()) == ["step-0000010", "step-0000040"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps fds to paths through /proc")
def test_save_fsyncs_meta_and_the_checkpoint_files(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "ckpt"
    checkpoint.save(root, 10, FP, writer("w"))
    names = {Path(p).name for p in synced}
    assert checkpoint.META in names and "weights.txt" in names, synced
    assert str(root) in synced, "the rename into place is made durable"


# ---------------------------------------------------------------------------- HF checkpoints (SFT)


def hf_checkpoint(directory: Path, step: int, complete: bool) -> Path:
    d = directory / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * (64 if complete else 3))  # killed mid-write: truncated
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        checkpoint.mark_checkpoint_complete(d, step)
    return d


def test_hf_resume_skips_and_removes_a_checkpoint_killed_mid_save(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    ckpts = tmp_path / "checkpoints"
    good = hf_checkpoint(ckpts, 10, complete=True)
    partial = hf_checkpoint(ckpts, 20, complete=False)
    assert get_last_checkpoint(str(ckpts)) == str(partial), "the problem: HF picks the partial one"
    assert checkpoint.last_complete_checkpoint(ckpts) == good
    assert not partial.exists(), "removed, so neither a resume nor HF's rotation sees it"
    assert get_last_checkpoint(str(ckpts)) == str(good)


def test_hf_resume_starts_fresh_when_no_checkpoint_is_complete(tmp_path):
    ckpts = tmp_path / "checkpoints"
    hf_checkpoint(ckpts, 10, complete=False)
    (ckpts / "runs").mkdir()  # other entries are left alone
    assert checkpoint.last_complete_checkpoint(ckpts) is None
    assert [p.name for p in ckpts.iterdir()] == ["runs"]
    assert checkpoint.last_complete_checkpoint(tmp_path / "missing") is None


def test_marker_callback_marks_the_checkpoint_just_saved(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from components.training.callbacks import CheckpointCompleteCallback

    d = tmp_path / "checkpoint-7"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x00" * 8)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(global_step=7)
    CheckpointCompleteCallback().on_save(args, state, TrainerControl())
    assert checkpoint.last_complete_checkpoint(tmp_path) == d
    assert json.loads((d / checkpoint.CHECKPOINT_MARKER).read_text())["step"] == 7


# ---------------------------------------------------------------------------- stage output dirs


def test_stage_dir_is_complete_only_after_mark_complete(tmp_path):
    out = tmp_path / "rm"
    assert not checkpoint.is_complete(out), "missing dir"
    out.mkdir()
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    assert not checkpoint.is_complete(out), "partial contents, as a killed run leaves them"
    checkpoint.mark_complete(out, {"stage": "reward", "outputs": ["adapter", "adapter/adapter_model.safetensors"]})
    assert checkpoint.is_complete(out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "no tmp file left"
    assert json.loads((out / checkpoint.COMPLETE).read_text())["stage"] == "reward"
    checkpoint.mark_incomplete(out)  # a recompute into the same dir starts
    assert not checkpoint.is_complete(out)
    checkpoint.mark_incomplete(out)  # idempotent


def test_stage_dir_with_a_broken_marker_or_a_missing_output_is_not_complete(tmp_path):
    out = tmp_path / "ppo"
    (out / "final").mkdir(parents=True)
    checkpoint.mark_complete(out, {"stage": "ppo", "outputs": ["final"]})
    assert checkpoint.is_complete(out)
    (out / "final").rmdir()
    assert not checkpoint.is_complete(out), "an output listed in the manifest is gone"
    (out / "final").mkdir()
    (out / checkpoint.COMPLETE).write_text('{"stage": "pp')  # truncated (not written by mark_complete)
    assert not checkpoint.is_complete(out)


def test_mark_complete_is_atomic(tmp_path, monkeypatch):
    # killed while writing the marker: no COMPLETE.json at all, never a partial one
    out = tmp_path / "sft"
    out.mkdir()

    def replace(*a, **kw):
        raise Killed

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        checkpoint.mark_complete(out, {"stage": "sft", "outputs": []})
    assert not (out / checkpoint.COMPLETE).exists() and not checkpoint.is_complete(out)


class _Saves:
    """Stands in for the peft model / tokenizer / value head in ppo.write_outputs: writes a file per call."""

    def save_pretrained(self, d, selected_adapters=None, safe_serialization=True):
        for sub in selected_adapters or [""]:
            (Path(d) / sub).mkdir(parents=True, exist_ok=True)
            (Path(d) / sub / "weights.bin").write_bytes(b"\x00")

    save = save_pretrained


def test_ppo_marks_its_out_dir_complete_after_final_and_unmarks_it_at_start(tmp_path):
    from components.config import ModelConfig, PPOConfig
    from components.models.roles import RewardScale
    from components.training.ppo import Roles, train_ppo, write_outputs

    out = tmp_path / "ppo"
    roles = Roles(_Saves(), _Saves(), _Saves(), {}, RewardScale(0.0, 1.0), None)
    result = write_outputs(roles, out / "final", {"ppo/kl": 1.0}, [], merge=False)
    assert checkpoint.is_complete(out) and Path(result.policy_dir).is_dir()
    assert json.loads((out / checkpoint.COMPLETE).read_text())["outputs"] == ["final"]
    # a recompute into the same dir that fails at once (no prompts) leaves it incomplete
    with pytest.raises(ValueError, match="prompts"):
        train_ppo(PPOConfig(), ModelConfig(), "sft", "rm", tmp_path / "no-data", out)
    assert not checkpoint.is_complete(out)


def test_resume_restores_weights_optimizer_and_rng_from_the_matching_checkpoint(tmp_path):
    # the reward model and PPO resume through this one function
    import torch

    root = tmp_path / "ckpt"
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.manual_seed(7)

    def write(d: Path) -> None:
        torch.save(layer.state_dict(), d / "layer.pt")
        checkpoint.save_trainer_state(d, optimizer=opt, note="plain value", rng=checkpoint.rng_state())

    checkpoint.save(root, 5, FP, write)
    expected_draw = torch.rand(1)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}

    fresh = torch.nn.Linear(2, 1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    torch.manual_seed(123)
    step, state = checkpoint.resume(
        root, FP, lambda d: fresh.load_state_dict(torch.load(d / "layer.pt")), optimizer=fresh_opt
    )
    assert (step, state["note"]) == (5, "plain value")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(1), expected_draw), "the RNG continues where the checkpoint left it"
    assert checkpoint.resume(root, "other-fingerprint", lambda d: pytest.fail("no checkpoint matches")) == (0, {})
