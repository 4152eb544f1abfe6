"""What the benchmark scripts share: one measurement per process, peak memory, host facts, results."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(baseline_mb: float) -> dict:
    """Peak memory of this process: RSS (and above the runtime baseline), plus CUDA's peak on a GPU."""
    import torch

    out = {"baseline_rss_mb": baseline_mb, "peak_rss_mb": rss_mb(), "peak_over_baseline_mb": rss_mb() - baseline_mb}
    if torch.cuda.is_available():
        out.update(cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20, gpu=torch.cuda.get_device_name())
    return out


def spawn(script: str, args: list[str]) -> dict:
    """Run `script --one ...` in a fresh process (so its peak memory is its own); return its RESULT line."""
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def write_results(name: str, body: dict) -> Path:
    import torch

    host = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"host": host, **body}, indent=2))
    print(f"wrote {path.relative_to(REPO)}")
    return path


def write_tagged(name: str, tag: str, row: dict) -> Path:
    """`row` under `tag` in benchmarks/results/<name>.json, next to the file's other tags (earlier runs kept)."""
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[tag] = row
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path} (tag {tag!r})")
    return path


def demo_sft(work: Path, seed: int | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Demo data, the tiny base and SFT with default settings (what `make run` trains; with `seed`, that seed's, in
    `work/seed<seed>/`; `overrides`: Hydra overrides on top), cached in `work`: -> (the config, the merged SFT dir)."""
    from components.config import compose
    from components.data.demo import write_demo
    from components.models.demo_base import build_demo_base
    from components.training.sft import train_sft

    cfg = compose([f"root={work}", *([f"seed={seed}"] if seed is not None else []), *overrides])
    if not cfg.data_path.is_dir():
        write_demo(cfg.data, cfg.data_path)
    sft_dir = work / "sft" if seed is None else work / f"seed{seed}" / "sft"
    if not (sft_dir / "merged").is_dir():
        base = build_demo_base(cfg.model, cfg.data_path, "bench", work / "models")
        train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, sft_dir, seed=cfg.seed)
    return cfg, str(sft_dir / "merged")


def rloo_trainer(cfg, model, tok, output_dir: Path, batch: int, steps: int, seed: int, callbacks=(), **args):
    """TRL's RLOOTrainer as the peer benchmarks run it: the demo judge as the reward, the demo's rollout prompts,
    k=4 completions per prompt, `batch` completions per optimizer step, PPO's sampling settings and learning rate
    (`cfg.ppo`), TRL's defaults otherwise; `args`: more RLOOConfig fields."""
    import torch
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from components.data.readers import read_prompts
    from components.evaluation.judges import sentiment

    def reward(prompts, completions, **kw):
        return sentiment(prompts, completions)

    config = RLOOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        num_generations=4,
        max_completion_length=cfg.ppo.max_new_tokens,
        learning_rate=cfg.ppo.learning_rate,
        max_steps=steps,
        temperature=cfg.ppo.temperature,
        top_p=cfg.ppo.top_p,
        seed=seed,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        **args,
    )
    dataset = Dataset.from_dict({"prompt": read_prompts(cfg.data_path, "prompts")})
    return RLOOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=list(callbacks),
    )
