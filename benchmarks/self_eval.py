"""The self-evaluation reward on the demo: does the tiny model's P(" yes") judge responses, and can PPO learn
from it alone?

    .venv/bin/python benchmarks/self_eval.py [--seed 0] [--steps 40]

1. Judgement. 400 fresh responses (another generator seed: not the feedback rows the base pretrained on) with
   the simulated annotator's thumbs: the AUC of the self-evaluation probability against the thumbs, and its
   correlation with the lexicon sentiment (the independent judge) and with fluency (which the annotator also
   rewards), for judge = the demo base and judge = the SFT model (`reference`).
2. Learning. PPO with the self-evaluation reward only (`ppo.use_reward_model=false`, `ppo.value_init=fresh`,
   `ppo.reward_fn=components.training.self_eval:SelfEvalReward`), then the held-out eval prompts: its reward
   (the self-evaluation), the independent judge, a reward model's score (trained on the comparisons, for
   reference) and the KL to the SFT policy, against the SFT policy and against PPO on the reward model.

Writes benchmarks/results/self_eval.json and .md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, write_results  # noqa: E402


def correlation(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt())).item()


def judgement(dirs: dict[str, str], cfg) -> dict[str, dict[str, float]]:
    import torch

    from components.data.demo import DemoGenerator, lexicon_sentiment
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.training.reward import binary_auc
    from components.training.self_eval import SelfEvalReward

    gen = DemoGenerator(replace(cfg.data, seed=cfg.data.seed + 999))
    rng = random.Random(0)
    pool = gen.all_prompts()
    rows = [(p, gen.response(dom)) for p, dom in (rng.choice(pool) for _ in range(400))]
    labels = torch.tensor([gen.thumbs(r) for _, r in rows])
    sentiment = torch.tensor([lexicon_sentiment(r.text) for _, r in rows])
    fluent = torch.tensor([float(r.fluent) for _, r in rows])
    out = {}
    for name, d in dirs.items():
        model = load_causal_lm(d, cfg.model).eval()
        tok = load_tokenizer(d, cfg.model, padding_side="left")
        p = torch.tensor(SelfEvalReward(cfg.ppo.self_eval, model, tok)([q for q, _ in rows], [r.text for _, r in rows]))
        out[name] = {
            "auc_vs_thumbs": binary_auc(p, labels),
            "corr_sentiment": correlation(p, sentiment),
            "corr_fluency": correlation(p, fluent),
            "mean_p_yes": p.mean().item(),
        }
        print(name, out[name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from components.config import compose
    from components.data.demo import write_demo
    from components.data.readers import read_prompts
    from components.evaluation.evaluate import PolicySpec, evaluate_policies
    from components.models.demo_base import build_demo_base
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    with tempfile.TemporaryDirectory(prefix="rlhf-self-eval-") as tmp:
        work = Path(tmp)
        cfg = compose([f"root={work}", f"seed={args.seed}", f"ppo.steps={args.steps}"])
        write_demo(cfg.data, cfg.data_path)
        base = build_demo_base(cfg.model, cfg.data_path, "bench", work / "models")
        sft = train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, work / "sft", seed=args.seed)
        judged = judgement({"demo base": base.path, "SFT (reference)": sft.merged_dir}, cfg)
        rm = train_reward(cfg.reward, cfg.model, sft.merged_dir, cfg.data_path, work / "rm", args.seed, cfg.data)
        self_cfg = replace(
            cfg.ppo,
            reward_fn="components.training.self_eval:SelfEvalReward",
            use_reward_model=False,
            value_init="fresh",
        )
        started = time.perf_counter()
        on_self = train_ppo(self_cfg, cfg.model, sft.merged_dir, None, cfg.data_path, work / "ppo-self", args.seed)
        self_seconds = time.perf_counter() - started
        on_rm = train_ppo(cfg.ppo, cfg.model, sft.merged_dir, rm.head_dir, cfg.data_path, work / "ppo-rm", args.seed)
        specs = [
            PolicySpec("sft", sft.merged_dir),
            PolicySpec("ppo on self-eval", sft.merged_dir, on_self.policy_dir),
            PolicySpec("ppo on RM", sft.merged_dir, on_rm.policy_dir),
        ]
        prompts = read_prompts(cfg.data_path, "eval")
        evals = evaluate_policies(specs, sft.merged_dir, rm.head_dir, prompts, cfg.gate, cfg.model)
        import torch

        from components.models.loading import load_causal_lm, load_tokenizer
        from components.training.self_eval import SelfEvalReward

        judge = SelfEvalReward(
            cfg.ppo.self_eval,
            load_causal_lm(sft.merged_dir, cfg.model).eval(),
            load_tokenizer(sft.merged_dir, cfg.model, padding_side="left"),
        )
        learning = {}
        for name, e in evals.items():
            learning[name] = {
                "self_eval": float(torch.tensor(judge(e.prompts, e.responses)).mean()),
                "judge": e.metrics["judge_mean"],
                "rm_reward": e.metrics["reward_mean"],
                "kl": e.metrics["kl"],
            }
        learning["ppo on self-eval"]["seconds"] = on_self.metrics["ppo/train_seconds"]
        learning["ppo on RM"]["seconds"] = on_rm.metrics["ppo/train_seconds"]
        curve = [round(h["ppo/reward_mean"], 3) for h in on_self.history[::5]]  # the self-eval score optimised

    md = [
        "# The self-evaluation reward on the demo (benchmarks/self_eval.py)\n",
        f"Seed {args.seed}; tiny demo model (2 layers, hidden 64, {cfg.model.pretrain_steps} pretraining steps).\n",
        '## Does P(" yes") judge? (400 unseen responses, the annotator\'s thumbs)\n',
        "| judge | AUC vs thumbs | corr. with sentiment (judge) | corr. with fluency | mean P(yes) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {m['auc_vs_thumbs']:.3f} | {m['corr_sentiment']:.3f} | {m['corr_fluency']:.3f} | {m['mean_p_yes']:.3f} |"
        for n, m in judged.items()
    ]
    md += [
        f"\n## PPO on it ({args.steps} iterations x {cfg.ppo.batch_size}; held-out eval prompts)\n",
        "| policy | self-eval reward | judge | RM reward (for reference) | KL to SFT | PPO s |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {m['self_eval']:.3f} | {m['judge']:.3f} | {m['rm_reward']:.3f} | {m['kl']:.2f} | "
        f"{m.get('seconds', float('nan')):.1f} |"
        for n, m in learning.items()
    ]
    md.append(f"\nself-eval reward optimised (batch mean, minus the missing-EOS penalty), every 5 iterations: {curve}")
    text = "\n".join(md) + "\n"
    print(text)
    write_results(
        "self_eval",
        {
            "seed": args.seed,
            "judgement": judged,
            "learning": learning,
            "curve": curve,
            "ppo_self_seconds": self_seconds,
        },
    )
    (RESULTS / "self_eval.md").write_text(text)
    print(f"wrote {(RESULTS / 'self_eval.md').relative_to(REPO)}")


if __name__ == "__main__":
    main()
