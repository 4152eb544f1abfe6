"""The GPU suite (issue 26): what one device call measures, at the Qwen2.5-0.5B shape in bf16 on CUDA.

    bash benchmarks/gpu_suite.sh                                          # on the GPU machine (installs .whl/ first)
    .venv/bin/python benchmarks/gpu_suite.py --shape tiny --out /tmp/s.json   # the CPU path (tests/benchmarks)

1. Stages, component level (no MLflow run, no Prefect): SFT (TRL's SFTTrainer), the reward model and PPO on the
   random-init model of benchmarks/gpu_ppo.py: tokens/s, seconds, peak memory; PPO also achieved TFLOP/s and MFU
   (gpu_ppo.py's FLOP model).
2. PPO against TRL's RLOOTrainer side by side, at each `--batches` (32 and 256 rollouts per iteration): the same
   model, demo prompts, new tokens (24) and one reward callable (the demo judge
   `components.evaluation.judges:sentiment`), LoRA with `ppo.lora` on both. TRL: k=4 completions per prompt, B
   completions per optimizer step, its defaults otherwise. Samples/s is marginal: each side runs `--lengths`
   (two numbers of iterations) in this process, and (B x the extra iterations) / the extra seconds cancels loading,
   compilation and warm-up. Peak CUDA memory of the longer run, above what was allocated before it.
3. Then, while the budget lasts, PPO again at each batch with `ppo.generation_cache=static`.
`--parts` picks among stages, side and static (all three by default).

Writes one JSON (benchmarks/results/gpu_suite.json, or --out) after each part, so a run cut short by its time
budget still leaves what it measured; `--budget-s` skips what would not fit (said in the JSON) and a markdown table
beside the JSON. Runs without MLflow, Prefect or Hydra's CLI: what the device machine carries is the project's code
and the wheels of benchmarks/gpu_wheels.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, rloo_trainer, rss_mb  # noqa: E402
from gpu_ppo import SHAPES, build, flop_rates, peak_tflops  # noqa: E402

REWARD_FN = "components.evaluation.judges:sentiment"


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Peak:
    """Peak memory of a block above what was allocated when it began: CUDA's allocator on a GPU, RSS on CPU."""

    def __enter__(self):
        import torch

        gc.collect()
        if cuda():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = rss_mb() * 2**20
        return self

    def __exit__(self, *exc):
        import torch

        if cuda():
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.mb = rss_mb() - self.start / 2**20  # RSS peaks never fall: an upper bound after the first block
        return False


def stage_cfg(work: Path, dtype: str, *overrides: str):
    from components.config import compose

    return compose([f"root={work}", f"model.dtype={dtype}", "ppo.kl_ceiling=1e9", *overrides])


def run_stages(work: Path, data: Path, sft: Path, dtype: str, n_params: int, steps: int) -> dict:
    """SFT, the reward model and PPO (with that reward model) for a few steps each."""
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    cfg = stage_cfg(
        work,
        dtype,
        f"sft.max_steps={steps}",
        "sft.save_steps=100000",
        f"reward.max_steps={steps}",
        "reward.save_steps=100000",
        "reward.stats_max_responses=64",
        f"ppo.steps={max(2, steps)}",
        "ppo.eval_max_prompts=0",
        "ppo.save_every=100000",
        "ppo.sample_every=0",
    )
    out = {}
    with Peak() as p:
        t = time.perf_counter()
        r = train_sft(cfg.sft, cfg.model, str(sft), data, work / "stage-sft", seed=0)
    out["sft"] = {
        "steps": steps,
        "batch_size": cfg.sft.batch_size,
        "tokens_per_second": r.metrics["sft/tokens_per_second"],
        "train_seconds": r.metrics["sft/train_seconds"],
        "wall_seconds": time.perf_counter() - t,
        "peak_mb": p.mb,
    }
    with Peak() as p:
        t = time.perf_counter()
        rm = train_reward(cfg.reward, cfg.model, str(sft), data, work / "stage-rm", seed=0)
    out["reward"] = {
        "steps": steps,
        "batch_size": cfg.reward.batch_size,
        "tokens_per_second": rm.metrics["rm/tokens_per_second"],
        "wall_seconds": time.perf_counter() - t,
        "peak_mb": p.mb,
    }
    with Peak() as p:
        t = time.perf_counter()
        ppo = train_ppo(cfg.ppo, cfg.model, str(sft), rm.head_dir, data, work / "stage-ppo", seed=0)
    out["ppo"] = {
        "iterations": cfg.ppo.steps,
        "batch_size": cfg.ppo.batch_size,
        **flop_rates(ppo.history, n_params, cfg.ppo.batch_size, peak_tflops(None)),
        "wall_seconds": time.perf_counter() - t,
        "peak_mb": p.mb,
    }
    return out


