"""PPO on the demo (tiny model, CPU): reward up on held-out prompts with the KL near its target;
only the policy/value adapters train; resume continues from the checkpoint; divergence writes nothing."""

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.training.ppo import PPODivergence, train_ppo


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ppo(stages, reward):
    frozen = {
        p: digest(p)
        for p in (
            Path(stages.sft_dir) / "model.safetensors",
            Path(reward.adapter_dir) / "adapter_model.safetensors",
            Path(reward.head_dir) / "head.safetensors",
        )
    }
    result = train_ppo(
        stages.cfg.ppo,
        stages.cfg.model,
        stages.sft_dir,
        reward.head_dir,
        stages.cfg.data_path,
        stages.root / "ppo",
        seed=stages.cfg.seed,
    )
    return result, frozen


def assert_kl_holds_its_target(result, target: float) -> None:
    """The final policy's KL to the reference, on the held-out prompts, within +-30% of the target; and the
    batches of the last 10 iterations on average too (one batch of 32 is noisy)."""
    m = result.metrics
    assert 0.7 * target <= m["ppo/eval_kl"] <= 1.3 * target, m
    last = [h["ppo/kl"] for h in result.history[-10:]]
    assert 0.7 * target <= sum(last) / len(last) <= 1.3 * target, last


def test_ppo_raises_held_out_reward_with_kl_near_target(stages, ppo):
    result, _ = ppo
    m, target = result.metrics, stages.cfg.ppo.target_kl
    # measured on held-out eval prompts (same sampling seed for both), reward in RM std units: without PPO-ptx
    # SFT -0.04 -> PPO 0.62 at KL 7.0 for a target of 6 (the PID controller; Ziegler's: 0.25 at KL 2.5). With the
    # default ppo.ptx_coef=0.5 the demonstrations hold the KL under the target, a ceiling the controller then never
    # needs (the controller at its target: the long run below, without ptx)
    assert m["ppo/eval_reward"] - m["ppo/eval_reward_ref"] > 0.15, m
    assert m["ppo/eval_score"] > m["ppo/eval_score_ref"], m
    assert 0.5 < m["ppo/eval_kl"] <= 1.3 * target, m  # the policy moved, within the KL budget (40 iterations)
    assert max(h["ppo/kl"] for h in result.history) < 2.5 * target
    first, last = result.history[:5], result.history[-5:]
    assert sum(h["ppo/score_mean"] for h in last) / 5 > sum(h["ppo/score_mean"] for h in first) / 5


def test_every_iteration_logs_the_ppo_metrics(stages, ppo):
    result, _ = ppo
    assert len(result.history) == stages.cfg.ppo.steps
    expected = {
        "ppo/reward_mean",
        "ppo/reward_std",
        "ppo/non_score_reward",
        "ppo/kl",
        "ppo/beta",
        "ppo/entropy",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/response_length",
        "ppo/time_generate",
        "ppo/time_score",
        "ppo/time_train",
        "ppo/tokens_per_second",
    }
    assert expected <= set(result.history[0])
    assert result.history[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-4), "the policy starts as the reference"


def test_only_the_policy_adapter_and_the_value_head_train(ppo, reward):
    result, frozen = ppo
    for path, before in frozen.items():
        assert digest(path) == before, f"{path} changed: SFT weights and the reward model are frozen"
    policy = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    assert policy and all("lora_" in k for k in policy)
    assert all(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k), "policy LoRA B starts at 0: it must move"
    # ppo.value_model=shared (the default): the value head reads the policy's hidden states; no value adapter
    assert not (Path(result.value_dir) / "adapter_model.safetensors").exists()
    value_head = load_file(str(Path(result.value_dir) / "head.safetensors"))
    rm_head = load_file(str(Path(reward.head_dir) / "head.safetensors"))
    assert any(not torch.equal(value_head[k], rm_head[k]) for k in value_head), "value head starts from the RM's"


