import math

import pytest
import torch

from components.config import compose
from components.data.demo import write_demo
from components.models.demo_base import build_demo_base
from components.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    cfg = compose([f"root={root}", "data=demo_small", "model.pretrain_steps=60"])
    write_demo(cfg.data, cfg.data_path)
    result = build_demo_base(cfg.model, cfg.data_path, "v1", cfg.state_path / "models")
    return cfg, result


def test_built_once_then_cached_and_keyed_by_corpus_and_config(built):
    cfg, first = built
    assert first.built
    again = build_demo_base(cfg.model, cfg.data_path, "v1", cfg.state_path / "models")
    assert (again.built, again.path) == (False, first.path)
    other = build_demo_base(cfg.model, cfg.data_path, "v2", cfg.state_path / "models")
    assert other.built and other.path != first.path


def test_saved_as_safetensors_and_loads_like_a_real_model(built):
    cfg, result = built
    from pathlib import Path

    files = {p.name for p in Path(result.path).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    tok = load_tokenizer(result.path, cfg.model, padding_side="left")
    model = load_causal_lm(result.path, cfg.model)
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.eos_token_id is not None
    assert sum(p.numel() for p in model.parameters()) == result.params


def test_pretraining_learned_the_corpus(built):
    """Loss well below the uniform-guess loss ln(vocab)."""
    cfg, result = built
    tok = load_tokenizer(result.path, cfg.model)
    model = load_causal_lm(result.path, cfg.model)
    enc = tok(["I watched the movie last night and the story was superb. I loved it."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc.input_ids).loss.item()
    assert loss < 0.6 * math.log(len(tok)), (loss, math.log(len(tok)))
    assert result.metrics["base/pretrain_loss"] < 0.6 * math.log(len(tok))