def ppo_run(
    work: Path,
    data: Path,
    sft: Path,
    dtype: str,
    batch: int,
    minibatch: int,
    iterations: int,
    name: str = "",
    cache: str = "dynamic",
) -> dict:
    """This project's PPO with the judge as its reward, `iterations` iterations of `batch` rollouts."""
    from components.training.ppo import train_ppo

    cfg = stage_cfg(
        work,
        dtype,
        "ppo.use_reward_model=false",
        f"ppo.reward_fn={REWARD_FN}",
        "ppo.value_init=fresh",
        f"ppo.batch_size={batch}",
        f"ppo.minibatch_size={minibatch}",
        f"ppo.steps={iterations}",
        "ppo.eval_max_prompts=0",
        "ppo.save_every=100000",
        "ppo.sample_every=0",
        f"ppo.generation_cache={cache}",
    )
    with Peak() as p:
        t = time.perf_counter()
        r = train_ppo(cfg.ppo, cfg.model, str(sft), None, data, work / f"ppo-{batch}-{iterations}{name}", seed=0)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": p.mb, "history": r.history, "max_new_tokens": cfg.ppo.max_new_tokens}


def rloo_run(work: Path, data: Path, sft: Path, dtype: str, batch: int, iterations: int, name: str = "") -> dict:
    """TRL's RLOOTrainer on the same model, prompts, reward and LoRA: `iterations` steps of `batch` completions."""
    import torch
    from peft import get_peft_model

    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import lora_config

    cfg = stage_cfg(work, dtype)

    with Peak() as p:
        t = time.perf_counter()
        torch.manual_seed(0)
        tok = load_tokenizer(sft, cfg.model, padding_side="left")
        model = get_peft_model(load_causal_lm(sft, cfg.model), lora_config(cfg.ppo.lora))
        out = work / f"rloo-{batch}-{iterations}{name}"
        bf16 = cuda() and dtype == "bfloat16"
        trainer = rloo_trainer(cfg, model, tok, out, batch, iterations, 0, logging_steps=1000000, bf16=bf16)
        trainer.train()
        seconds = time.perf_counter() - t
    del trainer, model
    return {"seconds": seconds, "peak_mb": p.mb}


def marginal(batch: int, lengths: tuple[int, int], short: dict, long: dict) -> dict:
    extra = long["seconds"] - short["seconds"]
    return {
        "samples_per_second": batch * (lengths[1] - lengths[0]) / extra if extra > 0 else None,
        "seconds": [short["seconds"], long["seconds"]],
        "peak_mb": long["peak_mb"],
    }


def side_by_side(work, data, sft, dtype, n_params, batch, lengths, minibatch) -> dict:
    """PPO, then TRL, at one batch size. Each side first runs one iteration unmeasured: the first run of a kind in a
    process pays one-off costs (CUDA context and kernel selection, compilation, lazy imports) that the two timed
    runs would not cancel (measured on CPU: TRL's first 1-step run took 0.83 s, its 2-step run then 0.41 s)."""
    ppo_run(work, data, sft, dtype, batch, minibatch, 1, name="warm-up")
    ppo = [ppo_run(work, data, sft, dtype, batch, minibatch, n) for n in lengths]
    row = {"batch": batch, "minibatch": minibatch, "lengths": list(lengths)}
    row["ppo"] = marginal(batch, lengths, *ppo)
    row["ppo"].update({k: v for k, v in flop_rates(ppo[1]["history"], n_params, batch, peak_tflops(None)).items()})
    rloo_run(work, data, sft, dtype, batch, 1, name="warm-up")
    rloo = [rloo_run(work, data, sft, dtype, batch, n) for n in lengths]
    row["trl_rloo"] = marginal(batch, lengths, *rloo)
    if row["ppo"]["samples_per_second"] and row["trl_rloo"]["samples_per_second"]:
        row["speedup"] = row["ppo"]["samples_per_second"] / row["trl_rloo"]["samples_per_second"]
    return row


