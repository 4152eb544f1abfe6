"""SFT on the demo (tiny model, CPU): held-out loss goes down, only LoRA weights move, resume works."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import compose
from components.data.demo import write_demo
from components.models.demo_base import build_demo_base
from components.data.schemas import held_out
from components.training.sft import train_sft


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    cfg = compose([f"root={root}", "data=demo_small", "model.pretrain_steps=100", "sft.max_steps=40", "sft.save_steps=20", "sft.learning_rate=1e-2",
                   "sft.eval_fraction=0.15"])
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
    assert changed and all(any(t in k for t in cfg.sft.lora.target_modules) for k in changed)
    model = PeftModel.from_pretrained(fresh, result.adapter_dir)  # adapter loads onto the base
    assert model is not None


def test_split_is_deterministic_and_about_the_fraction():
    flags = [held_out(f"demo-{i:06d}", 0.1) for i in range(2000)]
    assert flags == [held_out(f"demo-{i:06d}", 0.1) for i in range(2000)]
    assert 0.07 < sum(flags) / 2000 < 0.13


def test_resume_continues_from_last_checkpoint(setup):
    cfg, base, _, root = setup
    out = root / "sft-resume"
    first = compose([f"root={root}", "data=demo_small", "model.pretrain_steps=40", "sft.max_steps=20", "sft.save_steps=10"])
    train_sft(first.sft, first.model, base.path, first.data_path, out)
    longer = compose([f"root={root}", "data=demo_small", "model.pretrain_steps=40", "sft.max_steps=30", "sft.save_steps=10"])
    result = train_sft(longer.sft, longer.model, base.path, longer.data_path, out)
    assert result.metrics["sft/resumed_from_step"] == 20
    state = json.loads((out / "checkpoints" / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
