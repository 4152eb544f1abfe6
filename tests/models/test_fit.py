"""A model the user brings against the config (components/models/fit.py): each length the stages put through the
model against its context, its tokenizer against its embedding, its chat template against the prompt budgets, and a
model directory that is not there, each refused in one sentence naming the key; a model that fits gives [].
Hand-built tiny transformers configs and a tokenizer trained here: nothing downloaded, no weights but the saved ones."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from components.config import compose
from components.models.demo_base import train_tokenizer
from components.models.fit import EVAL_PROMPT_TOKENS, check_model_fits, problems

WHERE = "/models/mine"
SHORT = ("sft.max_length=64", "reward.max_length=64", "gate.max_new_tokens=4")  # fit a context of 72 or more
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
# a ChatML-like template (as tests/models/test_chat_and_loading.py): the prompt rendered alone starts the conversation
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# opens the assistant's turn as <|reply|> alone and as <|assistant|> in the conversation
SKEWED = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|reply|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer of 300 tokens (the demo base's kind), with pad, BOS, EOS and UNK."""
    texts = ["How are you? Fine, thanks. Is the answer yes or no? The quick brown fox jumps over the lazy dog."] * 20
    return train_tokenizer(texts, 300)


def config(*overrides: str):
    """The packaged defaults for a model of the user's own (what `rlhf init --model DIR` composes)."""
    return compose(["model.build_demo_base=false", f"model.name_or_path={WHERE}", *overrides])


def llama(tok, context: int, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=kw.pop("vocab_size", len(tok)),
        max_position_embeddings=context,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **SMALL,
        **kw,
    )


def mentioned(found: list[str], *keys: str) -> dict[str, bool]:
    return {k: any(k in p for p in found) for k in keys}


def test_a_model_that_fits_gives_no_problems(tok):
    assert problems(config(), llama(tok, 512), tok) == []
    assert problems(config("policy=dpo"), llama(tok, 512), tok) == []


def test_a_context_too_short_is_refused_one_sentence_per_key(tok):
    """Context 90: sft.max_length 96, reward.max_length 96 and the evaluation's 2 x 24 + 64 = 112 are over it; PPO's
    64 + 24 = 88 is not."""
    found = problems(config(), llama(tok, 90), tok)
    assert len(found) == 3, found
    sft, reward, gate = found
    assert sft.startswith("sft.max_length=96 tokens") and sft.endswith("set sft.max_length=90 or less")
    assert "context of 90 tokens (max_position_embeddings in /models/mine/config.json)" in sft
    assert reward.startswith("reward.max_length=96 tokens") and "reward.max_length=90 or less" in reward
    assert gate.startswith(f"2 x gate.max_new_tokens + {EVAL_PROMPT_TOKENS} = 2 x 24 + 64 = 112 tokens")
    assert gate.endswith(f"set gate.max_new_tokens={(90 - EVAL_PROMPT_TOKENS) // 2} or less")
    assert not mentioned(found, "ppo.max_new_tokens")["ppo.max_new_tokens"]
    # what the sentences ask for fits
    fixed = config("sft.max_length=90", "reward.max_length=90", "gate.max_new_tokens=13")
    assert problems(fixed, llama(tok, 90), tok) == []


def test_prompt_and_response_are_added_up(tok):
    """40 + 40 over a context of 72, where SFT's, the reward model's and the evaluation's lengths fit."""
    found = problems(config(*SHORT, "ppo.max_prompt_tokens=40", "ppo.max_new_tokens=40"), llama(tok, 72), tok)
    assert found == [
        "ppo.max_prompt_tokens + ppo.max_new_tokens = 40 + 40 = 80 tokens (the policy stage's rollouts and held-out "
        "samples, prompt + response) exceed the model's context of 72 tokens (max_position_embeddings in "
        "/models/mine/config.json): lower them to at most 72 together (e.g. ppo.max_prompt_tokens=32)"
    ]


def test_the_policy_algorithm_picks_its_budgets(tok):
    """At a context of 88 (sft, reward and the evaluation set to fit): PPO's 64 + 24 fits; rejection sampling's
    fine-tuning adds the EOS (89); DPO's and KTO's responses are policy.<method>.max_response_tokens long."""
    fit = ("sft.max_length=88", "reward.max_length=88", "gate.max_new_tokens=12")
    assert problems(config(*fit), llama(tok, 88), tok) == []
    (rs,) = problems(config(*fit, "policy=rejection_sampling"), llama(tok, 88), tok)
    assert rs.startswith("ppo.max_prompt_tokens + ppo.max_new_tokens + 1 = 64 + 24 + 1 = 89 tokens (rejection")
    assert "at most 87 together" in rs
    for method in ("dpo", "kto"):
        (direct,) = problems(config(*fit, f"policy={method}"), llama(tok, 88), tok)
        assert direct.startswith(f"ppo.max_prompt_tokens + policy.{method}.max_response_tokens = 64 + 64 = 128")
        assert (
            problems(config(*fit, f"policy={method}", f"policy.{method}.max_response_tokens=24"), llama(tok, 88), tok)
            == []
        )


def test_gpt2_context_is_named_as_its_config_names_it(tok):
    gpt2 = GPT2Config(
        vocab_size=len(tok), n_positions=80, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2
    )
    found = problems(config(), gpt2, tok)
    assert found and all("context of 80 tokens (n_positions in /models/mine/config.json)" in p for p in found)