def test_a_value_adapter_of_its_own_starts_from_the_reward_model_and_trains(stages, reward):
    """ppo.value_model=adapter: the value function is a LoRA adapter + head of its own (a second forward per
    minibatch); it starts as the reward model's adapter and head (InstructGPT) and trains; the policy trains too."""
    cfg = small(stages.cfg.ppo, value_model="adapter")
    result = train_ppo(
        cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, stages.root / "ppo-va", seed=2
    )
    value = load_file(str(Path(result.value_dir) / "adapter_model.safetensors"))
    rm = load_file(str(Path(reward.adapter_dir) / "adapter_model.safetensors"))
    assert value and all(k in rm for k in value)
    assert any(not torch.equal(value[k], rm[k]) for k in value), "value adapter starts from the RM and trains"
    policy = load_file(str(Path(result.policy_dir) / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in policy.items() if "lora_B" in k)
    assert len(result.history) == cfg.steps and all(h["ppo/value_loss"] >= 0 for h in result.history)


def test_held_out_curves_every_n_iterations_on_a_clock_without_the_evals(stages, reward):
    cfg = small(stages.cfg.ppo, eval_every=2, steps=5)
    result = train_ppo(
        cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, stages.root / "ppo-ev", seed=4
    )
    h = result.history
    assert [i + 1 for i, row in enumerate(h) if "ppo/eval_reward" in row] == [2, 4]  # the end: the final eval
    assert "ppo/eval_reward_ref" not in h[1] and "ppo/eval_kl" in h[1]
    clock = [row["ppo/train_elapsed_seconds"] for row in h]
    assert all(b > a for a, b in zip(clock, clock[1:], strict=False))
    phases = sum(row["ppo/time_generate"] + row["ppo/time_score"] + row["ppo/time_train"] for row in h)
    assert phases <= clock[-1] <= phases + 5, "the clock is the loop's time: phases, checkpoints; not the evals"


def test_policy_improves_under_an_independent_judge(stages, ppo):
    """The sentiment judge shares nothing with the reward model: a gain here is learning, not RM hacking."""
    from peft import PeftModel

    from components.data.readers import read_prompts
    from components.evaluation.judges import sentiment
    from components.models.generation import sample
    from components.models.loading import load_causal_lm, load_tokenizer

    result, _ = ppo
    cfg = stages.cfg
    prompts = read_prompts(cfg.data_path, "eval")
    model = PeftModel.from_pretrained(load_causal_lm(stages.sft_dir, cfg.model), result.policy_dir)
    tok = load_tokenizer(result.policy_dir, cfg.model, padding_side="left")
    torch.manual_seed(0)
    policy = sample(model, tok, prompts, cfg.ppo.max_new_tokens)
    torch.manual_seed(0)
    with model.disable_adapter():
        reference = sample(model, tok, prompts, cfg.ppo.max_new_tokens)
    judge_policy = sum(sentiment(prompts, policy.texts)) / len(prompts)
    judge_sft = sum(sentiment(prompts, reference.texts)) / len(prompts)
    # measured: SFT 0.02 -> PPO 0.18 (0.23 with another RM); lexicon polarity in [-1, 1]
    assert judge_policy > judge_sft + 0.08, (judge_sft, judge_policy, policy.texts[:5])


def small(cfg, **kw):
    return replace(
        cfg,
        **{
            "steps": 4,
            "batch_size": 8,
            "minibatch_size": 4,
            "ppo_epochs": 2,
            "save_every": 2,
            "eval_max_prompts": 8,
            **kw,
        },
    )


def test_the_kl_controller_holds_its_target_over_a_long_run(stages, reward):
    # 120 iterations: Ziegler et al.'s controller (kl_horizon 500) let the KL drift to 9.8 here, and 15.6 on
    # another seed; the PID controller (Stooke et al. 2020) holds it (held-out KL 6.5, 6.7 on seeds 0, 1)
    cfg = replace(stages.cfg.ppo, steps=120, eval_max_prompts=100, sample_every=0, save_every=1000, ptx_coef=0.0)
    result = train_ppo(
        cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, stages.root / "ppo-120", seed=0
    )
    assert_kl_holds_its_target(result, cfg.target_kl)


def test_resume_continues_from_the_checkpoint(stages, reward):
    cfg = small(stages.cfg.ppo)
    full_dir, resumed_dir = stages.root / "ppo-full", stages.root / "ppo-resumed"
    full = train_ppo(cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, full_dir, seed=3)
    # a run killed during iteration 3: only the checkpoint after iteration 2 exists
    shutil.copytree(full_dir / "checkpoints" / "step-0000002", resumed_dir / "checkpoints" / "step-0000002")
    resumed = train_ppo(
        cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, resumed_dir, seed=3
    )
    assert resumed.metrics["ppo/resumed_from_iteration"] == 2 and full.metrics["ppo/resumed_from_iteration"] == 0
    assert len(resumed.history) == len(full.history) == 4
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["ppo/kl"] == pytest.approx(b["ppo/kl"], abs=1e-4) and a["ppo/beta"] == pytest.approx(b["ppo/beta"])
    pa = load_file(str(Path(full.policy_dir) / "adapter_model.safetensors"))
    pb = load_file(str(Path(resumed.policy_dir) / "adapter_model.safetensors"))
    assert all(torch.allclose(pa[k], pb[k], atol=1e-5) for k in pa)


def test_divergence_stops_with_a_clear_error_and_writes_no_policy(stages, reward):
    out = stages.root / "ppo-diverged"
    with pytest.raises(PPODivergence, match="kl_ceiling"):
        train_ppo(
            small(stages.cfg.ppo, kl_ceiling=1e-6),
            stages.cfg.model,
            stages.sft_dir,
            reward.head_dir,
            stages.cfg.data_path,
            out,
        )
    assert not (out / "final").exists()


def test_programmatic_reward_without_reward_model(stages):
    cfg = small(
        stages.cfg.ppo,
        use_reward_model=False,
        value_init="fresh",
        steps=2,
        reward_fn="components.evaluation.judges:sentiment",
    )
    result = train_ppo(
        replace(cfg, merge=True), stages.cfg.model, stages.sft_dir, None, stages.cfg.data_path, stages.root / "ppo-fn"
    )
    assert len(result.history) == 2 and all(-3 < h["ppo/reward_mean"] < 3 for h in result.history)
    # the merged policy is the SFT base + policy adapter folded in: same logits as the adapter model
    from peft import PeftModel

    from components.models.loading import load_causal_lm

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        merged = load_causal_lm(result.merged_dir, stages.cfg.model)(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(load_causal_lm(stages.sft_dir, stages.cfg.model), result.policy_dir)(
            input_ids=ids
        ).logits
        base = load_causal_lm(stages.sft_dir, stages.cfg.model)(input_ids=ids).logits
    assert torch.allclose(merged, adapter, atol=1e-4) and not torch.allclose(merged, base, atol=1e-4)
    with pytest.raises(ValueError, match="needs a reward"):
        train_ppo(
            replace(cfg, reward_fn=None),
            stages.cfg.model,
            stages.sft_dir,
            None,
            stages.cfg.data_path,
            stages.root / "x",
        )


def test_a_static_kv_cache_samples_and_trains_exactly_as_the_dynamic_one(stages, reward, tmp_path, monkeypatch):
    """ppo.generation_cache=static (preallocated KV cache: the shape CUDA graphs need) draws the same rollouts as the
    default dynamic cache, roll-ins by the guide included, so a PPO run is the same run; a bad value is refused
    before any model loads."""
    import transformers.cache_utils

    from components.models.generation import STATIC_BUCKET

    made = []
    static_init = transformers.cache_utils.StaticCache.__init__
    monkeypatch.setattr(
        transformers.cache_utils.StaticCache,
        "__init__",
        lambda self, *a, **k: (
            made.append(k.get("max_cache_len", a[1] if len(a) > 1 else None)) or static_init(self, *a, **k)
        ),
    )
    runs = {}
    for cache in ("dynamic", "static"):
        cfg = small(
            stages.cfg.ppo,
            steps=2,
            generation_cache=cache,
            guide=replace(stages.cfg.ppo.guide, model="reference", rollin_prob=0.25, rollout_prob=0.25),
        )
        args = (stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, tmp_path / cache)
        runs[cache] = train_ppo(cfg, *args)
        assert bool(made) == (cache == "static"), "the static run generates with a StaticCache, the dynamic one not"
    # prompts of every length are padded to one bucket, so CUDA compiles one shape, not one per prompt length
    # (transformers sizes the cache to the padded prompt + max_new_tokens - 1: the last token is never attended to)
    assert {n + 1 - cfg.max_new_tokens for n in made} == {STATIC_BUCKET}, made
    keys = ("ppo/score_mean", "ppo/kl", "ppo/response_length", "ppo/guide_tokens", "ppo/policy_loss")
    for dynamic, static in zip(runs["dynamic"].history, runs["static"].history, strict=True):
        assert all(dynamic[k] == static[k] for k in keys), (dynamic, static)
    assert runs["dynamic"].metrics["ppo/eval_reward"] == runs["static"].metrics["ppo/eval_reward"]
    with pytest.raises(ValueError, match="ppo.generation_cache='paged': expected one of dynamic, static"):
        train_ppo(replace(cfg, generation_cache="paged"), *args)
