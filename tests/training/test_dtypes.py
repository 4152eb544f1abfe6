"""Every stage in half precision (`model.dtype=bfloat16` and `float16`) on CPU: the demo's SFT model (session
fixtures `stages`, `reward`, trained in fp32) loaded in the half dtype, each stage run for a few steps. What must
hold in each: it completes with finite numbers; the heads (reward, value) and every RL quantity (log-probs, KL,
values, advantages, scores) are fp32 while the base runs in the half dtype; a half-precision base is never merged
into (a bf16 merge/unmerge cycle moves the frozen reference); and the half-precision numbers agree with fp32's
within the half dtype's rounding. A bf16 model registers, loads in bf16 and serves best-of-n.

The architecture matrix in bf16 is tests/models/test_families.py; the whole `rlhf run model.dtype=bfloat16` is
tests/flows/test_crash_resume.py (killed mid-PPO, resumed, registered and served in bf16)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from components import tracking
from components.config import compose
from components.data.readers import read_prompts
from components.models.generation import sample
from components.models.loading import DTYPES
from components.models.roles import lora_merged

HALF = ("bfloat16", "float16")
SMALL_PPO = (
    "ppo.steps=2",
    "ppo.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.eval_max_prompts=8",
    "ppo.sample_every=0",
    "ppo.max_new_tokens=12",
)


def cfg_in(stages, dtype: str, *overrides: str):
    return compose([f"root={stages.root}", "model.device=cpu", f"model.dtype={dtype}", *SMALL_PPO, *overrides])


def finite(metrics: dict, keys=None) -> bool:
    return all(math.isfinite(v) for k, v in metrics.items() if keys is None or k in keys)


@pytest.mark.parametrize("dtype", HALF)
def test_sft_trains_and_writes_its_merged_model_in_the_dtype(stages, dtype, tmp_path):
    from components.training.sft import train_sft

    cfg = cfg_in(stages, dtype, "sft.max_steps=4", "sft.batch_size=4", "sft.save_steps=100")
    sft = train_sft(cfg.sft, cfg.model, stages.base_dir, cfg.data_path, tmp_path / "sft", seed=0)
    m = sft.metrics
    assert finite(m, {"sft/eval_loss", "sft/eval_loss_base", "sft/train_loss"}), m
    assert m["sft/eval_loss"] < m["sft/eval_loss_base"], m  # it learned, in half precision
    weights = load_file(str(Path(sft.merged_dir) / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {DTYPES[dtype]}
    adapter = load_file(str(Path(sft.adapter_dir) / "adapter_model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in adapter.values())


@pytest.mark.parametrize("dtype", HALF)
def test_reward_model_trains_with_an_fp32_head_and_scores_like_fp32(stages, reward, dtype, tmp_path):
    from peft import PeftModel

    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import ScalarHead
    from components.training.reward import score_texts, train_reward

    cfg = cfg_in(stages, dtype, "reward.max_steps=4", "reward.batch_size=4", "reward.stats_max_responses=16")
    rm = train_reward(cfg.reward, cfg.model, stages.sft_dir, cfg.data_path, tmp_path / "rm", seed=0)
    assert finite(rm.metrics, {"rm/eval_loss", "rm/eval_accuracy", "rm/reward_mean", "rm/reward_std"}), rm.metrics
    head, _ = ScalarHead.load(Path(rm.head_dir))
    assert head.linear.weight.dtype == torch.float32

    # the fp32-trained reward model, scoring in the half dtype: fp32 scores, within the dtype's rounding of fp32's
    texts = [("The film was", "wonderful and moving."), ("My kettle", "broke after a day, awful."), ("I", "am ok")]
    prompts, responses = [p for p, _ in texts], [r for _, r in texts]
    head, meta = ScalarHead.load(Path(reward.head_dir))
    scores = {}
    for name in ("float32", dtype):
        mcfg = replace(stages.cfg.model, dtype=name, device="cpu")
        model = PeftModel.from_pretrained(
            load_causal_lm(stages.sft_dir, mcfg), str(Path(reward.head_dir) / "adapter")
        ).eval()
        tok = load_tokenizer(stages.sft_dir, mcfg)
        with torch.no_grad():
            scores[name] = score_texts(model, head, tok, prompts, responses, stages.cfg.reward, "cpu")
    assert scores[dtype].dtype == torch.float32
    tolerance = 0.1 * meta["reward_std"]  # a half-precision forward through the tiny model: ~1% of a score's spread
    assert (scores[dtype] - scores["float32"]).abs().max() < tolerance, scores


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("value_model", ["shared", "adapter"])
def test_ppo_scores_in_fp32_on_a_half_base_and_trains(stages, reward, dtype, value_model, tmp_path):
    from components.training.ppo import build_roles, score_rollout, train_ppo
    from components.training.ppo_math import RunningMoments

    cfg = cfg_in(stages, dtype, f"ppo.value_model={value_model}")
    roles = build_roles(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, torch.device("cpu"))
    assert roles.model.get_base_model().dtype == DTYPES[dtype]
    base = {n: p.clone() for n, p in roles.model.named_parameters() if "base_layer" in n}
    prompts = read_prompts(stages.cfg.data_path, "prompts")[:8]
    torch.manual_seed(0)
    with lora_merged(roles.model):  # a half-precision base is not merged into: the reference stays bit for bit
        ro = sample(roles.model, roles.tok, prompts, 12)
    assert all(torch.equal(p, base[n]) for n, p in roles.model.named_parameters() if "base_layer" in n)
    traj = score_rollout(roles, ro, prompts, cfg.ppo, 0.1, RunningMoments())
    for name in ("logprobs", "ref_logprobs", "values", "scores", "raw_scores", "rewards", "advantages", "returns"):
        t = getattr(traj, name)
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), (name, t.dtype)
    # the policy starts as the reference (LoRA B = 0): the same forward, so the log-probs agree exactly
    assert torch.equal(traj.logprobs, traj.ref_logprobs)

    result = train_ppo(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, tmp_path / "ppo", seed=0)
    keys = {"ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/reward_mean", "ppo/eval_reward"}
    assert keys <= set(result.metrics) and finite(result.metrics, keys), result.metrics
    policy = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k), "the policy trained"


@pytest.mark.parametrize("dtype", HALF)
def test_guided_ppo_runs_on_a_half_base(stages, reward, dtype, tmp_path):
    from components.training.ppo import train_ppo

    cfg = cfg_in(stages, dtype, "ppo.guide.model=reference", "ppo.guide.rollin_prob=0.25", "ppo.guide.rollout_prob=0.5")
    result = train_ppo(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, tmp_path / "ppo", seed=0)
    assert result.metrics["ppo/guide_tokens_mean"] > 0
    assert finite(result.metrics, {"ppo/kl", "ppo/policy_loss", "ppo/guided_score", "ppo/eval_reward"})


@pytest.mark.parametrize("dtype", HALF)
def test_self_evaluation_reward_on_a_half_base_matches_fp32(stages, dtype, tmp_path):
    from components.training.ppo import build_roles, train_ppo

    over = (
        "ppo.use_reward_model=false",
        "ppo.value_init=fresh",
        "ppo.reward_fn=components.training.self_eval:SelfEvalReward",
    )
    prompts = ["The film was", "My new kettle"]
    responses = ["great, I loved it.", "terrible, it broke."]
    p = {}
    for name in ("float32", dtype):
        cfg = cfg_in(stages, name, *over)
        roles = build_roles(cfg.ppo, cfg.model, stages.sft_dir, None, torch.device("cpu"))
        p[name] = torch.tensor(roles.reward_fn(prompts, responses))
    assert ((p[dtype] - p["float32"]).abs() < 0.03).all(), p  # a probability, through a half-precision forward
    cfg = cfg_in(stages, dtype, *over)
    result = train_ppo(cfg.ppo, cfg.model, stages.sft_dir, None, cfg.data_path, tmp_path / "ppo", seed=0)
    assert finite(result.metrics, {"ppo/kl", "ppo/reward_mean", "ppo/eval_reward"}), result.metrics


@pytest.mark.parametrize("dtype", HALF)
def test_rejection_sampling_on_a_half_base(stages, reward, dtype, tmp_path):
    from components.training.rejection_sampling import train_rejection_sampling

    cfg = cfg_in(
        stages,
        dtype,
        "policy.rejection_sampling.rounds=1",
        "policy.rejection_sampling.prompts_per_round=8",
        "policy.rejection_sampling.samples_per_prompt=2",
    )
    rs = cfg.policy.rejection_sampling
    result = train_rejection_sampling(
        rs, cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, tmp_path / "rs", seed=0
    )
    assert finite(result.metrics, {"ppo/eval_reward", "ppo/eval_kl"}), result.metrics


@pytest.mark.parametrize("dtype", HALF)
def test_evaluation_and_gate_on_a_half_base_agree_with_fp32(stages, reward, dtype):
    from components.evaluation.evaluate import PolicySpec, evaluate_policies
    from components.evaluation.gate import decide

    gate = replace(stages.cfg.gate, max_prompts=8, max_new_tokens=12)
    prompts = read_prompts(stages.cfg.data_path, "eval")
    spec = [PolicySpec("sft", stages.sft_dir)]
    evals = {
        name: evaluate_policies(
            spec, stages.sft_dir, reward.head_dir, prompts, gate, replace(stages.cfg.model, dtype=name, device="cpu")
        )["sft"]
        for name in ("float32", dtype)
    }
    half = evals[dtype].metrics
    assert finite(half), half
    assert abs(half["kl"]) < 1e-6, "the SFT policy against its own reference: KL 0 in any dtype"
    verdict = decide(half, evals["float32"].metrics, 0.5, "sft", gate)
    assert {name for name, *_ in verdict.checks} >= {"reward_gain", "win_rate", "kl"}


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_precision_model_registers_loads_in_its_dtype_and_serves_best_of_n(stages, reward, dtype, tmp_path):
    from components.models.loading import load_causal_lm
    from components.registry.registry import log_and_register

    half_sft = tmp_path / "sft-half"
    mcfg = replace(stages.cfg.model, dtype=dtype, device="cpu")
    load_causal_lm(stages.sft_dir, mcfg).save_pretrained(half_sft, safe_serialization=True)
    for f in Path(stages.sft_dir).glob("*token*"):
        (half_sft / f.name).write_bytes(f.read_bytes())
    tracking.setup(stages.cfg)
    with mlflow.start_run(run_name=f"register-{dtype}"):
        version = log_and_register(f"half-{dtype}", str(half_sft), None, {"dtype": dtype}, reward_dir=reward.head_dir)
    served = mlflow.pyfunc.load_model(version.model_uri)
    model = served.unwrap_python_model().model
    assert model.get_base_model().dtype == DTYPES[dtype], "served in the dtype it was trained and saved in"
    answer = served.predict(pd.DataFrame({"prompt": ["The film was", "My kettle"]}), params={"n": 3, "seed": 0})
    assert list(answer.columns) == ["response", "score"] and len(answer) == 2
    assert all(math.isfinite(s) for s in answer["score"]), answer


@pytest.mark.parametrize("dtype", HALF)
def test_data_parallel_ppo_on_a_half_base(stages, reward, dtype, tmp_path):
    from service import launch

    tracking.setup(stages.cfg)
    cfg = compose(
        [f"root={stages.root}", "model.device=cpu", f"model.dtype={dtype}", "infra.num_processes=2", *SMALL_PPO]
    )
    args = {"sft_dir": stages.sft_dir, "reward_dir": reward.head_dir, "data_dir": str(stages.cfg.data_path)}
    result = launch.run("ppo", cfg, **args, out_dir=str(tmp_path / "two"))  # the replicas are checked equal at the end
    assert result.metrics["ppo/world_size"] == 2.0
    assert finite(result.metrics, {"ppo/kl", "ppo/policy_loss", "ppo/eval_reward"}), result.metrics


@pytest.mark.parametrize("dtype", HALF)
def test_merged_sampling_on_a_half_base_folds_the_adapter_in_and_restores_the_base_bit_for_bit(stages, dtype):
    """`lora_merged` on a bf16/fp16 base: inside, the adapter is in the weights (the merged forward gives the
    adapter's logits to the dtype's rounding); after ten cycles the base is exactly what it was."""
    from peft import get_peft_model

    from components.models.loading import load_causal_lm
    from components.models.roles import lora_config

    mcfg = replace(stages.cfg.model, dtype=dtype, device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(stages.sft_dir, mcfg), lora_config(stages.cfg.ppo.lora)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    base = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        adapter = model(input_ids=ids).logits.float()
        for _ in range(10):
            with lora_merged(model):
                assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if "base_layer" in n)
                merged = model(input_ids=ids).logits.float()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "base_layer" in n)
    assert (merged - adapter).abs().max() < 0.05 * adapter.abs().max(), "the merged forward is the adapter's"


def test_loss_scaling_is_on_for_fp16_alone_and_keeps_small_gradients_alive():
    """precision.LossScaler: an fp16 activation gradient of 1e-8 underflows to 0 unscaled; scaled by 2^16 it
    survives, and the step sees it unscaled (1e-8, as an fp32 backward gives). An overflowing step is skipped and
    the scale halves. fp32 and bf16: a pass-through."""
    from components.training.precision import LossScaler

    assert [LossScaler(d, "cpu").enabled for d in ("float32", "bfloat16", "float16")] == [False, False, True]

    def one_step(scaler):
        w = torch.nn.Parameter(torch.ones(1))
        opt = torch.optim.SGD([w], lr=1.0)
        x = torch.full((1,), 1e-4, dtype=torch.float16)  # (w x)^2 / 2 in fp16: grad w = w x^2 = 1e-8
        loss = 0.5 * (w.half() * x).pow(2).sum().float()
        scaler.backward(loss)
        scaler.step(opt, [w], max_grad_norm=1e9)
        return w.grad.item()  # what the step used, unscaled

    assert one_step(LossScaler("float32", "cpu")) == 0.0, "unscaled, the fp16 gradient underflows to 0"
    assert one_step(LossScaler("float16", "cpu")) == pytest.approx(1e-8, rel=1e-2)
    scaler = LossScaler("float16", "cpu")
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler.backward((w.half() * torch.full((1,), 60000.0, dtype=torch.float16)).sum().float())  # inf once scaled
    scaler.step(opt, [w], max_grad_norm=1e9)
    assert w.item() == 1.0 and scaler.scaler.get_scale() == 2.0**15, "skipped, the scale halved"


def test_ppo_on_an_fp16_base_logs_its_loss_scale(stages, reward, tmp_path):
    from components.training.ppo import train_ppo

    cfg = cfg_in(stages, "float16")
    result = train_ppo(cfg.ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, tmp_path / "ppo", seed=0)
    assert all(0 < h["ppo/loss_scale"] <= 2.0**16 for h in result.history), [
        h["ppo/loss_scale"] for h in result.history
    ]
    bf16 = cfg_in(stages, "bfloat16")
    result = train_ppo(bf16.ppo, bf16.model, stages.sft_dir, reward.head_dir, bf16.data_path, tmp_path / "bf", seed=0)
    assert all("ppo/loss_scale" not in h for h in result.history)
