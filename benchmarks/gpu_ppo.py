"""PPO at a real model's size: tokens/s, an MFU estimate and peak memory for a random-init Qwen2.5-0.5B-shaped model
(24 layers, hidden 896, 14 heads / 2 KV heads, vocab 151936), built from its config (no download). Throughput does
not need trained weights: the policy, reference, value and reward roles run the same shapes as a trained one's.
A random policy seldom emits EOS, so every response runs to max_new_tokens: the worst case, and a fixed one.

    .venv/bin/python benchmarks/gpu_ppo.py                       # on a GPU: bf16, the 0.5B shape
    .venv/bin/python benchmarks/gpu_ppo.py --shape tiny --iterations 2 --out /tmp/x.json   # the CPU path (tested)

What it runs is the project's own `train_ppo` (components/training/ppo.py) on the demo prompts, with a reward model
made of a random LoRA adapter and head on the same base, `ppo.*` defaults unless overridden (`--set ppo.batch_size=64`).

MFU (model FLOPs utilisation) estimate, per iteration, with N the model's parameters (LM head included, the
embedding lookup not), P/R the real prompt/response tokens of the batch, E the PPO epochs run; attention's own FLOPs
left out (short sequences):
    generate  2N (P + R)             prefill and one token at a time (the LoRA merged: base FLOPs only)
    score     3 x 2N (P + R)         policy (+ shared value head), reference, reward forwards
    train     E x 3 x 2N (P + R)     forward + backward (about twice the forward) per epoch
divided by the iteration's seconds and the GPU's peak dense bf16 FLOP/s (`--peak-tflops`, else looked up by the
GPU's name). Writes benchmarks/results/gpu_ppo.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory, rss_mb, write_results  # noqa: E402

# Qwen/Qwen2.5-0.5B's config.json; `--shape tiny` (the CPU path) is the families table's tiny Qwen2 instead
QWEN_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
SHAPES = ("qwen2.5-0.5b", "tiny")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def build(shape: str, work: Path, dtype: str) -> tuple[Path, Path, Path, int]:
    """Demo prompts, a tokenizer trained on the demo corpus, the random-init model saved as the 'SFT' model, and a
    reward model (random LoRA adapter + head) on it: -> (data dir, SFT dir, RM dir, parameter count)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from components.config import compose
    from components.data.demo import write_demo
    from components.data.readers import read_corpus_texts
    from components.models.demo_base import train_tokenizer
    from components.models.families import tiny_config
    from components.models.roles import ScalarHead, lora_config

    cfg = compose([f"root={work}", "data=demo_small"])
    write_demo(cfg.data, cfg.data_path)
    tok = train_tokenizer(read_corpus_texts(cfg.data_path), 2048)
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = tiny_config("qwen2", tok) if shape == "tiny" else Qwen2Config(**QWEN_0_5B, **special)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    sft, rm = work / "sft", work / "rm"
    model.save_pretrained(sft, safe_serialization=True)
    tok.save_pretrained(sft)
    get_peft_model(model, lora_config(cfg.reward.lora)).save_pretrained(rm / "adapter", safe_serialization=True)
    ScalarHead(config.hidden_size).save(rm, reward_mean=0.0, reward_std=1.0, base=str(sft), max_length=96)
    return cfg.data_path, sft, rm, n_params


def peak_tflops(given: float | None) -> float | None:
    import torch

    if given or not torch.cuda.is_available():
        return given
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flop_rates(history: list[dict], n_params: int, batch_size: int, peak: float | None) -> dict:
    """Tokens/s, phase seconds, achieved TFLOP/s and MFU (the FLOP model above) of PPO's steady iterations (the
    first, with its one-off warm-up, left out) from `train_ppo`'s history rows."""
    steady = history[1:] or history
    rows = []
    for h in steady:
        seconds = h["ppo/time_generate"] + h["ppo/time_score"] + h["ppo/time_train"]
        tokens = h["ppo/tokens_per_second"] * seconds  # prompt + response tokens of the batch
        flops = 2 * n_params * tokens * (1 + 3 + 3 * h["ppo/epochs"])
        response = h["ppo/response_length"] * batch_size
        rows.append({"seconds": seconds, "tokens": tokens, "response_tokens": response, "flops": flops})
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    phase = lambda k: sum(h[f"ppo/time_{k}"] for h in steady) / len(steady)  # noqa: E731
    tflops = mean("flops") / mean("seconds") / 1e12
    return {
        "tokens_per_second": mean("tokens") / mean("seconds"),
        "response_tokens_per_second": mean("response_tokens") / mean("seconds"),
        "generate_tokens_per_second": sum(h["ppo/generate_tokens_per_second"] for h in steady) / len(steady),
        "seconds_per_iteration": mean("seconds"),
        "time_generate": phase("generate"),
        "time_score": phase("score"),
        "time_train": phase("train"),
        "achieved_tflops": tflops,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on a GPU, float32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense FLOP/s, in TFLOP/s")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. ppo.batch_size=64")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of benchmarks/results/gpu_ppo.json")
    args = ap.parse_args()

    import torch

    from components.config import compose
    from components.training.ppo import train_ppo

    baseline = rss_mb()
    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    with tempfile.TemporaryDirectory(prefix="gpu-ppo-") as tmp:
        work = Path(tmp)
        data, sft, rm, n_params = build(args.shape, work, dtype)
        cfg = compose(
            [
                f"root={work}",
                f"model.dtype={dtype}",
                f"ppo.steps={args.iterations}",
                "ppo.eval_max_prompts=0",
                "ppo.save_every=100000",
                "ppo.sample_every=0",
                "ppo.kl_ceiling=1e9",  # random weights: the KL is whatever it is, not a divergence
                *args.set,
            ]
        )
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        result = train_ppo(cfg.ppo, cfg.model, str(sft), str(rm), data, work / "ppo", seed=0)
    peak = peak_tflops(args.peak_tflops)
    rates = flop_rates(result.history, n_params, cfg.ppo.batch_size, peak)
    body = {
        "shape": args.shape,
        "parameters": n_params,
        "dtype": dtype,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "iterations": args.iterations,
        "batch_size": cfg.ppo.batch_size,
        "max_new_tokens": cfg.ppo.max_new_tokens,
        "overrides": args.set,
        **rates,
        "memory": memory(baseline),
    }
    if gpu:
        body["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(body, indent=2))
    if args.out:
        args.out.write_text(json.dumps(body, indent=2))
        print(f"wrote {args.out}")
    else:
        write_results("gpu_ppo", body)
    mfu = f"MFU {body['mfu']:.1%}" if body["mfu"] is not None else "MFU n/a (no peak FLOP/s for this device)"
    mem = body.get("cuda_max_memory_allocated_mb") or body["memory"]["peak_over_baseline_mb"]
    print(
        f"PPO, {args.shape} ({n_params / 1e6:.0f}M parameters, {dtype}) on {body['device']}: "
        f"{body['tokens_per_second']:.0f} tokens/s, {body['achieved_tflops']:.2f} TFLOP/s, {mfu}, peak memory {mem:.0f} MB"
    )


if __name__ == "__main__":
    main()
