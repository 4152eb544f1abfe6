"""Load any causal LM by local path or hub id: safetensors only, no remote code unless configured.

Padding side: right for training (labels line up), left for generation (new tokens
follow the prompt directly).
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(path: str | Path, cfg: ModelConfig, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not cfg.chat_template:  # model.chat_template=false: plain text in every stage (and in what the stages save)
        tok.chat_template = None
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path: str | Path, cfg: ModelConfig, device: torch.device | None = None):
    """The model at `path` in `model.dtype` on `device`; with `model.gradient_checkpointing`, its layers recompute
    their activations in the backward pass (non-reentrant: LoRA's frozen inputs need no requires_grad)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, use_safetensors=True
    )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device or resolve_device(cfg.device))
