"""SFT on the demo (tiny model, CPU): held-out loss goes down, only LoRA weights move, resume works
(and skips a checkpoint a kill left half written); the output dir is complete only once all is written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import compose
from components.data.demo import write_demo
from components.data.schemas import held_out
from components.models.demo_base import build_demo_base
from components.models.families import FAMILIES
from components.training import checkpoint
from components.training import sft as sft_module
from components.training.sft import train_sft


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    cfg = compose(
        [
            f"root={root}",
            "data=demo_small",
            "model.pretrain_steps=100",
            "sft.max_steps=40",
            "sft.save_steps=20",
            "sft.learning_rate=1e-2",
            "sft.eval_fraction=0.15",
        ]
    )
    write_demo(cfg.data, cfg.data_path)
    base = build_demo_base(cfg.model, cfg.data_path, "v1", cfg.state_path / "models")
    result = train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, root / "sft")
    return cfg, base, result, root


def test_sft_lowers_held_out_loss(setup):
    _, _, result, _ = setup
    m = result.metrics
    assert m["sft/eval_loss"] < m["sft/eval_loss_base"] - 0.05, m
    assert m["sft/eval_perplexity"] < m["sft/eval_perplexity_base"]


def test_lora_weights_change_and_base_does_not(setup):
    cfg, base, result, _ = setup
    from peft import PeftModel

    from components.models.loading import load_causal_lm

    base_sd = load_file(str(Path(base.path) / "model.safetensors"))
    adapter = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero: it must have moved"
    # base weights untouched: the saved base equals a fresh load, and the adapter holds only LoRA tensors
    fresh = load_causal_lm(base.path, cfg.model)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, base_sd.get(k, v)), k
    assert all("lora_" in k for k in adapter)
    # the merged model differs from the base exactly where LoRA targets (attention projections)
    merged = load_file(str(Path(result.merged_dir) / "model.safetensors"))
    changed = {k for k in merged if k in base_sd and not torch.equal(merged[k], base_sd[k])}
    assert changed and all(k.split(".")[-2] in FAMILIES["llama"].lora_targets for k in changed)  # all-linear's
    model = PeftModel.from_pretrained(fresh, result.adapter_dir)  # adapter loads onto the base
    assert model is not None


def test_split_is_deterministic_and_about_the_fraction():
    flags = [held_out(f"demo-{i:06d}", 0.1) for i in range(2000)]
    assert flags == [held_out(f"demo-{i:06d}", 0.1) for i in range(2000)]
    assert 0.07 < sum(flags) / 2000 < 0.13


def test_resume_continues_from_last_checkpoint(setup):
    cfg, base, _, root = setup
    out = root / "sft-resume"
    first = compose(
        [f"root={root}", "data=demo_small", "model.pretrain_steps=40", "sft.max_steps=20", "sft.save_steps=10"]
    )
    train_sft(first.sft, first.model, base.path, first.data_path, out)
    longer = compose(
        [f"root={root}", "data=demo_small", "model.pretrain_steps=40", "sft.max_steps=30", "sft.save_steps=10"]
    )
    result = train_sft(longer.sft, longer.model, base.path, longer.data_path, out)
    assert result.metrics["sft/resumed_from_step"] == 20
    state = json.loads((out / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30


def test_resume_skips_a_checkpoint_killed_mid_save(setup):
    # HF writes checkpoint-N in place: a kill mid-save leaves it partial, and HF's get_last_checkpoint
    # took it, so every later run with the same inputs crashed until someone deleted it by hand
    cfg, base, _, root = setup
    out = root / "sft-partial"
    shutil.copytree(root / "sft" / "checkpoints", out / "checkpoints")  # a run that saved up to step 40 ...
    partial = out / "checkpoints" / "checkpoint-50"  # ... then was killed while saving step 50
    shutil.copytree(out / "checkpoints" / "checkpoint-40", partial)
    (partial / checkpoint.CHECKPOINT_MARKER).unlink()
    (partial / "trainer_state.json").unlink()
    (partial / "adapter_model.safetensors").write_bytes((partial / "adapter_model.safetensors").read_bytes()[:100])
    longer = compose(
        [
            f"root={root}",
            "data=demo_small",
            "sft.max_steps=50",
            "sft.save_steps=20",
            "sft.learning_rate=1e-2",
            "sft.eval_fraction=0.15",
        ]
    )
    result = train_sft(longer.sft, longer.model, base.path, longer.data_path, out)
    assert result.metrics["sft/resumed_from_step"] == 40
    state = json.loads((out / "checkpoints" / "checkpoint-50" / "trainer_state.json").read_text())
    assert state["global_step"] == 50
    assert (out / "checkpoints" / "checkpoint-50" / checkpoint.CHECKPOINT_MARKER).is_file()
    assert checkpoint.is_complete(out)


def test_output_dir_is_complete_only_when_the_run_finished(setup, monkeypatch):
    cfg, base, result, root = setup
    assert checkpoint.is_complete(root / "sft")
    out = root / "sft-killed"
    shutil.copytree(root / "sft", out)  # a complete earlier run's outputs ...
    assert checkpoint.is_complete(out)

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    # ... recomputed into the same dir by a run killed after writing adapter/ and merged/, before it returned
    monkeypatch.setattr(sft_module, "log_to_active_run", killed)
    with pytest.raises(Killed):
        train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, out)  # resumes at step 40 = max_steps: no training
    assert (out / "adapter").is_dir() and (out / "merged").is_dir()
    assert not checkpoint.is_complete(out)
