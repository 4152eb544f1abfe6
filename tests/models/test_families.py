"""The architecture matrix: each model family users bring (components/models/families.py), built tiny and random
from config (nothing downloaded) over the demo's tokenizer, goes through SFT, the reward model, a few PPO
iterations, registration and the served pyfunc. LoRA adapts the same modules in every stage: peft's "all-linear",
which in each family is the table's `lora_targets` (GPT-2's Conv1D layers with fan_in_fan_out)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from components import tracking
from components.config import Config, LoraConfig, compose
from components.models.families import ALL_LINEAR, FAMILIES, build_tiny

VOCAB = 512  # the demo tokenizer, smaller than model=tiny's: the embeddings dominate a tiny model's time
# A few steps per stage on tiny batches: the matrix checks that every family runs every stage, not that it learns.
TINY_STAGES = (
    "model.device=cpu",
    "sft.max_steps=3",
    "sft.batch_size=4",
    "sft.max_length=48",
    "reward.max_steps=3",
    "reward.batch_size=4",
    "reward.feedback_batch_size=4",
    "reward.max_length=48",
    "reward.stats_max_responses=16",
    "ppo.steps=2",
    "ppo.batch_size=4",
    "ppo.minibatch_size=2",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=8",
    "ppo.max_prompt_tokens=24",
    "ppo.eval_max_prompts=4",
    "ppo.sample_every=0",
)
PPO_METRICS = {"ppo/kl", "ppo/beta", "ppo/reward_mean", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models: a second only adds synchronisation, and on a busy shared CPU its
    spin-waits made every small op ~100x slower (measured: the pyfunc's predict 0.04 s with 1 thread, 4.7 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Demo:
    cfg: Config
    root: Path
    tok: object  # the demo's byte-level BPE tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """demo_small data and a tokenizer trained on its corpus; MLflow on SQLite under the project's state dir."""
    from components.data.demo import write_demo
    from components.data.readers import read_corpus_texts
    from components.models.demo_base import train_tokenizer

    root = tmp_path_factory.mktemp("families")
    cfg = compose([f"root={root}", "data=demo_small", *TINY_STAGES])
    write_demo(cfg.data, cfg.data_path)
    tracking.setup(cfg)
    return Demo(cfg, root, train_tokenizer(read_corpus_texts(cfg.data_path), VOCAB))


