"""The model families users bring (transformers `model_type`s), and tiny random-init ones built from config.

`FAMILIES` is the one table: for each family, its transformers config class, how our size names map onto its
config's arguments (GPT-2 says `n_embd` for `hidden_size`, `n_inner` for `intermediate_size`, ...), and the
modules LoRA adapts in it. peft's `target_modules=["all-linear"]` (the default, `components.config.LoraConfig`)
resolves to exactly these in each family listed (every nn.Linear / transformers Conv1D but the LM head: checked
for each family by tests/models/test_families.py); `lora_targets` is the explicit list for settings that name
modules, and the fallback `roles.lora_config` takes for a family whose `all_linear` is false. GPT-2's layers
are transformers' Conv1D (weight stored (in, out)): LoRA needs `fan_in_fan_out=True` there (`conv1d`).

`build_tiny(family, tok, out_dir)`: a few-layer model of that family over `tok`'s vocabulary, randomly
initialised (`AutoModelForCausalLM.from_config`, nothing downloaded), saved as safetensors with the tokenizer, so
it loads like any checkpoint: `model.name_or_path=<out_dir>`, `model.build_demo_base=false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# our size names (ModelConfig's) -> the same setting in a family's config
STANDARD = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "head_dim": "head_dim",
}
ALL_LINEAR = "all-linear"  # peft's shorthand: every nn.Linear / Conv1D layer but the LM head
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# a tiny model: ~0.1M parameters over a 512-token vocabulary; grouped-query attention where the family has it
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' name of the architecture (config.model_type)
    config_class: str  # its transformers config class
    lora_targets: tuple[str, ...]  # module names LoRA adapts: what "all-linear" resolves to (LM head excluded)
    names: dict[str, str | None] = field(default_factory=lambda: dict(STANDARD))  # None: the family has no such
    all_linear: bool = True  # peft's "all-linear" adapts exactly `lora_targets` (else lora_config uses the list)
    conv1d: bool = False  # layers are transformers' Conv1D (weight (in, out)): LoRA with fan_in_fan_out=True
    extra: dict[str, Any] = field(default_factory=dict)  # further config arguments of the tiny model


def _without(*keys: str) -> dict[str, str | None]:
    return {**STANDARD, **dict.fromkeys(keys)}


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaConfig", LLAMA_TARGETS),
        Family("qwen2", "Qwen2Config", LLAMA_TARGETS, names=_without("head_dim")),  # head_dim: hidden / heads
        Family("qwen3", "Qwen3Config", LLAMA_TARGETS),  # + q_norm/k_norm (RMSNorm, not adapted)
        Family("mistral", "MistralConfig", LLAMA_TARGETS),
        Family("gemma", "GemmaConfig", LLAMA_TARGETS),  # default head_dim 256 whatever the width: set it
        # soft-capped logits (roles.lm_logits); a small cap, so that logits computed without it would show
        Family("gemma2", "Gemma2Config", LLAMA_TARGETS, extra={"final_logit_softcapping": 1.0}),
        # fused projections: qkv_proj (q, k, v), gate_up_proj (gate, up)
        Family("phi3", "Phi3Config", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), names=_without("head_dim")),
        Family(
            "gpt2",
            "GPT2Config",
            ("c_attn", "c_proj", "c_fc"),  # Conv1D; c_proj is both the attention output and the MLP output
            names={
                "vocab_size": "vocab_size",
                "hidden_size": "n_embd",
                "num_hidden_layers": "n_layer",
                "num_attention_heads": "n_head",
                "num_key_value_heads": None,
                "intermediate_size": "n_inner",
                "max_position_embeddings": "n_positions",
                "head_dim": None,
            },
            conv1d=True,
        ),
        Family(
            "gpt_neox",
            "GPTNeoXConfig",
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),  # LM head: embed_out
            names=_without("num_key_value_heads", "head_dim"),
        ),
    )
}


def family_of(model) -> Family | None:
    """The table's entry for a (plain or peft-wrapped) model, by its config's model_type; None if not listed."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return FAMILIES.get(model_type) if model_type is not None else None


def tiny_config(family: str, tok, **size):
    """A transformers config of `family` sized by TINY (and `size`: our names, e.g. hidden_size=128), over
    `tok`'s vocabulary and special tokens."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    unknown = sorted(set(size) - set(STANDARD))
    if unknown:
        raise ValueError(f"unknown size setting(s) {unknown} for build_tiny; known: {sorted(STANDARD)}")
    ours = {**TINY, "vocab_size": len(tok), **size}
    ours.setdefault("head_dim", ours["hidden_size"] // ours["num_attention_heads"])
    kwargs = {name: v for k, v in ours.items() if (name := fam.names.get(k))}
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return getattr(transformers, fam.config_class)(**kwargs, **special, **fam.extra)


def build_tiny(family: str, tok, out_dir: Path, seed: int = 0, **size) -> Path:
    """A randomly initialised (seeded) few-layer `family` model over `tok`'s vocabulary, saved with safetensors
    and `tok` to `out_dir` (loads like any checkpoint: model.name_or_path=<out_dir>): -> out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, tok, **size)
    with torch.random.fork_rng():  # the init draws from the global RNG: seed it for this build only
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def has_conv1d(model) -> bool:
    """Whether a (plain or peft-wrapped) model has transformers Conv1D layers (weight (in, out): GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())
