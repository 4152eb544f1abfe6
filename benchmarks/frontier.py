"""The learning frontier (issue 42): what each lever buys in judge score and what it costs in degeneration, with the
`make run` default chosen from it and the gate's degeneration thresholds set from SFT's spread.

Per data setting (`demo`: what `make run` trains; `demo_small`: `data=demo_small`, 300 of each kind) and seed (one
process each): SFT and the reward model with `make run`'s settings (and a 3-member ensemble for the ensemble lever),
then one policy per point of POINTS, each `make run`'s settings with the point's overrides:
  - ppo.ptx_coef, ppo.target_kl, PPO steps, and two combinations of them;
  - plain PPO (ptx 0) at three KL targets: the over-optimisation curve without the pretraining term;
  - reward.ensemble=3 with ppo.uncertainty_penalty;
  - the method: GRPO, RLOO, DPO (their stage defaults);
  - best-of-4 at serving (the served model, n=4, ranked by its reward model) on the default policy and on one other.
Every policy is sampled as served (temperature 0.7, 48 new tokens) on three prompt sets:
  - `eval`: the demo's frozen eval prompts (2 samples each) and CHOICE, 30 prompts in a style the demo never has
    (8 samples each): the default is chosen on these;
  - `unseen`: benchmarks/served_degeneration.py's 30 frozen prompts (16 samples each), which no choice looks at:
    the reported numbers and the issue's targets.
Measured per point: the independent judge (lexicon sentiment, not the reward model), the reward model's reward
(`make run`'s single RM, the same scorer for every point), the repeated-word share, distinct-2, mean words, and the
KL to SFT (best-of-4: the policy's KL plus the bound log n - (n-1)/n). And SFT at the gate's own sampling
(temperature 1.0, 24 tokens, eval prompts) with 2 sampling seeds per training seed: the spread the gate's
degeneration thresholds are set from.

The default (`choose`): on `demo`'s eval side (the eval prompts and CHOICE pooled per seed), the highest mean judge
among the trained points whose repeated-word share is at most SFT's on every seed, with answers at least 75% of SFT's
length on every seed.

    .venv/bin/python benchmarks/frontier.py [--settings demo demo_small] [--seeds 0 1 2] [--write-gate]
    .venv/bin/python benchmarks/frontier.py --settings demo --points NAME ... [--name F]   # more points, merged
    .venv/bin/python benchmarks/frontier.py --from-json [--write-gate]                     # tables and plots again

Writes benchmarks/results/frontier.json, frontier.md and frontier.png, frontier_overoptimisation.png; with
--write-gate, the thresholds into conf/gate/default.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, demo_sft, spawn, write_results  # noqa: E402
from served_degeneration import UNSEEN  # noqa: E402

SETTINGS = {"demo": [], "demo_small": ["data=demo_small"]}
CHOICE = [
    f"{frame} {s}"
    for frame in ("Honestly,", "What I think about")
    for s in (
        "the airport",
        "this sofa",
        "the swimming pool",
        "my bicycle",
        "the theatre show",
        "this camera",
        "the zoo",
        "our weekend trip",
        "the bakery",
        "this podcast",
        "the bus journey",
        "the library",
        "these boots",
        "the beach",
        "the barber",
    )
]  # fmt: skip  (UNSEEN's two frames, other subjects: the same style, other prompts)
SAMPLES = {"eval": 2, "choice": 8, "unseen": 16}  # per prompt
N = 4  # best-of-n at serving
BEST = "best-of-n at serving"  # the lever of the points served best-of-n: their method names the policy it samples
MIN_WORDS = 0.75  # the choice: a point's answers at least this share of SFT's mean length
MEASURES = ("judge_mean", "reward_mean", "repeated_word_share", "distinct_2", "mean_words", "kl")
# (name, lever, overrides on make run's settings, method)
POINTS = [
    ("default", "default", [], "ppo"),
    ("ptx 0 (plain PPO)", "ptx_coef", ["ppo.ptx_coef=0"], "ppo"),
    ("ptx 0.1", "ptx_coef", ["ppo.ptx_coef=0.1"], "ppo"),
    ("ptx 0.2", "ptx_coef", ["ppo.ptx_coef=0.2"], "ppo"),
    ("ptx 1", "ptx_coef", ["ppo.ptx_coef=1.0"], "ppo"),
    ("target_kl 2", "target_kl", ["ppo.target_kl=2"], "ppo"),
    ("target_kl 3", "target_kl", ["ppo.target_kl=3"], "ppo"),
    ("target_kl 10", "target_kl", ["ppo.target_kl=10"], "ppo"),
    ("steps 20", "steps", ["ppo.steps=20"], "ppo"),
    ("steps 80", "steps", ["ppo.steps=80"], "ppo"),
    ("plain, target_kl 2", "plain PPO, KL target", ["ppo.ptx_coef=0", "ppo.target_kl=2"], "ppo"),
    ("plain, target_kl 3", "plain PPO, KL target", ["ppo.ptx_coef=0", "ppo.target_kl=3"], "ppo"),
    ("plain, target_kl 4", "plain PPO, KL target", ["ppo.ptx_coef=0", "ppo.target_kl=4"], "ppo"),
    ("plain, target_kl 16", "plain PPO, KL target", ["ppo.ptx_coef=0", "ppo.target_kl=16"], "ppo"),
    ("plain, target_kl 3, steps 80", "combined", ["ppo.ptx_coef=0", "ppo.target_kl=3", "ppo.steps=80"], "ppo"),
    ("ptx 0.1, target_kl 3", "combined", ["ppo.ptx_coef=0.1", "ppo.target_kl=3"], "ppo"),
    ("plain, target_kl 2.5", "plain PPO, KL target", ["ppo.ptx_coef=0", "ppo.target_kl=2.5"], "ppo"),
    ("plain, target_kl 2, steps 80", "combined", ["ppo.ptx_coef=0", "ppo.target_kl=2", "ppo.steps=80"], "ppo"),
    ("ptx 1, steps 80", "combined", ["ppo.ptx_coef=1.0", "ppo.steps=80"], "ppo"),
    (
        "plain, target_kl 3, ensemble 3, penalty 0.5",
        "combined",
        ["ppo.ptx_coef=0", "ppo.target_kl=3", "reward.ensemble=3", "ppo.uncertainty_penalty=0.5"],
        "ppo",
    ),
    (
        "ensemble 3, penalty 0.5, steps 80",
        "combined",
        ["reward.ensemble=3", "ppo.uncertainty_penalty=0.5", "ppo.steps=80"],
        "ppo",
    ),
    ("ensemble 3, penalty 0.5", "ensemble", ["reward.ensemble=3", "ppo.uncertainty_penalty=0.5"], "ppo"),
    ("ensemble 3, penalty 1", "ensemble", ["reward.ensemble=3", "ppo.uncertainty_penalty=1.0"], "ppo"),
    ("grpo", "method", [], "grpo"),
    ("rloo", "method", [], "rloo"),
    ("dpo", "method", [], "dpo"),
    (f"best-of-{N}", "best-of-n at serving", [], "default"),  # best-of-n on the policy named last
    (f"plain, target_kl 3, best-of-{N}", "best-of-n at serving", [], "plain, target_kl 3"),
]
# the over-optimisation plot's curves: points of one method along its KL
CURVES = {
    "PPO-ptx 0.5": ["target_kl 2", "target_kl 3", "default", "target_kl 10", "steps 20", "steps 80"],
    "plain PPO": ["plain, target_kl 2", "plain, target_kl 3", "plain, target_kl 4", "ptx 0 (plain PPO)",
                  "plain, target_kl 16"],
}  # fmt: skip


def train(point, cfg, sft: str, rms: dict[int, str], out: Path, seed: int) -> str | None:
    """The point's policy adapter dir (None: the SFT policy itself, sampled best-of-n)."""
    from components.training.direct import train_direct
    from components.training.group_rl import train_group_rl
    from components.training.ppo import train_ppo

    name, _, _, method = point
    rm = rms[cfg.reward.ensemble]
    if method == "ppo":
        return train_ppo(cfg.ppo, cfg.model, sft, rm, cfg.data_path, out, seed).policy_dir
    if method in ("grpo", "rloo"):
        policy = getattr(cfg.policy, method)
        return train_group_rl(method, policy, cfg.ppo, cfg.model, sft, rm, cfg.data_path, out, seed).policy_dir
    if method == "dpo":
        return train_direct(
            "dpo", cfg.policy.dpo, cfg.ppo, cfg.model, sft, rm, cfg.data_path, out, cfg.reward.eval_fraction, seed,
            cfg.data,
        ).policy_dir  # fmt: skip
    raise ValueError(name)


