"""Incremental against full retraining (issue 40), on the demo, as the data grows: time per stage and quality.

Per seed, one project with two registered models fed by the same data:
    inc   the first retrain (full), then after each growth step `retrain.mode=auto` (incremental: the champion's SFT
          kept, its reward model and policy trained on with the new rows)
    full  after each growth step, `retrain.mode=full` on the same data (every stage from scratch)
A growth step ingests new comparisons (`rlhf ingest`'s flow: validated, versioned) - by default +10% of the demo's,
then +10% more. The gate is open (every candidate is promoted): the lines are compared here, not gated.

Measured per step: each training stage's wall time (MLflow child runs); the reward model's held-out accuracy on the
demo's comparisons (old: forgetting shows there) and on the ingested ones (new); the policy's judge score, KL and
degeneration on the eval prompts (the evaluate stage's, against each line's own reward model: the judge and the
guard's measures compare, the reward does not); the incremental policy's win rate against the full one, both scored
by the full line's reward model on the eval prompts.

    .venv/bin/python benchmarks/incremental.py                          # seeds 0 1 2, +10% then +10%
    .venv/bin/python benchmarks/incremental.py --seeds 0 --growth 0.01  # a quick look (+1%)

Writes benchmarks/results/incremental.json (under --tag, default "latest") and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS  # noqa: E402

OPEN_GATE = [
    "gate.min_reward_gain=-100",
    "gate.min_win_rate=0",
    "gate.min_judge_gain=null",
    "gate.max_kl=1e9",
    "gate.max_repeated_word_gain=null",
    "gate.min_distinct_2_ratio=null",
    "gate.max_disagreement_ratio=null",
    "gate.min_new_accuracy_gain=null",
]
TRAINING = ("base", "sft", "reward", "ppo")


def new_comparisons(cfg, n: int, seed: int, out: Path) -> Path:
    """n comparisons from the demo generator with another seed, with ids of their own; none on a frozen eval prompt
    (the ingest refuses eval leakage)."""
    from components.data.demo import write_demo
    from components.data.readers import read_prompts
    from components.data.schemas import normalise_text

    evals = {normalise_text(p) for p in read_prompts(cfg.data_path, "eval")}
    tmp = Path(tempfile.mkdtemp(prefix="rlhf-grow-"))
    write_demo(replace(cfg.data, seed=seed, n_preferences=2 * n, n_feedback=0), tmp)
    rows = [json.loads(line) for shard in sorted((tmp / "preferences").glob("*.jsonl")) for line in shard.open()]
    rows = [r for r in rows if normalise_text(r["prompt"]) not in evals][:n]
    out.write_text("".join(json.dumps(r | {"id": f"grow-{seed}-{i}"}) + "\n" for i, r in enumerate(rows)))
    shutil.rmtree(tmp)
    return out


def stage_seconds(run_id: str) -> dict[str, float]:
    import mlflow

    experiment = mlflow.get_run(run_id).info.experiment_id
    children = mlflow.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", output_format="list"
    )
    return {c.data.tags["stage"]: (c.info.end_time - c.info.start_time) / 1000 for c in children}


def rm_accuracy(cfg, sft_dir: str, reward_dir: str, data_dir: Path, keep) -> float:
    """The reward model's held-out pairwise accuracy on the comparisons of the shards `keep` keeps."""
    from peft import PeftModel

    from components.data.readers import read_preferences
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import ScalarHead
    from components.training.reward import evaluate_reward_model

    _, held = read_preferences(data_dir, cfg.reward.eval_fraction, keep)
    model = PeftModel.from_pretrained(load_causal_lm(sft_dir, cfg.model, "cpu"), str(Path(reward_dir) / "adapter"))
    head, _ = ScalarHead.load(Path(reward_dir))
    tok = load_tokenizer(sft_dir, cfg.model, padding_side="right")
    return evaluate_reward_model(model, head, tok, held, cfg.reward, "cpu")["rm/eval_accuracy"]


def head_to_head(cfg, inc, full) -> dict[str, float]:
    """The incremental policy against the full one on the eval prompts, scored by the full line's reward model."""
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies, win_rate

    specs = [PolicySpec("incremental", inc.sft.dir, inc.policy.dir), PolicySpec("full", full.sft.dir, full.policy.dir)]
    prompts = read_prompts(Path(full.data.path), "eval")
    evals = evaluate_policies(specs, full.sft.dir, full.reward.dir, prompts, cfg.gate, cfg.model)
    return {
        "win_rate_vs_full": win_rate(evals["incremental"].rewards, evals["full"].rewards),
        **{f"{p}/{k}_same_scorer": evals[p].metrics[k] for p in evals for k in ("reward_mean", "judge_mean")},
    }


def measure(cfg, s, old: set[str]) -> dict:
    data = Path(s.data.path)
    m = s.gate.eval["candidate"]
    return {
        "mode": s.mode,
        "stages_s": stage_seconds(s.run_id),
        "rm_accuracy_old": rm_accuracy(cfg, s.sft.dir, s.reward.dir, data, lambda shard: shard in old),
        "rm_accuracy_new": rm_accuracy(cfg, s.sft.dir, s.reward.dir, data, lambda shard: shard not in old),
        **{k: m[k] for k in ("judge_mean", "kl", "repeated_word_share", "distinct_2", "reward_mean") if k in m},
    }


