"""Reward-model stage on the demo (model=tiny, default settings, what `make run` trains): wall seconds, steps/s,
sequences encoded per step, padding share, held-out accuracy; and, counted from the data without a forward,
what the per-pair encoding (2 * C(K,2) sequences for a ranking of K) and the ranking-once encoding (K) cost.

    .venv/bin/python benchmarks/reward_bench.py [--work DIR] [--code CHECKOUT] [--tag after]

--code runs the stage of another checkout (e.g. a `git worktree` of an earlier commit) on the same inputs, for
before/after numbers; --work keeps the demo data, base and SFT model between runs. Results go under --tag in
benchmarks/results/reward_bench.json (other tags are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_sft, rss_mb, write_results  # noqa: E402


def encoding_costs(cfg, sft_dir: str) -> dict:
    """Sequences and token positions (padding included) one epoch of the training batches costs, per-pair vs
    ranking-once (micro-batches of 64 pairs = 128 sequences, as the stage uses)."""
    from components.data.readers import read_preferences
    from components.models.loading import load_tokenizer
    from components.training import checkpoint

    train, _ = read_preferences(cfg.data_path, cfg.reward.eval_fraction)
    tok = load_tokenizer(sft_dir, cfg.model, padding_side="right")
    length: dict[tuple[str, str], int] = {}

    def n_tokens(prompt: str, response: str) -> int:
        key = (prompt, response)
        if key not in length:
            length[key] = min(len(tok(f"{prompt} {response}", add_special_tokens=False)["input_ids"]) + 1, 96)
        return length[key]

    steps = 50
    out = {"per_pair": [0, 0, 0], "ranking_once": [0, 0, 0]}  # sequences, real tokens, padded positions
    for step in range(steps):
        examples = [train[i] for i in checkpoint.batch_for_step(len(train), cfg.reward.batch_size, step, cfg.seed)]
        pairs = [p for ex in examples for p in ex]
        per_pair = [n_tokens(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
        once = [n_tokens(*k) for k in dict.fromkeys((p.prompt, r) for p in pairs for r in (p.chosen, p.rejected))]
        for name, lengths in (("per_pair", per_pair), ("ranking_once", once)):
            for i in range(0, len(lengths), 128):
                chunk = lengths[i : i + 128]
                out[name][0] += len(chunk)
                out[name][1] += sum(chunk)
                out[name][2] += max(chunk) * len(chunk)
    return {
        name: {
            "sequences_per_step": s / steps,
            "tokens_per_step": t / steps,
            "padded_positions_per_step": p / steps,
            "padding_share": 1 - t / p,
        }
        for name, (s, t, p) in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--code", type=Path, default=None, help="a checkout whose components/ to time")
    ap.add_argument("--tag", default="after")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="rlhf-rm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg, sft_dir = demo_sft(work)

    import components
    from components.training.reward import train_reward

    baseline = rss_mb()
    out_dir = work / f"rm-{args.tag}"
    t = time.perf_counter()
    r = train_reward(cfg.reward, cfg.model, sft_dir, cfg.data_path, out_dir, seed=cfg.seed, data_cfg=cfg.data)
    seconds = time.perf_counter() - t
    m = r.metrics
    row = {
        "code": str(Path(components.__file__).resolve().parents[1]),
        "stage_seconds": seconds,
        "train_seconds": m["rm/train_seconds"],
        "steps": cfg.reward.max_steps,
        "steps_per_second": cfg.reward.max_steps / m["rm/train_seconds"],
        "tokens_per_second": m["rm/tokens_per_second"],
        "eval_accuracy": m["rm/eval_accuracy"],
        "feedback_auc": m.get("rm/feedback_auc", float("nan")),
        "peak_rss_mb": rss_mb(),
        "baseline_rss_mb": baseline,
        "encoding": encoding_costs(cfg, sft_dir),
    }
    print(json.dumps(row, indent=2))
    path = RESULTS / "reward_bench.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[args.tag] = row
    write_results("reward_bench", {"runs": runs})


if __name__ == "__main__":
    main()
