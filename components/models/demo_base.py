"""The demo base model (`model=tiny`, `model=small`): no pretrained weights can be downloaded here,
so train a byte-level BPE tokenizer on the demo corpus and briefly pretrain a small Llama on it.

The result is saved with `save_pretrained` (safetensors) to a cache dir keyed by the corpus
version and the model config, built once and reused; from there on it is loaded exactly
like a real model (`from_pretrained` on a local dir).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from components.config import ModelConfig
from components.data.readers import read_corpus_texts

BUILDER_VERSION = "2"  # bump when this module changes what it builds
SPECIAL = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>", "unk": "<|unk|>"}


@dataclass
class BaseModelResult:
    path: str
    built: bool  # False: taken from the cache
    params: int
    metrics: dict[str, float]


def cache_key(cfg: ModelConfig, corpus_version: str) -> str:
    blob = json.dumps({"corpus": corpus_version, "model": asdict(cfg), "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
    )


def build_demo_base(
    cfg: ModelConfig, data_dir: Path, corpus_version: str, cache_dir: Path, seed: int = 0
) -> BaseModelResult:
    """Return the cached base model for (corpus, config), building it if needed."""
    out = cache_dir / f"{cfg.name}-{cache_key(cfg, corpus_version)}"
    info_file = out / "build_info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        return BaseModelResult(str(out), False, info["params"], info["metrics"])

    torch.manual_seed(seed)  # the model's weight init (transformers draws from the global RNG, it takes no generator)
    rng = random.Random(seed)  # the pretraining batches: our own draws, from their own generator
    texts = read_corpus_texts(data_dir)
    if not texts:
        raise ValueError(f"no training text under {data_dir}: materialise the data first (`rlhf data`)")
    tok = train_tokenizer(texts, cfg.vocab_size)
    model = build_llama(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {**pretrain(model, tok, texts, cfg, rng), "base/corpus_texts": float(len(texts))}
    info = {"params": n_params, "metrics": metrics, "corpus_version": corpus_version, "config": asdict(cfg)}
    save_atomically(out, model, tok, info)
    return BaseModelResult(str(out), True, n_params, metrics)


def build_llama(cfg: ModelConfig, tok):
    """A freshly initialised small Llama (tied embeddings) sized by `cfg`, over `tok`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
    )


def pad_batch(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad B token lists: -> ids (B, T), attention mask (B, T), T the longest list."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(batch):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    return ids, mask


def pretrain(model, tok, texts: list[str], cfg: ModelConfig, rng: random.Random) -> dict[str, float]:
    """Next-token prediction on "prompt continuation<eos>", cosine LR with a short warmup; batches drawn
    from `rng`. Trains `model` in place; -> the mean loss of the last 20 steps and the seconds taken."""
    enc = [ids[: cfg.max_position_embeddings] for ids in tok([t + SPECIAL["eos"] for t in texts])["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / cfg.pretrain_steps))
    )
    model.train()
    t0, losses = time.time(), []
    bar = tqdm(range(cfg.pretrain_steps), desc=f"pretrain {cfg.name} base", unit="step")
    for _ in bar:
        batch = rng.sample(enc, min(cfg.pretrain_batch_size, len(enc)))
        ids, mask = pad_batch(batch, tok.pad_token_id)  # (B, T) each
        labels = ids.masked_fill(mask == 0, -100)  # (B, T): no loss on padding
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tail = losses[-20:]
    return {"base/pretrain_loss": sum(tail) / len(tail), "base/pretrain_seconds": time.time() - t0}


def save_atomically(out: Path, model, tok, info: dict) -> None:
    """Write model, tokenizer and `build_info.json` to a temporary sibling, then rename it to `out`."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-built model is never in the cache
