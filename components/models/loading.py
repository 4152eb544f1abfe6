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


def load_causal_lm(path: str | Path, cfg: ModelConfig, device: torch.device | None = None, quantize: bool = True):
    """The model at `path` in `model.dtype` on `device`; with `model.gradient_checkpointing`, its layers recompute
    their activations in the backward pass (non-reentrant: LoRA's frozen inputs need no requires_grad); with
    `model.quantization` (and `quantize`), its weights in 4 or 8 bits through bitsandbytes (QLoRA)."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg.device)
    kwargs = quantization_kwargs(cfg, device) if quantize and cfg.quantization else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **kwargs
    )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model if kwargs else model.to(device)


def quantization_kwargs(cfg: ModelConfig, device: torch.device) -> dict:
    """from_pretrained's arguments for `model.quantization` (4bit: NF4 with double quantisation, computing in
    model.dtype, as QLoRA; 8bit: LLM.int8), placed on `device`. A clear error where bitsandbytes cannot run."""
    if cfg.quantization not in ("4bit", "8bit"):
        raise ValueError(f"model.quantization={cfg.quantization!r}: expected 4bit | 8bit (or null)")
    if device.type != "cuda":
        raise ValueError(
            f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes); this stage runs on {device}: "
            "set model.quantization=null, or run the stage on a GPU worker"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[cfg.dtype],
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": {"": device.index or 0}}


def is_quantized(model) -> bool:
    """Whether a (plain or peft-wrapped) model's base weights are bitsandbytes-quantised."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
