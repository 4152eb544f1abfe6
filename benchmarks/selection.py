"""The policy methods side by side, on the demo and on small data: PPO, GRPO, RLOO, rejection-sampling fine-tuning
(RS), DPO, KTO and best-of-4 at serving (on the SFT policy and on the PPO policy). The online algorithms at an equal
number of sampled responses (PPO: 40 iterations x 32; GRPO, RLOO: 40 steps x 8 prompts x 4 samples; RS: 4 rounds x
80 prompts x 4 samples = 1280); DPO and KTO, offline, sample nothing: their stage defaults (200 steps of 16
judgements), each where its data kind exists (DPO: comparisons; KTO: thumbs).

    .venv/bin/python benchmarks/selection.py [--settings demo small_prefs small_feedback] [--seeds 0 1 2]

Settings (the tiny demo base is pretrained once on the full demo corpus, standing in for a pretrained model):
  demo            the demo: 2000 demonstrations, 2000 comparisons, 1000 thumbs up/down
  small_prefs     the forum user's case: 300 demonstrations, 100 comparisons, no feedback
  small_feedback  300 demonstrations, no comparisons, 300 thumbs up/down

Per setting and seed (one process each): SFT, the reward model and both algorithms train on that setting's data
(stage defaults); then every policy samples one response per held-out eval prompt (100 prompts, the same seed)
and is measured by:
  - the setting's own reward model (`RM reward`: mean score in its std units; what the gate sees),
  - the full demo's reward model (`yardstick RM`: the same scorer for every setting),
  - the independent judge (lexicon sentiment, not a reward model: what the annotator actually prefers),
  - the KL to the SFT policy (nats per response; best-of-n: the policy's own KL plus at most
    log n - (n-1)/n = 0.636 for n = 4 (Stiennon et al. 2020 / Beirami et al. 2024): its exact KL is not a sum over
    tokens of one policy, so it is reported as the bound),
  - degeneration: the share of answers with a word repeated back to back ("every every"), and distinct-2,
  - the win rate against SFT (the share of prompts where the setting's RM prefers the policy's answer, ties half),
  - wall seconds of the policy stage and its peak resident memory (the process's, so an upper bound after the
    first), and for best-of-4 the serving seconds per prompt (n=4 vs n=1).
Best-of-4 goes through the real served model (mlflow.pyfunc, components/registry/policy_model.py, n=4); its RM
reward is measured by the RM that chose it, so read its judge score first.

Writes benchmarks/results/selection.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, spawn, write_results  # noqa: E402

SETTINGS = {
    "demo": [],
    "small_prefs": ["data.n_demonstrations=300", "data.n_preferences=100", "data.n_feedback=0"],
    "small_feedback": ["data.n_demonstrations=300", "data.n_preferences=0", "data.n_feedback=300"],
}
POLICIES = ("sft", "ppo", "grpo", "rloo", "rs", "dpo", "kto", "sft best-of-4", "ppo best-of-4")
N = 4


def best_of_n(base_dir: str, adapter: str | None, reward_dir: str, prompts: list[str], cfg, work: Path) -> dict:
    """The served model (mlflow pyfunc, saved locally) answering the eval prompts with n=N and n=1: the chosen
    responses, their scores, and the seconds per prompt of each."""
    import mlflow

    from components.registry.policy_model import Limits
    from components.registry.registry import POLICY_MODEL_FILE, model_signature, policy_artifacts

    path = work / "served"
    with policy_artifacts(base_dir, adapter, reward_dir) as artifacts:
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(POLICY_MODEL_FILE),
            artifacts=artifacts,
            signature=model_signature(with_score=True),
            model_config=Limits().as_config(),
        )
    model = mlflow.pyfunc.load_model(str(path))
    params = {"max_new_tokens": cfg.gate.max_new_tokens, "temperature": cfg.gate.temperature, "top_p": 1.0}
    out = {}
    for n in (1, N):
        started, responses = time.perf_counter(), []
        for i in range(0, len(prompts), 16):  # the served model's max_prompts
            answer = model.predict(prompts[i : i + 16], params={**params, "n": n, "seed": cfg.gate.seed + i})
            responses.extend(answer["response"])
        out[n] = {"responses": responses, "seconds_per_prompt": (time.perf_counter() - started) / len(prompts)}
    return out


def one(setting: str, seed: int, work: Path, yardstick: str | None) -> dict:

    from components.config import compose
    from components.data.demo import write_demo
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies, win_rate
    from components.evaluation.judges import sentiment
    from components.models.demo_base import build_demo_base
    from components.training.direct import train_direct
    from components.training.group_rl import train_group_rl
    from components.training.ppo import train_ppo
    from components.training.rejection_sampling import train_rejection_sampling
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    full = compose([f"root={work / 'full'}", f"seed={seed}"])
    if not full.data_path.is_dir():
        write_demo(full.data, full.data_path)
    base = build_demo_base(full.model, full.data_path, "bench", work / "models")  # pretrained once, every setting
    cfg = compose([f"root={work / setting}", f"seed={seed}", *SETTINGS[setting]])
    if not cfg.data_path.is_dir():
        write_demo(cfg.data, cfg.data_path)
    out = work / setting / f"seed{seed}"
    t = {}
    t0 = time.perf_counter()
    sft = train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, out / "sft", seed=seed)
    t["sft"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rm = train_reward(cfg.reward, cfg.model, sft.merged_dir, cfg.data_path, out / "rm", seed=seed, data_cfg=cfg.data)
    t["rm"] = time.perf_counter() - t0
    peak = {}
    ppo = train_ppo(cfg.ppo, cfg.model, sft.merged_dir, rm.head_dir, cfg.data_path, out / "ppo", seed=seed)
    peak["ppo"] = peak_rss_mb()
    group = {}
    for algorithm in ("grpo", "rloo"):
        group[algorithm] = train_group_rl(
            algorithm,
            getattr(cfg.policy, algorithm),
            cfg.ppo,
            cfg.model,
            sft.merged_dir,
            rm.head_dir,
            cfg.data_path,
            out / algorithm,
            seed,
        )
        peak[algorithm] = peak_rss_mb()
    rs = train_rejection_sampling(
        cfg.policy.rejection_sampling, cfg.ppo, cfg.model, sft.merged_dir, rm.head_dir, cfg.data_path, out / "rs", seed
    )
    peak["rs"] = peak_rss_mb()
    direct = {}
    for method, kind in (("dpo", "preferences"), ("kto", "feedback")):
        if not (cfg.data_path / kind).is_dir():
            continue  # the method its data cannot train
        direct[method] = train_direct(
            method,
            getattr(cfg.policy, method),
            cfg.ppo,
            cfg.model,
            sft.merged_dir,
            rm.head_dir,
            cfg.data_path,
            out / method,
            cfg.reward.eval_fraction,
            seed,
            cfg.data,
        )
        peak[method] = peak_rss_mb()
    prompts = read_prompts(cfg.data_path, "eval")[: cfg.gate.max_prompts]
    specs = [
        PolicySpec("sft", sft.merged_dir),
        PolicySpec("ppo", sft.merged_dir, ppo.policy_dir),
        PolicySpec("grpo", sft.merged_dir, group["grpo"].policy_dir),
        PolicySpec("rloo", sft.merged_dir, group["rloo"].policy_dir),
        PolicySpec("rs", sft.merged_dir, rs.policy_dir),
        *(PolicySpec(m, sft.merged_dir, r.policy_dir) for m, r in direct.items()),
    ]
    evals = evaluate_policies(specs, sft.merged_dir, rm.head_dir, prompts, cfg.gate, cfg.model)
    rows = {
        name: {
            "rm_reward": e.metrics["reward_mean"],
            "judge": e.metrics["judge_mean"],
            "kl": e.metrics["kl"],
            "win_rate": win_rate(e.rewards, evals["sft"].rewards),
        }
        for name, e in evals.items()
    }
    rows["ppo"]["seconds"] = ppo.metrics["ppo/train_seconds"]
    rows["rs"]["seconds"] = rs.metrics["rs/train_seconds"]
    for algorithm, result in (group | direct).items():
        rows[algorithm]["seconds"] = result.metrics[f"{algorithm}/train_seconds"]
    for name in peak:
        rows[name]["peak_rss_mb"] = peak[name]
    texts = {name: e.responses for name, e in evals.items()}
    for name, e in evals.items():
        rows[name] |= degeneration(e.responses)
    bound = __import__("math").log(N) - (N - 1) / N
    for name, adapter in (("sft", None), ("ppo", ppo.policy_dir)):
        served = best_of_n(sft.merged_dir, adapter, rm.head_dir, prompts, cfg, out / f"serve-{name}")
        texts[f"{name} best-of-{N}"] = served[N]["responses"]
        rows[f"{name} best-of-{N}"] = degeneration(served[N]["responses"]) | {
            "judge": statistics.mean(sentiment(prompts, served[N]["responses"])),
            "kl_bound": rows[name]["kl"] + bound,
            "serve_seconds_per_prompt": served[N]["seconds_per_prompt"],
            "serve_seconds_per_prompt_n1": served[1]["seconds_per_prompt"],
        }
    # every policy's responses scored by this setting's RM and by the yardstick (the full demo's RM)
    for scorer_name, (scorer_sft, scorer_rm) in {
        "rm_reward": (sft.merged_dir, rm.head_dir),
        "yardstick": yardstick_of(yardstick, sft.merged_dir, rm.head_dir),
    }.items():
        scores = score_texts(scorer_sft, scorer_rm, prompts, texts, cfg)
        for name, s in scores.items():
            rows[name][scorer_name] = s
    return {
        "setting": setting,
        "seed": seed,
        "rows": rows,
        "stage_seconds": t,
        "rm": {k: v for k, v in rm.metrics.items() if k in ("rm/eval_accuracy", "rm/feedback_auc")},
        "samples": {
            "ppo": cfg.ppo.steps * cfg.ppo.batch_size,
            "rs": rs.metrics["rs/samples"],
            **{a: r.metrics[f"{a}/samples"] for a, r in group.items()},
        },
        "dirs": {"sft": sft.merged_dir, "rm": rm.head_dir},
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): each method's column is an upper bound on its own."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def degeneration(texts: list[str]) -> dict[str, float]:
    """The share of answers with a word repeated back to back ("every every"), and distinct-2 over all answers."""
    import re

    from components.evaluation.evaluate import distinct_n

    repeated = [bool(re.search(r"\b(\w+)\s+\1\b", t.lower())) for t in texts]
    return {"repeat_share": sum(repeated) / max(1, len(texts)), "distinct_2": distinct_n(texts, 2)}


def yardstick_of(yardstick: str | None, sft_dir: str, rm_dir: str) -> tuple[str, str]:
    return tuple(json.loads(yardstick)) if yardstick else (sft_dir, rm_dir)


def score_texts(sft_dir: str, rm_dir: str, prompts: list[str], texts: dict[str, list[str]], cfg) -> dict[str, float]:
    """Mean normalised score of each policy's responses under one reward model (the reward stage's own scoring)."""
    import torch
    from peft import PeftModel

    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import ScalarHead
    from components.training import reward

    scorer = PeftModel.from_pretrained(load_causal_lm(sft_dir, cfg.model), str(Path(rm_dir) / "adapter")).eval()
    head, meta = ScalarHead.load(Path(rm_dir))
    tok = load_tokenizer(sft_dir, cfg.model, padding_side="right")
    rm_cfg = replace(cfg.reward, max_length=meta["max_length"])
    with torch.no_grad():
        return {
            name: (
                (reward.score_texts(scorer, head, tok, prompts, responses, rm_cfg, "cpu") - meta["reward_mean"])
                / meta["reward_std"]
            )
            .mean()
            .item()
            for name, responses in texts.items()
        }


def cell(runs: list[dict], policy: str, key: str, spread: bool = True, fmt: str = "{:.3f}") -> str:
    """Mean (± std over seeds) of one measurement of one policy; '-' when not measured."""
    xs = [r["rows"][policy][key] for r in runs if key in r["rows"].get(policy, {})]
    if not xs:
        return "-"
    return fmt.format(statistics.mean(xs)) + (f" ± {statistics.stdev(xs):.3f}" if spread and len(xs) > 1 else "")


def table(results: list[dict], settings: list[str]) -> str:
    cols = (
        "RM reward",
        "yardstick RM",
        "judge",
        "win rate vs SFT",
        "KL to SFT",
        "repeated word",
        "distinct-2",
        "train s",
        "peak MB",
        "serve s/prompt (n=1)",
    )
    lines = []
    for setting in settings:
        runs = [r for r in results if r["setting"] == setting]
        if not runs:
            continue
        lines += [
            f"\n### {setting} ({len(runs)} seed{'s' * (len(runs) > 1)})\n",
            "| policy | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for p in POLICIES:
            if not any(p in r["rows"] for r in runs):
                continue  # a method this setting's data cannot train
            best = "best" in p
            kl = "≤ " + cell(runs, p, "kl_bound", False, "{:.2f}") if best else cell(runs, p, "kl", False, "{:.2f}")
            serve = "-"
            if best:
                serve = (
                    cell(runs, p, "serve_seconds_per_prompt", False)
                    + " ("
                    + cell(runs, p, "serve_seconds_per_prompt_n1", False)
                    + ")"
                )
            lines.append(
                f"| {p} | {cell(runs, p, 'rm_reward')} | {cell(runs, p, 'yardstick')} | {cell(runs, p, 'judge')} | "
                f"{cell(runs, p, 'win_rate', False, '{:.2f}')} | "
                f"{kl} | {cell(runs, p, 'repeat_share', False, '{:.2f}')} | {cell(runs, p, 'distinct_2', False, '{:.2f}')} | "
                f"{cell(runs, p, 'seconds', False, '{:.1f}')} | {cell(runs, p, 'peak_rss_mb', False, '{:.0f}')} | {serve} |"
            )
        acc = [
            r["rm"]["rm/eval_accuracy"]
            for r in runs
            if r["rm"].get("rm/eval_accuracy", float("nan")) == r["rm"].get("rm/eval_accuracy")
        ]
        auc = [r["rm"]["rm/feedback_auc"] for r in runs if "rm/feedback_auc" in r["rm"]]
        held = [f"comparison accuracy {statistics.mean(acc):.3f}" if acc else "no comparisons"]
        held += [f"feedback AUC {statistics.mean(auc):.3f}"] if auc else []
        lines.append("\nreward model on held-out data: " + ", ".join(held))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--name", default="selection", help="results file name under benchmarks/results/")
    ap.add_argument("--one", nargs=3, metavar=("SETTING", "SEED", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--yardstick", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        setting, seed, work = args.one
        print("RESULT " + json.dumps(one(setting, int(seed), Path(work), args.yardstick)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="rlhf-selection-") as tmp:
        yardsticks: dict[int, str] = {}
        for seed in args.seeds:
            for setting in ["demo"] + [
                s for s in args.settings if s != "demo"
            ]:  # the demo first: its RM is the yardstick
                started = time.perf_counter()
                extra = ["--yardstick", yardsticks[seed]] if seed in yardsticks else []
                r = spawn(__file__, ["--one", setting, str(seed), tmp, *extra])
                if setting == "demo":
                    yardsticks[seed] = json.dumps([r["dirs"]["sft"], r["dirs"]["rm"]])
                if setting in args.settings:
                    results.append(r)
                print(f"{setting} seed {seed}: {time.perf_counter() - started:.0f} s")
                print(table([r], [setting]))
    body = table(results, args.settings)
    print(body)
    write_results(args.name, {"seeds": args.seeds, "runs": results})
    (RESULTS / f"{args.name}.md").write_text(
        "# The policy methods side by side (benchmarks/selection.py)\n\nMean ± std over seeds "
        + ", ".join(map(str, args.seeds))
        + "; equal sampled responses (1280) for PPO, GRPO, RLOO and RS. Rerun: `.venv/bin/python benchmarks/selection.py "
        + f"--seeds {' '.join(map(str, args.seeds))} --settings {' '.join(args.settings)} --name {args.name}`\n"
        + body
        + "\n"
    )
    print(f"wrote {(RESULTS / f'{args.name}.md').relative_to(REPO)}")


if __name__ == "__main__":
    main()