def static_cache(work, data, sft, dtype, n_params, batch, lengths, minibatch) -> dict:
    """This project's PPO again at one batch size, sampling with `ppo.generation_cache=static` (a preallocated KV
    cache, which transformers compiles on CUDA); its warm-up iteration pays the compilation."""
    ppo_run(work, data, sft, dtype, batch, minibatch, 1, name="warm-up-static", cache="static")
    ppo = [ppo_run(work, data, sft, dtype, batch, minibatch, n, name="-static", cache="static") for n in lengths]
    out = marginal(batch, lengths, *ppo)
    out.update(flop_rates(ppo[1]["history"], n_params, batch, peak_tflops(None)))
    return out


def table(body: dict) -> str:
    lines = [
        f"# GPU suite: {body['shape']} ({body['parameters'] / 1e6:.1f}M parameters, {body['dtype']}) "
        f"on {body['device']}",
        "",
        "| batch | PPO samples/s | TRL RLOO samples/s | PPO / TRL | PPO MFU | peak MB, PPO / TRL "
        "| PPO, static cache: samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in body.get("side_by_side", []):
        nothing = {"samples_per_second": None, "peak_mb": float("nan")}
        p, t, st = r.get("ppo", nothing), r.get("trl_rloo", nothing), r.get("ppo_static", {})
        fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
        lines.append(
            f"| {r['batch']} | {fmt(p['samples_per_second'], '.1f')} | {fmt(t['samples_per_second'], '.1f')} "
            f"| {fmt(r.get('speedup'), '.2f')} | {fmt(p.get('mfu'), '.1%')} | {p['peak_mb']:.0f} / {t['peak_mb']:.0f} "
            f"| {fmt(st.get('samples_per_second'), '.1f')} |"
        )
    for name, s in body.get("stages", {}).items():
        lines.append(f"\n{name}: {s['tokens_per_second']:.0f} tokens/s, peak {s['peak_mb']:.0f} MB")
    if body.get("skipped"):
        lines.append(f"\nskipped (time budget): {', '.join(body['skipped'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--lengths", type=int, nargs=2, default=[2, 5], help="the two run lengths, in iterations")
    ap.add_argument("--stage-steps", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip parts that start after this many seconds")
    ap.add_argument("--parts", default="stages,side,static", help="which of stages,side,static to run")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_suite.json")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    begin = time.perf_counter()
    dtype = args.dtype or ("bfloat16" if cuda() else "float32")
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        work = Path(tmp)
        data, sft, _, n_params = build(args.shape, work, dtype)
        body = {
            "shape": args.shape,
            "parameters": n_params,
            "dtype": dtype,
            "device": torch.cuda.get_device_name() if cuda() else "cpu",
            "torch": torch.__version__,
            "peak_tflops": peak_tflops(None),
            "lengths": args.lengths,
            "skipped": [],
            "side_by_side": [],
        }

        def save() -> None:
            body["suite_seconds"] = time.perf_counter() - begin
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(body, indent=2))
            args.out.with_suffix(".md").write_text(table(body))

        def fits(what: str) -> bool:
            if time.perf_counter() - begin < args.budget_s:
                return True
            body["skipped"].append(what)
            return False

        parts = set(args.parts.split(","))
        if "stages" in parts and fits("stages"):
            body["stages"] = run_stages(work, data, sft, dtype, n_params, args.stage_steps)
            save()
        for batch in args.batches if "side" in parts else []:
            if fits(f"side_by_side batch {batch}"):
                minibatch = min(batch // 2, 64)
                row = side_by_side(work, data, sft, dtype, n_params, batch, tuple(args.lengths), minibatch)
                body["side_by_side"].append(row)
                save()
                print(f"batch {batch}: {json.dumps({k: v for k, v in row.items() if k != 'lengths'})}", flush=True)
        if "side" not in parts:  # static alone: rows of its own
            body["side_by_side"] = [
                {"batch": b, "minibatch": min(b // 2, 64), "lengths": args.lengths} for b in args.batches
            ]
        for row in body["side_by_side"] if "static" in parts else []:  # lower priority: after every side-by-side row
            if fits(f"static cache batch {row['batch']}"):
                b, lengths = row["batch"], tuple(args.lengths)
                row["ppo_static"] = static_cache(work, data, sft, dtype, n_params, b, lengths, row["minibatch"])
                save()
                print(f"batch {b}, static cache: {json.dumps(row['ppo_static'])}", flush=True)
        save()
    print(table(body))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({body['suite_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