def one_seed(seed: int, growth: list[float], keep: Path | None) -> dict:
    from components.config import compose
    from components.data.lineage import manifest
    from flows.ingest import ingest_flow
    from flows.retrain import retrain

    root = Path(tempfile.mkdtemp(prefix=f"rlhf-incremental-{seed}-"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    common = [f"root={root}", f"seed={seed}", *OPEN_GATE]
    inc_cfg = compose([*common, "tracking.registered_model_name=inc"])
    full_cfg = compose([*common, "tracking.registered_model_name=full", "retrain.mode=full"])

    def run(cfg):
        t0 = time.perf_counter()
        state = retrain(cfg, return_state=True)
        assert state.is_completed(), state.message
        s = state.result()
        print(f"seed {seed}: {cfg.tracking.registered_model_name} {s.mode} in {time.perf_counter() - t0:.0f} s")
        return s

    first = run(inc_cfg)
    old = set(manifest(Path(first.data.path)))
    out: dict = {"first": {"stages_s": stage_seconds(first.run_id)}, "steps": []}
    parent = first
    n_demo = inc_cfg.data.n_preferences
    for step, fraction in enumerate(growth, 1):
        batch = new_comparisons(inc_cfg, round(fraction * n_demo), 1000 * seed + step, root / f"grow-{step}.jsonl")
        ingested = ingest_flow(inc_cfg, str(batch), "preferences", return_state=True)
        assert ingested.is_completed(), ingested.message
        # the champion the incremental line continues from, on the grown data (before a later run prunes its dirs)
        grown = Path(inc_cfg.data_path)
        before = {
            "rm_accuracy_old": rm_accuracy(inc_cfg, parent.sft.dir, parent.reward.dir, grown, lambda sh: sh in old),
            "rm_accuracy_new": rm_accuracy(inc_cfg, parent.sft.dir, parent.reward.dir, grown, lambda sh: sh not in old),
            "judge_mean": parent.gate.eval["candidate"].get("judge_mean"),
        }
        inc, full = run(inc_cfg), run(full_cfg)
        assert inc.mode == "incremental" and full.mode == "full", (inc.mode_reason, full.mode_reason)
        row = {
            "step": step,
            "fraction": fraction,
            "ingest": ingested.message,
            "parent": before,
            "incremental": measure(inc_cfg, inc, old),
            "full": measure(full_cfg, full, old),
            **head_to_head(full_cfg, inc, full),
        }
        out["steps"].append(row)
        print(json.dumps(row, indent=1))
        parent = inc
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return out


def training_seconds(stages: dict[str, float]) -> float:
    return sum(v for k, v in stages.items() if k in TRAINING)


def summarise(per_seed: dict[int, dict]) -> list[dict]:
    """Per growth step, across seeds: mean and std of each measure for both lines, and the time ratio."""
    table = []
    steps = len(next(iter(per_seed.values()))["steps"])
    for i in range(steps):
        rows = [r["steps"][i] for r in per_seed.values()]
        entry: dict = {"step": i + 1, "fraction": rows[0]["fraction"], "seeds": len(rows)}
        for key in ("rm_accuracy_old", "rm_accuracy_new", "judge_mean", "kl", "repeated_word_share", "distinct_2"):
            for line in ("incremental", "full"):
                vals = [r[line][key] for r in rows if key in r[line]]
                entry[f"{line}/{key}"] = stats(vals)
        for key in ("rm_accuracy_old", "rm_accuracy_new", "judge_mean"):
            entry[f"parent/{key}"] = stats([r["parent"][key] for r in rows if r["parent"].get(key) is not None])
        for key in ("incremental/judge_mean_same_scorer", "full/judge_mean_same_scorer", "win_rate_vs_full"):
            entry[key] = stats([r[key] for r in rows])
        inc_t = [training_seconds(r["incremental"]["stages_s"]) for r in rows]
        full_t = [training_seconds(r["full"]["stages_s"]) for r in rows]
        entry["incremental/training_s"], entry["full/training_s"] = stats(inc_t), stats(full_t)
        entry["time_ratio"] = stats([a / b for a, b in zip(inc_t, full_t, strict=True)])
        table.append(entry)
    return table


def stats(vals: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--growth", type=float, nargs="+", default=[0.1, 0.1])
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--keep", action="store_true", help="keep the projects (their MLflow runs) for a look")
    args = ap.parse_args()
    per_seed = {seed: one_seed(seed, args.growth, Path("keep") if args.keep else None) for seed in args.seeds}
    table = summarise(per_seed)
    path = RESULTS / "incremental.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.tag] = {"seeds": args.seeds, "growth": args.growth, "per_seed": per_seed, "summary": table}
    path.write_text(json.dumps(results, indent=1) + "\n")
    for e in table:
        print(
            f"step {e['step']} (+{e['fraction']:.0%}): training stages incremental "
            f"{e['incremental/training_s']['mean']:.1f} s vs full {e['full/training_s']['mean']:.1f} s "
            f"(ratio {e['time_ratio']['mean']:.2f}); RM accuracy old {e['incremental/rm_accuracy_old']['mean']:.3f} "
            f"vs {e['full/rm_accuracy_old']['mean']:.3f}, new {e['incremental/rm_accuracy_new']['mean']:.3f} vs "
            f"{e['full/rm_accuracy_new']['mean']:.3f}; judge {e['incremental/judge_mean']['mean']:+.3f} vs "
            f"{e['full/judge_mean']['mean']:+.3f}; win rate vs full {e['win_rate_vs_full']['mean']:.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