@pytest.fixture(scope="module")
def tiny(demo):
    """family -> the dir of its tiny random-init model (built once per module)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, demo.tok, demo.root / "models" / family)
        return built[family]

    return get


def model_cfg(demo: Demo, path: Path, family: str):
    return replace(demo.cfg.model, name=f"tiny-{family}", name_or_path=str(path), build_demo_base=False)


def adapted(model) -> set[str]:
    return {name for name, m in model.named_modules() if hasattr(m, "lora_A")}


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(path / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights), sorted(weights)[:4]
    assert all(torch.isfinite(v).all() for v in weights.values()), "LoRA weights must be finite"
    return weights


def assert_trained(weights: dict[str, torch.Tensor], what: str) -> None:
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), f"{what}: LoRA B starts at 0, it must have moved"


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_the_table_modules_and_merges_exactly(demo, tiny, family):
    """The default target_modules ("all-linear") adapts exactly the table's modules, never the LM head; merged
    weights give the adapter's logits (GPT-2's Conv1D: fan_in_fan_out), with or without `model` passed."""
    from peft import get_peft_model

    from components.models.loading import load_causal_lm
    from components.models.roles import lora_config

    fam, cfg = FAMILIES[family], model_cfg(demo, tiny(family), family)
    assert LoraConfig().target_modules == [ALL_LINEAR]
    base = load_causal_lm(cfg.name_or_path, cfg)
    assert base.config.model_type == family and base.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for with_model in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            model = get_peft_model(copy.deepcopy(base), lora_config(LoraConfig(), base if with_model else None))
        assert {n.rsplit(".", 1)[-1] for n in adapted(model)} == set(fam.lora_targets)
        assert len(adapted(model)) == len(fam.lora_targets) * 2 + (2 if family == "gpt2" else 0)  # c_proj: 2 / layer
        head = model.get_output_embeddings()
        assert not hasattr(head, "lora_A"), "the LM head is not adapted"
        assert model.peft_config["default"].fan_in_fan_out == fam.conv1d
        if with_model:  # fan_in_fan_out set up front: peft has nothing to correct
            assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
            plain = base(input_ids=ids).logits
            adapter = model(input_ids=ids).logits
            model.merge_adapter()
            merged = model(input_ids=ids).logits
            model.unmerge_adapter()
        assert not torch.allclose(adapter, plain, atol=1e-4)
        assert torch.allclose(merged, adapter, atol=1e-5), "merging must not change the outputs"


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_reads_left_padded_rows_like_unpadded_ones_and_samples(demo, tiny, family):
    """roles.hidden_states (the decoder, with position ids that start at each row's first token) and
    generation.sample work in every family: a left-padded row reads and continues as it does alone, and the LM head
    on the backbone's hidden states (how PPO scores responses) gives the model's own logits."""
    from components.models.generation import encode_prompts, sample
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import hidden_states, lm_logits, position_ids

    cfg = model_cfg(demo, tiny(family), family)
    model, tok = load_causal_lm(cfg.name_or_path, cfg).eval(), load_tokenizer(cfg.name_or_path, cfg, "left")
    prompts = ["After a week with these headphones, I think", "The film"]
    ids, mask = encode_prompts(tok, prompts, 64, "cpu")
    alone, alone_mask = encode_prompts(tok, prompts[1:], 64, "cpu")
    with torch.no_grad():
        padded = hidden_states(model, ids, mask)  # (2, T, H)
        single = hidden_states(model, alone, alone_mask)  # (1, t, H)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits  # (2, T, V)
    t = alone.shape[1]
    assert mask[1].sum() == t < ids.shape[1], "the second prompt is left-padded"
    assert torch.allclose(padded[1, -t:], single[0], atol=1e-5)
    assert torch.allclose(lm_logits(model, padded), logits, atol=1e-5)
    both = sample(model, tok, prompts, max_new_tokens=6, do_sample=False)
    second = sample(model, tok, prompts[1:], max_new_tokens=6, do_sample=False)
    assert torch.equal(
        both.response[1][both.response_mask[1].bool()], second.response[0][second.response_mask[0].bool()]
    )
    torch.manual_seed(0)
    rollout = sample(model, tok, prompts, max_new_tokens=6)
    assert rollout.response.shape[0] == 2 and len(rollout.texts) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_reward_ppo_register_and_serve(demo, tiny, family, dtype):
    """Each stage runs on the family, in fp32 and in bf16 (`model.dtype`); LoRA trains the table's modules; the
    registered pyfunc (base + policy and reward adapters) loads in the dtype the model was saved in, and answers."""
    from components.registry.registry import log_and_register
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    cfg, fam, out = demo.cfg, FAMILIES[family], demo.root / "runs" / dtype / family
    mcfg = replace(model_cfg(demo, tiny(family), family), dtype=dtype)

    sft = train_sft(cfg.sft, mcfg, mcfg.name_or_path, cfg.data_path, out / "sft", seed=0)
    assert all(math.isfinite(v) for k, v in sft.metrics.items() if k != "sft/tokens_per_second"), sft.metrics
    assert_trained(lora_tensors(Path(sft.adapter_dir)), "SFT")
    base_sd = load_file(str(Path(mcfg.name_or_path) / "model.safetensors"))
    merged = load_file(str(Path(sft.merged_dir) / "model.safetensors"))
    assert {v.dtype for v in merged.values()} == {getattr(torch, dtype)}
    changed = {k for k in merged if k in base_sd and not torch.equal(merged[k], base_sd[k].to(merged[k].dtype))}
    assert changed and all(k.split(".")[-2] in fam.lora_targets for k in changed), sorted(changed)

    rm = train_reward(cfg.reward, mcfg, sft.merged_dir, cfg.data_path, out / "rm", seed=0, data_cfg=cfg.data)
    assert_trained(lora_tensors(Path(rm.adapter_dir)), "reward model")
    assert math.isfinite(rm.metrics["rm/eval_accuracy"]), rm.metrics

    ppo = train_ppo(cfg.ppo, mcfg, sft.merged_dir, rm.head_dir, cfg.data_path, out / "ppo", seed=0)
    assert len(ppo.history) == cfg.ppo.steps
    for row in ppo.history:
        assert PPO_METRICS <= set(row) and all(math.isfinite(row[k]) for k in PPO_METRICS), row
    assert_trained(lora_tensors(Path(ppo.policy_dir)), "PPO policy")

    with mlflow.start_run(run_name=f"register-{family}"):
        version = log_and_register(
            f"tiny-{family}-{dtype}", sft.merged_dir, ppo.policy_dir, {"family": family}, reward_dir=rm.head_dir
        )
    served = mlflow.pyfunc.load_model(version.model_uri)
    assert served.unwrap_python_model().model.get_base_model().dtype == getattr(torch, dtype)
    answer = served.predict(
        pd.DataFrame({"prompt": ["The film was", "These headphones"]}), params={"seed": 0, "max_new_tokens": 8}
    )
    assert list(answer.columns) == ["response", "score"] and len(answer) == 2
    assert all(isinstance(r, str) for r in answer["response"]) and any(answer["response"]), answer
    assert all(math.isfinite(s) for s in answer["score"]), answer


def test_all_linear_is_the_demo_llamas_explicit_list_bit_for_bit(demo):
    """The default became "all-linear": on the demo's Llama (tied embeddings) it adapts q, k, v, o, gate, up, down
    (not lm_head), in the same order with the same init as the former explicit list, so demo results stay the same."""
    from peft import get_peft_model

    from components.models.demo_base import build_llama
    from components.models.roles import lora_config

    model_settings = compose(["model=tiny"]).model
    torch.manual_seed(0)
    base = build_llama(model_settings, demo.tok)
    explicit = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    states = []
    for settings in (explicit, LoraConfig()):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), lora_config(settings), adapter_name="policy")
        model.add_adapter("value", lora_config(settings))  # PPO's second adapter draws next
        states.append(([n for n, m in model.named_modules() if hasattr(m, "lora_A")], model.state_dict()))
    (names, explicit_sd), (names_all, all_sd) = states
    assert names == names_all and len(names) == 7 * model_settings.num_hidden_layers
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert list(explicit_sd) == list(all_sd) and all(torch.equal(explicit_sd[k], all_sd[k]) for k in explicit_sd)


def test_a_family_where_all_linear_is_wrong_gets_its_explicit_list(demo, tiny, monkeypatch):
    """The table's fallback: with `model` passed, a family marked all_linear=False gets its `lora_targets`; named
    modules and a plain string "all-linear" pass through as they are."""
    from components.models import families
    from components.models.loading import load_causal_lm
    from components.models.roles import lora_config

    cfg = model_cfg(demo, tiny("llama"), "llama")
    model = load_causal_lm(cfg.name_or_path, cfg)
    assert lora_config(LoraConfig(), model).target_modules == ALL_LINEAR
    assert lora_config(LoraConfig(target_modules="all-linear")).target_modules == ALL_LINEAR
    assert lora_config(LoraConfig(target_modules=["q_proj"]), model).target_modules == {"q_proj"}
    narrow = replace(FAMILIES["llama"], all_linear=False, lora_targets=("q_proj", "v_proj"))
    monkeypatch.setitem(families.FAMILIES, "llama", narrow)
    assert lora_config(LoraConfig(), model).target_modules == {"q_proj", "v_proj"}
    assert lora_config(LoraConfig()).target_modules == ALL_LINEAR, "without the model: peft's all-linear"