def served_best_of_n(sft: str, adapter: str, rm: str, prompts: list[str], gate, path: Path) -> list[str]:
    """The served model (mlflow pyfunc: base, adapter and reward model, as registered) answering with n=N."""
    import mlflow

    from components.registry.policy_model import Limits
    from components.registry.registry import POLICY_MODEL_FILE, model_signature, policy_artifacts

    if not path.is_dir():
        with policy_artifacts(sft, adapter, rm) as artifacts:
            mlflow.pyfunc.save_model(str(path), python_model=str(POLICY_MODEL_FILE), artifacts=artifacts,
                                     signature=model_signature(with_score=True), model_config=Limits().as_config())  # fmt: skip
    model = mlflow.pyfunc.load_model(str(path))
    params = {"max_new_tokens": gate.max_new_tokens, "temperature": gate.temperature, "top_p": 1.0, "n": N}
    out: list[str] = []
    for i in range(0, len(prompts), 16):  # the served model's max_prompts
        out.extend(model.predict(prompts[i : i + 16], params={**params, "seed": gate.seed + i})["response"])
    return out


def one(setting: str, seed: int, work: Path, only: list[str] | None = None) -> dict:
    """One setting and seed: every point (or those named in `only`, with SFT) trained and measured."""
    from selection import score_texts

    from components.config import compose
    from components.data.readers import read_prompts
    from components.evaluation.degeneration import degeneration
    from components.evaluation.evaluate import PolicySpec, evaluate_policies
    from components.evaluation.judges import sentiment
    from components.training.reward import train_reward

    root = work / setting
    base_cfg, sft = demo_sft(root, seed, SETTINGS[setting])  # `make run`'s settings (with the setting's data)
    out = root / f"seed{seed}"
    rms, seconds = {}, {}
    for k in (1, 3):
        t0 = time.perf_counter()
        rm_cfg = replace(base_cfg.reward, ensemble=k)
        rms[k] = train_reward(
            rm_cfg, base_cfg.model, sft, base_cfg.data_path, out / f"rm{k}", seed, base_cfg.data
        ).head_dir
        seconds[f"reward ensemble {k}"] = time.perf_counter() - t0
    specs = [PolicySpec("sft", sft)]
    points = [p for p in POINTS if only is None or p[0] in only]
    for point in points:
        name, _, overrides, _ = point
        if point[1] == BEST:
            continue
        cfg = compose([f"root={root}", f"seed={seed}", *SETTINGS[setting], *overrides])
        t0 = time.perf_counter()
        specs.append(PolicySpec(name, sft, train(point, cfg, sft, rms, out / name.replace(" ", "_"), seed)))
        seconds[name] = time.perf_counter() - t0
        print(f"  {setting} seed {seed}: {name} trained in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    served = replace(base_cfg.gate, max_new_tokens=48, temperature=0.7, seed=seed)
    eval_prompts = read_prompts(base_cfg.data_path, "eval")
    sets = {"eval": eval_prompts, "choice": CHOICE, "unseen": UNSEEN}
    rows: dict[str, dict] = {}
    for set_name, prompts in sets.items():
        gate = replace(served, samples_per_prompt=SAMPLES[set_name], max_prompts=max(len(prompts), served.max_prompts))
        evals = evaluate_policies(specs, sft, rms[1], prompts, gate, base_cfg.model)
        rows[set_name] = {p: {m: e.metrics[m] for m in MEASURES} for p, e in evals.items()}
        # best-of-n through the served model (mlflow pyfunc), ranked by its reward model
        repeated = [p for p in prompts for _ in range(SAMPLES[set_name])]
        for name, _, _, policy in (p for p in points if p[1] == BEST and any(s.name == p[3] for s in specs)):
            adapter = next(s.adapter_dir for s in specs if s.name == policy)
            bo = served_best_of_n(sft, adapter, rms[1], repeated, served, out / f"serve-{policy.replace(' ', '_')}")
            (reward,) = score_texts(sft, rms[1], repeated, {"bo": bo}, base_cfg).values()
            rows[set_name][name] = {
                "judge_mean": statistics.mean(sentiment(repeated, bo)),
                "reward_mean": reward,
                **{m: degeneration(bo)[m] for m in ("repeated_word_share", "distinct_2", "mean_words")},
                "kl": rows[set_name][policy]["kl"] + math.log(N) - (N - 1) / N,  # the bound
            }
        print(f"  {setting} seed {seed}: {set_name} prompts measured", file=sys.stderr, flush=True)
    # SFT at the gate's own sampling, two sampling seeds: the spread the gate's thresholds are set from
    gate_sft = []
    for sampling_seed in (base_cfg.gate.seed, base_cfg.gate.seed + 1):
        g = replace(base_cfg.gate, seed=sampling_seed + 1000 * seed)
        (e,) = evaluate_policies([specs[0]], sft, rms[1], eval_prompts, g, base_cfg.model).values()
        gate_sft.append({m: e.metrics[m] for m in ("repeated_word_share", "distinct_2", "mean_words")})
    n_eval = len(eval_prompts[: base_cfg.gate.max_prompts]) * SAMPLES["eval"]
    return {"setting": setting, "seed": seed, "rows": rows, "seconds": seconds, "gate_sft": gate_sft, "n_eval": n_eval}


def mean_of(runs: list[dict], set_name: str, policy: str, m: str) -> float:
    return statistics.mean(r["rows"][set_name][policy][m] for r in runs)


def pooled(runs: list[dict], policy: str, m: str) -> list[float]:
    """The `eval`-side measure per seed: the demo's eval prompts and CHOICE, weighted by their answers."""
    n_choice = len(CHOICE) * SAMPLES["choice"]
    out = []
    for r in runs:
        n_eval = r["n_eval"]
        a, b = r["rows"]["eval"][policy][m], r["rows"]["choice"][policy][m]
        out.append((a * n_eval + b * n_choice) / (n_eval + n_choice))
    return out


def present(runs: list[dict], names: list[str]) -> list[str]:
    """The points every run measured (a point added later may be missing from older runs)."""
    return [p for p in names if all(p in r["rows"]["unseen"] for r in runs)]


def choose(runs: list[dict]) -> tuple[str, list[str]]:
    """The issue's rule on the eval side (the demo's eval prompts and CHOICE, pooled per seed): the highest mean judge
    among the trained points whose repeated-word share is at most SFT's on every seed and whose answers keep at least
    MIN_WORDS of SFT's length on every seed (no collapse into short answers) -> (the point, why each better-judged
    point was passed over)."""
    trained = present(runs, [p[0] for p in POINTS if p[1] != BEST])
    ranked = sorted(trained, key=lambda p: -statistics.mean(pooled(runs, p, "judge_mean")))
    sft_rep, sft_words = pooled(runs, "sft", "repeated_word_share"), pooled(runs, "sft", "mean_words")
    passed = []
    for p in ranked:
        rep, words = pooled(runs, p, "repeated_word_share"), pooled(runs, p, "mean_words")
        over = [r["seed"] for r, a, b in zip(runs, rep, sft_rep, strict=True) if a > b]
        short = [r["seed"] for r, a, b in zip(runs, words, sft_words, strict=True) if a < MIN_WORDS * b]
        if not over and not short:
            return p, passed
        why = [f"repeats more than SFT on seed(s) {', '.join(map(str, over))}"] if over else []
        why += (
            [f"answers under {MIN_WORDS:.0%} of SFT's length on seed(s) {', '.join(map(str, short))}"] if short else []
        )
        passed.append(f"{p}: {' and '.join(why)}")
    return "sft", passed


def gate_thresholds(runs: list[dict]) -> dict:
    """The degeneration guard from SFT's spread at the gate's sampling (every training x sampling seed): a candidate
    may repeat words more than its SFT by at most 3 standard deviations of SFT's share, and keep distinct-2 at least
    1 - 3 coefficients of variation of SFT's; rounded outwards to 0.01."""
    rep = [g["repeated_word_share"] for r in runs for g in r["gate_sft"]]
    d2 = [g["distinct_2"] for r in runs for g in r["gate_sft"]]
    return {
        "sft_repeated_word_share": {"mean": statistics.mean(rep), "std": statistics.stdev(rep), "n": len(rep)},
        "sft_distinct_2": {"mean": statistics.mean(d2), "std": statistics.stdev(d2), "n": len(d2)},
        "max_repeated_word_gain": math.ceil(300 * statistics.stdev(rep)) / 100,
        "min_distinct_2_ratio": math.floor(100 * (1 - 3 * statistics.stdev(d2) / statistics.mean(d2))) / 100,
    }


def table(runs: list[dict], setting: str, chosen: str | None) -> list[str]:
    lines = [
        f"\n### {setting} ({len(runs)} seeds): unseen prompts (reported), and the eval side (chosen on)\n",
        "| point | lever | judge, unseen | RM reward, unseen | repeated word, unseen | distinct-2, unseen | words, "
        "unseen | KL to SFT, unseen | judge, eval side | repeated word, CHOICE | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    levers = {p[0]: p[1] for p in POINTS}
    for p in present(runs, ["sft", *(p[0] for p in POINTS)]):
        u = {m: mean_of(runs, "unseen", p, m) for m in MEASURES}
        secs = [r["seconds"].get(p) for r in runs if r["seconds"].get(p)]
        mark = " **(the rule's choice)**" if p == chosen else ""
        kl = ("≤ " if levers.get(p) == BEST else "") + f"{u['kl']:.1f}"
        lines.append(
            f"| {p}{mark} | {levers.get(p, '-')} | {u['judge_mean']:.3f} | {u['reward_mean']:.3f} | "
            f"{u['repeated_word_share']:.3f} | {u['distinct_2']:.3f} | {u['mean_words']:.1f} | {kl} | "
            f"{statistics.mean(pooled(runs, p, 'judge_mean')):.3f} | "
            f"{mean_of(runs, 'choice', p, 'repeated_word_share'):.3f} | "
            f"{f'{statistics.mean(secs):.0f}' if secs else '-'} |"
        )
    return lines


def plots(results: list[dict], chosen: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in results}, key=list(SETTINGS).index)
    levers = list(dict.fromkeys(p[1] for p in POINTS))
    colours = dict(zip(levers, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        runs = [r for r in results if r["setting"] == setting]
        sft_rep = mean_of(runs, "unseen", "sft", "repeated_word_share")
        ax.axvline(sft_rep, color="grey", ls=":", label="SFT's repeated-word share")
        ax.scatter([sft_rep], [mean_of(runs, "unseen", "sft", "judge_mean")], color="grey", marker="s", label="SFT")
        for name, lever, _, _ in POINTS:
            if not present(runs, [name]):
                continue
            x, y = mean_of(runs, "unseen", name, "repeated_word_share"), mean_of(runs, "unseen", name, "judge_mean")
            ax.scatter([x], [y], color=colours[lever], s=40, label=lever)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if name in (chosen, "default"):  # the rule's choice, and `make run`'s settings today
                ax.scatter([x], [y], marker="*" if name == chosen else "D", s=260 if name == chosen else 90,
                           facecolor="none", edgecolor="black", zorder=5,
                           label="the rule's choice" if name == chosen else "make run today")  # fmt: skip
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
        ax.set(xlabel="repeated-word share, unseen prompts", ylabel="judge, unseen prompts",
               title=f"{setting}: judge against degeneration ({len(runs)} seeds; ★ the rule's choice)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(RESULTS / "frontier.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        runs = [r for r in results if r["setting"] == setting]

        def xy(p: str, m: str, runs: list[dict] = runs) -> tuple[float, float]:
            return math.sqrt(max(0.0, mean_of(runs, "unseen", p, "kl"))), mean_of(runs, "unseen", p, m)

        for curve, points in CURVES.items():
            ordered = sorted(present(runs, ["sft", *points]), key=lambda p: xy(p, "kl")[0])
            for m, ls in (("reward_mean", "-"), ("judge_mean", "--")):
                xs, ys = zip(*(xy(p, m) for p in ordered), strict=True)
                ax.plot(xs, ys, ls, marker="o", label=f"{curve}: {'RM reward' if m == 'reward_mean' else 'judge'}")
        for p in present(runs, ["grpo", "rloo", "dpo", *(p[0] for p in POINTS if p[1] == BEST)]):
            for m, marker in (("reward_mean", "^"), ("judge_mean", "v")):
                x, y = xy(p, m)
                ax.scatter([x], [y], marker=marker, label=f"{p}: {'RM reward' if m == 'reward_mean' else 'judge'}")
        for m in ("reward_mean", "judge_mean"):
            ax.scatter(*xy(chosen, m), marker="*", s=260, color="gold", edgecolor="black", zorder=5)
            ax.scatter(*xy("default", m), marker="D", s=90, facecolor="none", edgecolor="black", zorder=5)
        ax.set(xlabel="sqrt(KL to SFT), unseen prompts", ylabel="score (RM: std units; judge: sentiment)",
               title=f"{setting}: the proxy (RM) against the judge along KL (★ the rule's choice, ◇ make run today)")  # fmt: skip
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(RESULTS / "frontier_overoptimisation.png", dpi=110)
    plt.close(fig)


def write_gate(thresholds: dict) -> None:
    """The guard's thresholds into conf/gate/default.yaml (computed once here, never per retrain; the other gate
    options start from it)."""
    path = REPO / "conf" / "gate" / "default.yaml"
    lines = [line for line in path.read_text().splitlines() if not line.startswith(("max_repeated_word_gain",
             "min_distinct_2_ratio", "# degeneration guard", "# docs/training.md): repeated"))]  # fmt: skip
    r, d = thresholds["sft_repeated_word_share"], thresholds["sft_distinct_2"]
    lines += [
        f"# degeneration guard, from SFT's spread at the gate's sampling over {r['n']} training x sampling seeds "
        "(benchmarks/frontier.py --write-gate;",
        f"# docs/training.md): repeated-word share {r['mean']:.4f} ± {r['std']:.4f}, distinct-2 {d['mean']:.4f} ± "
        f"{d['std']:.4f}; 3 standard deviations",
        f"max_repeated_word_gain: {thresholds['max_repeated_word_gain']}",
        f"min_distinct_2_ratio: {thresholds['min_distinct_2_ratio']}",
    ]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--write-gate", action="store_true", help="write the guard's thresholds into conf/gate")
    ap.add_argument("--from-json", action="store_true", help="redo the tables and plots from frontier.json")
    ap.add_argument("--points", nargs="+", help="only these points (and SFT), merged into --name's runs")
    ap.add_argument("--name", default="frontier", help="with --points: the results file to merge into")
    ap.add_argument("--one", nargs=3, metavar=("SETTING", "SEED", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        setting, seed, work = args.one
        print("RESULT " + json.dumps(one(setting, int(seed), Path(work), args.points)))
        return
    if args.from_json:
        results = json.loads((RESULTS / "frontier.json").read_text())["runs"]
    elif args.points:  # more points for runs already measured: the same seed gives the same SFT policy (checked)
        with tempfile.TemporaryDirectory(prefix="rlhf-frontier-") as tmp:
            for setting in args.settings:
                for seed in args.seeds:
                    started = time.perf_counter()
                    new = spawn(__file__, ["--one", setting, str(seed), tmp, "--points", *args.points])
                    results = json.loads((RESULTS / f"{args.name}.json").read_text())["runs"]
                    (old,) = [r for r in results if (r["setting"], r["seed"]) == (setting, seed)]
                    assert new["rows"]["unseen"]["sft"] == old["rows"]["unseen"]["sft"], "not the same SFT policy"
                    for set_name, rows in new["rows"].items():
                        old["rows"][set_name].update(rows)
                    old["seconds"].update(new["seconds"])
                    print(f"{setting} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                    write_results(args.name, {"seeds": args.seeds, "runs": results})
        print(f"merged into benchmarks/results/{args.name}.json: `--from-json` redoes the tables and plots")
        return
    else:
        results = []
        with tempfile.TemporaryDirectory(prefix="rlhf-frontier-") as tmp:
            for setting in args.settings:
                for seed in args.seeds:
                    started = time.perf_counter()
                    results.append(spawn(__file__, ["--one", setting, str(seed), tmp]))
                    print(f"{setting} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                    write_results("frontier", {"seeds": args.seeds, "runs": results})  # kept as it goes
    demo = [r for r in results if r["setting"] == "demo"]
    chosen, passed = choose(demo)
    thresholds = gate_thresholds(demo)
    overrides = next(p[2] for p in POINTS if p[0] == chosen) if chosen != "sft" else []
    lines = [
        "# The learning frontier (benchmarks/frontier.py)\n",
        "Means over seeds; `make run`'s settings with each point's overrides. Served sampling (temperature 0.7, 48 new "
        f"tokens). Unseen: {len(UNSEEN)} frozen prompts x {SAMPLES['unseen']} samples, never looked at by the choice. "
        f"Eval side: the demo's eval prompts x {SAMPLES['eval']} and CHOICE ({len(CHOICE)} prompts x "
        f"{SAMPLES['choice']}). RM reward: `make run`'s reward model (std units). best-of-{N} rows: that policy "
        f"served with n={N}; its KL is the bound. default: `make run`'s settings (ppo.ptx_coef 0.5, target_kl 6, 40 "
        "steps). train s: wall seconds of the policy stage on 2 cores (demo_small seeds 0 and 1 shared the cores with "
        "another run: slower).\n",
        f"**The rule's choice** (`choose`, on the demo's eval side): `{chosen}` ({' '.join(overrides) or 'the settings before'})."
        + ("" if not passed else " Passed over, with a better eval-side judge: " + "; ".join(passed) + "."),
        "",
        f"**The guard** (SFT at the gate's sampling, {thresholds['sft_repeated_word_share']['n']} training x sampling "
        f"seeds): max_repeated_word_gain {thresholds['max_repeated_word_gain']}, min_distinct_2_ratio "
        f"{thresholds['min_distinct_2_ratio']}.",
    ]
    for setting in SETTINGS:
        runs = [r for r in results if r["setting"] == setting]
        if runs:
            lines += table(runs, setting, chosen)
    lines += ["", "![frontier](frontier.png)", "", "![over-optimisation](frontier_overoptimisation.png)"]
    per_seed = {
        p: {str(r["seed"]): {k: r["rows"]["unseen"][p][k] for k in ("judge_mean", "repeated_word_share")} for r in demo}
        for p in ("sft", chosen)
    }
    (RESULTS / "frontier.md").write_text("\n".join(lines) + "\n")
    write_results(
        "frontier",
        {"seeds": args.seeds, "chosen": chosen, "chosen_overrides": overrides, "passed_over": passed,
         "gate": thresholds, "chosen_unseen_per_seed": per_seed, "runs": results},
    )  # fmt: skip
    plots(results, chosen)
    if args.write_gate:
        write_gate(thresholds)
    print("\n".join(lines))
    print("wrote benchmarks/results/frontier.json, frontier.md, frontier.png, frontier_overoptimisation.png")


if __name__ == "__main__":
    main()