def test_the_tokenizer_states_the_context_when_the_config_does_not(tok):
    bare = PretrainedConfig(vocab_size=len(tok), hidden_size=16)
    assert problems(config(), bare, tok) == []  # no context stated anywhere: nothing to hold the lengths to
    limited = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|eos|>", model_max_length=80)
    found = problems(config(), bare, limited)
    assert found and all("(model_max_length in the tokenizer of /models/mine)" in p for p in found)


def test_a_tokenizer_without_eos_or_past_the_embedding_is_refused(tok):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    (found,) = problems(config(), llama(tok, 512), no_eos)
    assert found.startswith("the tokenizer of /models/mine has no EOS token")
    (found,) = problems(config(), llama(tok, 512, vocab_size=200), tok)
    assert "has 300 tokens, past the model's vocab_size of 200 embedding rows" in found


def test_a_chat_template_must_render_the_prompt_as_the_conversation_starts(tok):
    tok.chat_template = TEMPLATE
    try:
        assert problems(config(), llama(tok, 512), tok) == []
        tok.chat_template = SKEWED
        (found,) = problems(config(), llama(tok, 512), tok)
        assert "renders a prompt differently alone than at the start of its conversation" in found
        assert found.endswith("or set model.chat_template=false (plain text)")
        assert problems(config("model.chat_template=false"), llama(tok, 512), tok) == []  # the template dropped
        tok.chat_template = "{{ raise_exception('system message required') }}"
        (found,) = problems(config(), llama(tok, 512), tok)
        assert "fails on one user message and its answer (system message required)" in found
    finally:
        tok.chat_template = None


def test_a_chat_template_must_leave_room_for_the_prompt(tok):
    tok.chat_template = TEMPLATE
    try:
        found = problems(config("ppo.max_prompt_tokens=3", "sft.max_length=6"), llama(tok, 512), tok)
        assert mentioned(found, "ppo.max_prompt_tokens=3 leaves no room", "sft.max_length=6 leaves no room") == {
            "ppo.max_prompt_tokens=3 leaves no room": True,
            "sft.max_length=6 leaves no room": True,
        }, found
    finally:
        tok.chat_template = None


def test_the_self_evaluation_reward_is_held_to_the_model(tok):
    """Judged by the SFT model (judge=reference): its question fits the context, its answers are one token each."""
    self_eval = ("ppo.reward_fn=components.training.self_eval:SelfEvalReward",)
    found = problems(config(*self_eval), llama(tok, 150), tok)
    assert mentioned(found, "ppo.self_eval.max_length=160 tokens", "ppo.self_eval.positive=' yes'") == {
        "ppo.self_eval.max_length=160 tokens": True,
        "ppo.self_eval.positive=' yes'": len(tok(" yes", add_special_tokens=False)["input_ids"]) != 1,
    }, found
    assert problems(config(), llama(tok, 150), tok) == []  # no self-evaluation: neither applies
    assert problems(config(*self_eval, "ppo.self_eval.judge=/models/judge"), llama(tok, 150), tok) == []


# ---------------------------------------------------------------------------- check_model_fits: from a directory


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """A tiny Llama with an 80-token context, saved with its tokenizer as a user's model directory."""
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("mine") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(llama(tok, 80)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_a_saved_model_is_checked_from_its_directory(saved):
    cfg = compose(["model.build_demo_base=false", f"model.name_or_path={saved}"])
    found = check_model_fits(cfg)
    assert [p.split(" ")[0] for p in found] == [
        "sft.max_length=96",
        "reward.max_length=96",
        "ppo.max_prompt_tokens",
        "2",
    ]
    assert all(f"context of 80 tokens (max_position_embeddings in {saved}/config.json)" in p for p in found), found
    fits = ("sft.max_length=80", "reward.max_length=80", "ppo.max_prompt_tokens=56", "gate.max_new_tokens=8")
    assert check_model_fits(compose([*cfg.overrides, *fits])) == []


def test_a_directory_that_is_not_a_model_is_one_sentence(tmp_path, saved):
    missing = tmp_path / "nowhere" / "model"
    assert check_model_fits(config(f"model.name_or_path={missing}")) == [
        f"model.name_or_path={missing}: no such directory; name a directory saved with save_pretrained"
    ]
    (found,) = check_model_fits(config(f"model.name_or_path={tmp_path}"))
    assert found.startswith(f"{tmp_path} has no config.json")
    unsafe = tmp_path / "bin"
    unsafe.mkdir()
    (unsafe / "config.json").write_text((saved / "config.json").read_text())
    (found,) = check_model_fits(config(f"model.name_or_path={unsafe}"))
    assert found.startswith(f"{unsafe} has no *.safetensors weights")


def test_a_hub_id_is_read_from_the_local_cache_or_named(tmp_path, saved, monkeypatch):
    """acme/tiny in the cache (as `hf download` leaves it) is checked like a directory; acme/other is not there."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in saved.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text(commit)
    found = check_model_fits(config("model.name_or_path=acme/tiny"))
    assert found and all("(max_position_embeddings in acme/tiny/config.json)" in p for p in found), found
    (found,) = check_model_fits(config("model.name_or_path=acme/other"))
    assert found.startswith("model.name_or_path=acme/other is neither a directory here nor a hub id in the local")
    assert "hf download acme/other" in found


def test_the_demo_base_is_not_read_from_disk():
    """It is built from the config itself: no model directory to read (name_or_path "tiny" is its cache name)."""
    cfg = compose(["model=tiny"])
    assert cfg.model.build_demo_base and check_model_fits(cfg) == []
