"""PPO benchmarks: per-phase time and tokens/s (model=tiny, model=small), and peak memory of the
shared-base design versus separate model copies for policy, reference, value and reward (model=small).

    .venv/bin/python benchmarks/ppo_bench.py [--models tiny small] [--iterations 6] [--memory-model small]

Every measurement runs in its own process. Memory: peak RSS on CPU (minus the runtime baseline
measured before any model is loaded), torch.cuda.max_memory_allocated on a GPU. Separate copies
run the same iteration (generate, score with reference/value/reward, one PPO update of policy and
value) with four models in memory: `separate-lora` (same LoRA adapters, four base copies) and
`separate-full` (full fine-tuning of policy and value, as full-model PPO does).
Writes benchmarks/results/ppo_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, memory, rss_mb, spawn, write_results  # noqa: E402


def prepare(model: str, work: Path):
    """Base (briefly pretrained), SFT and RM for `model`: timing needs the shapes, not good weights."""
    from components.config import compose
    from components.data.demo import write_demo
    from components.models.demo_base import build_demo_base
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    cfg = compose(
        [
            f"root={work}",
            f"model={model}",
            "model.pretrain_steps=20",
            "sft.max_steps=10",
            "sft.save_steps=10",
            "reward.max_steps=10",
            "reward.save_steps=10",
            "ppo.eval_max_prompts=0",
            "ppo.save_every=1000",
        ]
    )
    if not cfg.data_path.is_dir():
        write_demo(cfg.data, cfg.data_path)
    base = build_demo_base(cfg.model, cfg.data_path, "bench", work / "models")
    sft_dir, rm_dir = work / f"ppo-sft-{model}", work / f"ppo-rm-{model}"
    if not (sft_dir / "merged").is_dir():
        train_sft(cfg.sft, cfg.model, base.path, cfg.data_path, sft_dir)
    if not (rm_dir / "head.json").is_file():
        train_reward(cfg.reward, cfg.model, str(sft_dir / "merged"), cfg.data_path, rm_dir)
    return cfg, str(sft_dir / "merged"), str(rm_dir)


def run_shared(cfg, sft_dir: str, rm_dir: str, iterations: int, work: Path) -> dict:
    from dataclasses import replace

    from components.training.ppo import train_ppo

    r = train_ppo(replace(cfg.ppo, steps=iterations), cfg.model, sft_dir, rm_dir, cfg.data_path, work / "ppo-run")
    steady = r.history[1:] or r.history  # the first iteration includes one-off warm-up
    mean = lambda k: sum(h[k] for h in steady) / len(steady)  # noqa: E731
    return {
        "iterations": iterations,
        "batch_size": cfg.ppo.batch_size,
        "max_new_tokens": cfg.ppo.max_new_tokens,
        "time_generate": mean("ppo/time_generate"),
        "time_score": mean("ppo/time_score"),
        "time_train": mean("ppo/time_train"),
        "tokens_per_second": mean("ppo/tokens_per_second"),
        "generate_tokens_per_second": mean("ppo/generate_tokens_per_second"),
        "response_length": mean("ppo/response_length"),
    }


def one_iteration(p, tok, prompts, policy, policy_logits, reference_logits, reward_scores, value_fwd, params) -> None:
    """The memory-relevant work of one PPO iteration for the separate-model designs (the shared design runs the
    training loop's own functions, `run_shared_iteration`): sample, score with reference / reward / value, then
    one epoch of minibatch updates of policy and value."""
    import torch

    from components.models.generation import sample

    opt = torch.optim.AdamW(params, lr=p.learning_rate)
    ro = sample(policy, tok, prompts, p.max_new_tokens, p.temperature, p.top_p, p.max_prompt_tokens)
    seq, mask, q = ro.sequence, ro.sequence_mask, ro.query.shape[1]
    with torch.no_grad():
        policy_logits(seq, mask), reference_logits(seq, mask), reward_scores(seq, mask), value_fwd(seq, mask)
    for mb in torch.arange(len(prompts)).split(p.minibatch_size):
        logits = policy_logits(seq[mb], mask[mb])[:, q - 1 : -1]
        v = value_fwd(seq[mb], mask[mb])[:, q - 1 : -1]
        loss = torch.log_softmax(logits, -1).mean() + v.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_shared_iteration(cfg, sft_dir: str, rm_dir: str) -> dict:
    """One iteration with the shared design (one base; adapters policy/value/reward; reference = adapters off),
    through the PPO stage's own functions: sample, `score_rollout`, one epoch of `ppo_update`."""
    from dataclasses import replace

    import torch

    from components.data.readers import read_prompts
    from components.models.generation import sample
    from components.models.loading import resolve_device
    from components.training.ppo import build_roles, ppo_update, score_rollout
    from components.training.ppo_math import RunningMoments

    p = replace(cfg.ppo, ppo_epochs=1, max_approx_kl=None)  # one full epoch, as the separate designs run
    roles = build_roles(p, cfg.model, sft_dir, rm_dir, resolve_device(cfg.model.device))
    params = [x for x in roles.model.parameters() if x.requires_grad] + list(roles.value_head.parameters())
    opt = torch.optim.AdamW(params, lr=p.learning_rate)
    prompts = read_prompts(cfg.data_path, "prompts")[: p.batch_size]
    ro = sample(roles.model, roles.tok, prompts, p.max_new_tokens, p.temperature, p.top_p, p.max_prompt_tokens)
    traj = score_rollout(roles, ro, prompts, p, p.init_kl_coef, RunningMoments())
    ppo_update(roles, traj, opt, params, p, generator=torch.Generator().manual_seed(0))
    return {"copies": 1, "trainable_params": sum(x.numel() for x in params)}


def run_separate(cfg, sft_dir: str, rm_dir: str, full: bool) -> dict:
    """One PPO iteration's work with four separate models in memory."""
    from peft import PeftModel, get_peft_model

    from components.data.readers import read_prompts
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import ScalarHead, hidden_states, lora_config, position_ids, sequence_scores

    p = cfg.ppo
    tok = load_tokenizer(sft_dir, cfg.model, padding_side="left")
    lora = lora_config(p.lora)  # the shared design's LoRA settings
    policy = load_causal_lm(sft_dir, cfg.model)
    value = load_causal_lm(sft_dir, cfg.model)
    if not full:
        policy, value = get_peft_model(policy, lora), get_peft_model(value, lora)
    reference = load_causal_lm(sft_dir, cfg.model).requires_grad_(False)
    reward = PeftModel.from_pretrained(
        load_causal_lm(sft_dir, cfg.model), str(Path(rm_dir) / "adapter")
    ).requires_grad_(False)
    reward_head, _ = ScalarHead.load(Path(rm_dir))
    value_head = ScalarHead(policy.config.hidden_size)
    params = [x for m in (policy, value, value_head) for x in m.parameters() if x.requires_grad]
    one_iteration(
        p,
        tok,
        read_prompts(cfg.data_path, "prompts")[: p.batch_size],
        policy,
        lambda seq, mask: policy(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits,
        lambda seq, mask: reference(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits,
        lambda seq, mask: sequence_scores(reward, reward_head, seq, mask),
        lambda seq, mask: value_head(hidden_states(value, seq, mask)),
        params,
    )
    return {"copies": 4, "trainable_params": sum(x.numel() for x in params)}


def one(kind: str, model: str, iterations: int, work: Path) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    import peft  # noqa: F401  (the runtime is part of the baseline, not of the measurement)
    import torch
    import transformers  # noqa: F401

    cfg, sft_dir, rm_dir = prepare(model, work)  # built by an earlier process: here it only finds the cached outputs
    baseline = rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if kind == "shared":
        out = run_shared(cfg, sft_dir, rm_dir, iterations, work)
    elif kind == "shared-iteration":
        out = run_shared_iteration(cfg, sft_dir, rm_dir)
    else:
        out = run_separate(cfg, sft_dir, rm_dir, full=kind == "separate-full")
    out.update(kind=kind, model=model, seconds=time.perf_counter() - t, **memory(baseline))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--memory-model", default="small")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rlhf-ppo-bench-"))
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, args.iterations, work)))
        return

    for model in sorted(set(args.models) | {args.memory_model}):  # build inputs once, outside the measurements
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                f"sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from ppo_bench import prepare; from pathlib import Path; prepare({model!r}, Path({str(work)!r}))",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
    speed = []
    for model in args.models:
        r = spawn(__file__, ["--one", "shared", model, "--iterations", str(args.iterations), "--work", str(work)])
        speed.append(r)
        print(
            f"{model:>6} PPO iteration (batch {r['batch_size']}, <= {r['max_new_tokens']} new tokens): "
            f"generate {r['time_generate']:.2f} s, score {r['time_score']:.2f} s, train {r['time_train']:.2f} s; "
            f"{r['tokens_per_second']:,.0f} tokens/s overall, {r['generate_tokens_per_second']:,.0f} generated tokens/s",
            flush=True,
        )
    memory = {
        kind: spawn(__file__, ["--one", kind, args.memory_model, "--iterations", "2", "--work", str(work)])
        for kind in ("shared-iteration", "separate-lora", "separate-full")
    }
    key = "cuda_peak_mb" if "cuda_peak_mb" in memory["shared-iteration"] else "peak_over_baseline_mb"
    for kind, r in memory.items():
        print(
            f"{args.memory_model:>6} {kind:>16}: peak {r[key]:,.0f} MB ({key}), "
            f"x{r[key] / memory['shared-iteration'][key]:.2f} of shared",
            flush=True,
        )
    write_results(
        "ppo_bench",
        {
            "speed": speed,
            "memory": memory,
            "memory_metric": key,
            "memory_ratio_separate_lora": memory["separate-lora"][key] / memory["shared-iteration"][key],
            "memory_ratio_separate_full": memory["separate-full"][key] / memory["shared-iteration"][key],
        },
    )


if __name__ == "__main__":
    main()
