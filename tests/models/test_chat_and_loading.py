"""Real checkpoints, offline: a hub id resolved from a local Hugging Face cache; chat templates rendered the same way
in SFT, the reward model, PPO and serving; gradient checkpointing changes memory, not results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from components import tracking
from components.config import compose
from components.data.demo import write_demo
from components.data.readers import read_corpus_texts
from components.models import chat
from components.models.demo_base import build_llama, train_tokenizer
from components.models.generation import encode_prompts
from components.models.loading import load_tokenizer
from components.models.scoring import encode
from components.registry import policy_model

REPO = Path(__file__).resolve().parents[2]
# a ChatML-like template over plain-text markers (the demo tokenizer has no special tokens for them)
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """demo_small data and two tiny random-init Llamas over the demo tokenizer: one whose tokenizer carries TEMPLATE."""
    root = tmp_path_factory.mktemp("chat")
    cfg = compose([f"root={root}", "data=demo_small", "model.num_hidden_layers=1"])
    write_demo(cfg.data, cfg.data_path)
    tok = train_tokenizer(read_corpus_texts(cfg.data_path), 512)
    dirs = {}
    for name, template in (("plain", None), ("chat", TEMPLATE)):
        torch.manual_seed(0)
        tok.chat_template = template
        model = build_llama(replace(cfg.model, vocab_size=512), tok)
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return cfg, dirs


def test_a_hub_id_loads_from_the_local_cache_with_no_network(project, tmp_path):
    """`model.name_or_path=acme/tiny-chat` with HF_HUB_OFFLINE=1: the snapshot in the local cache, as
    `huggingface-cli download` leaves it (models--acme--tiny-chat/snapshots/<commit>/, refs/main)."""
    _, dirs = project
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-chat"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(dirs["chat"]).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from components.config import compose\n"
        "from components.models.loading import load_causal_lm, load_tokenizer\n"
        "cfg = compose(['model.name_or_path=acme/tiny-chat', 'model.build_demo_base=false']).model\n"
        "tok = load_tokenizer(cfg.name_or_path, cfg)\n"
        "model = load_causal_lm(cfg.name_or_path, cfg)\n"
        "print(type(model).__name__, len(tok), bool(tok.chat_template))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["LlamaForCausalLM", "512", "True"]


def test_prompts_are_rendered_with_the_template_everywhere(project):
    cfg, dirs = project
    tok = load_tokenizer(dirs["chat"], cfg.model)
    rendered = "<|user|>how was the film?\n<|assistant|>"
    assert chat.render_prompt(tok, "how was the film?") == rendered
    assert policy_model.render_prompt(tok, "how was the film?") == rendered  # the served file's copy
    assert policy_model.prompt_and_response(tok, "p", "r") == chat.prompt_and_response(tok, "p", "r")
    ids, mask = encode_prompts(tok, ["how was the film?"], 64, "cpu")  # PPO's and evaluation's prompts
    assert tok.decode(ids[0][mask[0].bool()]) == rendered
    ids, mask = encode(tok, ["how was the film?"], ["great"], 96, "cpu")  # the reward model's input
    assert tok.decode(ids[0][mask[0].bool()]) == rendered + "great" + tok.eos_token
    # without a template (or with model.chat_template=false), the plain text of before
    plain = load_tokenizer(dirs["chat"], replace(cfg.model, chat_template=False))
    assert plain.chat_template is None and chat.render_prompt(plain, "p") == "p"
    ids, mask = encode(plain, ["p"], ["r"], 96, "cpu")
    assert tok.decode(ids[0][mask[0].bool()]) == "p r" + tok.eos_token


def test_sft_reward_ppo_and_serving_with_a_chat_template(project, tmp_path):
    """The whole chain on the templated model: SFT in TRL's conversational format (the loss on the assistant's
    turn), the reward model, PPO, then the registered model answers through `render_prompt`."""
    from components.registry.registry import log_and_register
    from components.training.ppo import train_ppo
    from components.training.reward import train_reward
    from components.training.sft import train_sft

    cfg, dirs = project
    cfg = compose(
        [
            f"root={cfg.root}",
            "data=demo_small",
            "sft.max_steps=3",
            "reward.max_steps=3",
            "reward.stats_max_responses=32",
            "ppo.steps=1",
            "ppo.batch_size=8",
            "ppo.minibatch_size=8",
            "ppo.eval_max_prompts=8",
            "ppo.max_new_tokens=8",
        ]
    )
    sft = train_sft(cfg.sft, cfg.model, dirs["chat"], cfg.data_path, tmp_path / "sft")
    assert (
        json.loads((Path(sft.merged_dir) / "tokenizer_config.json").read_text()).get("chat_template")
        or (Path(sft.merged_dir) / "chat_template.jinja").exists()
    )  # the template travels with the SFT model to every later stage and to serving
    assert sft.metrics["sft/eval_loss"] < sft.metrics["sft/eval_loss_base"]
    rm = train_reward(cfg.reward, cfg.model, sft.merged_dir, cfg.data_path, tmp_path / "rm")
    ppo = train_ppo(cfg.ppo, cfg.model, sft.merged_dir, rm.head_dir, cfg.data_path, tmp_path / "ppo")
    assert torch.isfinite(torch.tensor(ppo.metrics["ppo/eval_reward"]))
    tracking.setup(cfg)  # the tracking store and experiment (an earlier test may have left another active)
    with mlflow.start_run():
        reg = log_and_register("chat-policy", sft.merged_dir, ppo.policy_dir, {}, reward_dir=rm.head_dir)
    served = mlflow.pyfunc.load_model(f"models:/chat-policy/{reg.version}")
    out = served.predict(pd.DataFrame({"prompt": ["how was the film?"]}), params={"n": 2, "max_new_tokens": 8})
    assert list(out.columns) == ["response", "score"] and isinstance(out["response"][0], str)


def test_gradient_checkpointing_changes_memory_not_results(project, tmp_path):
    """The reward model with and without recomputed activations: the same losses and metrics (dropout is off)."""
    from components.models.loading import load_causal_lm
    from components.training.reward import train_reward

    cfg, dirs = project
    cfg = compose([f"root={cfg.root}", "data=demo_small", "reward.max_steps=3", "reward.stats_max_responses=32"])
    assert load_causal_lm(dirs["plain"], replace(cfg.model, gradient_checkpointing=True)).is_activation_checkpointing
    assert not load_causal_lm(dirs["plain"], cfg.model).is_activation_checkpointing
    runs = [
        train_reward(
            cfg.reward,
            replace(cfg.model, gradient_checkpointing=gc),
            dirs["plain"],
            cfg.data_path,
            tmp_path / f"rm-{gc}",
        )
        for gc in (False, True)
    ]
    for key in ("rm/eval_loss", "rm/eval_accuracy", "rm/reward_mean"):
        assert abs(runs[0].metrics[key] - runs[1].metrics[key]) < 1e-5, key


def test_a_quantised_base_needs_a_gpu_and_says_so(project):
    """model.quantization (QLoRA through bitsandbytes) runs on CUDA only: elsewhere a clear error, before loading."""
    from components.models.loading import load_causal_lm

    cfg, dirs = project
    with pytest.raises(ValueError, match="expected 4bit | 8bit"):
        load_causal_lm(dirs["plain"], replace(cfg.model, quantization="3bit"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"model.quantization=4bit needs a CUDA GPU .* set model.quantization=null"):
        load_causal_lm(dirs["plain"], replace(cfg.model, quantization="4bit"), torch.device("cpu"))
