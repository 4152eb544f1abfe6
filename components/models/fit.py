"""Does a model the user brings fit the config? Checked before any model loads, one sentence per problem.

A model of the user's own (`rlhf init --model DIR`: model.name_or_path=DIR, model.build_demo_base=false) comes with
its own vocabulary and context length, and every size-dependent default was set on the demo base (128 positions).
What each stage puts through the model at most, in tokens (`budgets`), must fit the model's context:

    sft.max_length                                          SFT's examples (TRL cuts them there)
    reward.max_length                                       the reward model's prompt + response + EOS
    ppo.max_prompt_tokens + ppo.max_new_tokens              rollouts, PPO-ptx's demonstrations, every policy
                                                            stage's held-out sampling, the `reference` guide
      + 1                                                   policy=rejection_sampling: its fine-tuning
    ppo.max_prompt_tokens + policy.<dpo|kto>.max_response_tokens    policy=dpo | kto: each judged response
    2 x gate.max_new_tokens + EVAL_PROMPT_TOKENS            the evaluation's scoring (components/evaluation/evaluate.py)
    ppo.self_eval.max_length                                the self-evaluation reward, judged by the SFT model

The model's vocabulary: its tokenizer needs an EOS token (every response ends with it, and it pads where the
tokenizer has no pad token: `loading.load_tokenizer`), and no id past the embedding's `vocab_size` rows. A chat
template (model.chat_template=true and the tokenizer has one) must render a user message, render it as the start of
the whole conversation (SFT trains on the conversation, the other stages read the rendered prompt + response:
components/models/chat.py), and leave room for the prompt in ppo.max_prompt_tokens and sft.max_length.

`problems(cfg, model_config, tokenizer)` is pure: the transformers config and tokenizer already loaded in, sentences
out. `check_model_fits(cfg)` loads those two (no weights, nothing downloaded) from model.name_or_path first. The
demo base (model.build_demo_base=true) is not checked: it is built from the config itself, its context
model.max_position_embeddings (`length_problems` takes any context, that one included).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import Config, ModelConfig

# generation.sample's default prompt window, which the evaluation samples with (it passes no max_prompt_tokens), and
# the constant of its scoring length 2 x gate.max_new_tokens + 64 (components/evaluation/evaluate.py)
EVAL_PROMPT_TOKENS = 64
# where a transformers config states its context length (GPT-2 also answers max_position_embeddings, through its
# attribute_map, for n_positions); the first one set is the model's
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
TOKENIZER = "tokenizer"  # context_length's source when only the tokenizer states one
UNSET = 10**9  # a tokenizer's model_max_length at or above this is transformers' "no limit" (int(1e30))
SELF_EVAL = "components.training.self_eval:SelfEvalReward"
PROBE_PROMPT, PROBE_RESPONSE = "How are you?", "Fine, thanks."  # what a chat template's overhead is measured around


@dataclass(frozen=True)
class Budget:
    """The most tokens one use of the model takes, from config keys: "ppo.max_prompt_tokens + ppo.max_new_tokens"
    = "64 + 24" = 88 tokens."""

    keys: str  # the expression in config keys
    values: str  # the same with their values
    tokens: int  # its value: tokens in one sequence
    reads: str  # what takes this many tokens
    fix: str  # what to set for it to fit the context `budgets` was given


def budgets(cfg: Config, context: int) -> list[Budget]:
    """The token budgets of the stages `cfg` runs (every retrain runs SFT, the reward model, its policy algorithm and
    the evaluation), one per set of keys (the larger where two stages share them), each with what to set for it to
    fit a context of `context` tokens."""
    ppo, algorithm = cfg.ppo, cfg.policy.algorithm

    def one(key: str, value: int, reads: str) -> Budget:
        return Budget(key, str(value), value, reads, f"set {key}={context} or less")

    def pair(key: str, value: int, extra: int, reads: str) -> Budget:  # ppo.max_prompt_tokens + key (+ extra)
        room = context - extra
        example = f" (e.g. ppo.max_prompt_tokens={room - value})" if room - value >= 1 else ""
        plus = f" + {extra}" if extra else ""
        return Budget(
            f"ppo.max_prompt_tokens + {key}{plus}",
            f"{ppo.max_prompt_tokens} + {value}{plus}",
            ppo.max_prompt_tokens + value + extra,
            reads,
            f"lower them to at most {room} together{example}",
        )

    rollouts = "rollouts and held-out samples, prompt + response"
    out = [
        one("sft.max_length", cfg.sft.max_length, "SFT's examples"),
        one("reward.max_length", cfg.reward.max_length, "the reward model's prompt + response + EOS"),
        pair("ppo.max_new_tokens", ppo.max_new_tokens, 1, f"rejection sampling's {rollouts} + EOS")
        if algorithm == "rejection_sampling"  # its fine-tuning adds the EOS to the longest rollout
        else pair("ppo.max_new_tokens", ppo.max_new_tokens, 0, f"the policy stage's {rollouts}"),
    ]
    if algorithm in ("dpo", "kto"):
        response = getattr(cfg.policy, algorithm).max_response_tokens
        out.append(
            pair(f"policy.{algorithm}.max_response_tokens", response, 0, f"{algorithm.upper()}'s prompt + response")
        )
    answer = (context - EVAL_PROMPT_TOKENS) // 2
    out.append(
        Budget(
            f"2 x gate.max_new_tokens + {EVAL_PROMPT_TOKENS}",
            f"2 x {cfg.gate.max_new_tokens} + {EVAL_PROMPT_TOKENS}",
            2 * cfg.gate.max_new_tokens + EVAL_PROMPT_TOKENS,
            "the evaluation's scored prompt + answer",
            f"set gate.max_new_tokens={answer} or less"
            if answer >= 1
            else f"the evaluation's {EVAL_PROMPT_TOKENS}-token prompts leave no room for an answer in this context",
        )
    )
    if ppo.reward_fn == SELF_EVAL and ppo.self_eval.judge == "reference":  # another judge is another model
        out.append(one("ppo.self_eval.max_length", ppo.self_eval.max_length, "the self-evaluation reward's question"))
    return out


def length_problems(cfg: Config, context: int, source: str) -> list[str]:
    """One sentence per budget over a context of `context` tokens (`source`: where that number was read)."""
    out = []
    for b in budgets(cfg, context):
        if b.tokens <= context:
            continue
        sum_of = f"{b.keys}={b.tokens}" if " " not in b.keys else f"{b.keys} = {b.values} = {b.tokens}"
        out.append(f"{sum_of} tokens ({b.reads}) exceed the model's context of {context} tokens ({source}): {b.fix}")
    return out


def context_length(model_config: Any, tokenizer: Any) -> tuple[int | None, str]:
    """The model's context length in tokens and where it was read: its config's first CONTEXT_ATTRIBUTES entry
    (named as in config.json: "n_positions"), else TOKENIZER (its model_max_length); (None, "") when neither states
    one (a model without positions: nothing to check)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    aliases = getattr(text, "attribute_map", {}) or {}
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(text, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, aliases.get(attribute, attribute)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < UNSET:
        return limit, TOKENIZER
    return None, ""


def vocabulary_problems(model_config: Any, tokenizer: Any, where: str) -> list[str]:
    """The tokenizer against what every stage needs of it and the embedding it indexes."""
    out = []
    if tokenizer.eos_token_id is None:
        out.append(
            f"the tokenizer of {where} has no EOS token: every stage ends a response with it (and pads with it where "
            "there is no pad token); set one (tokenizer.eos_token = ...) and save the tokenizer there again"
        )
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    rows = getattr(text, "vocab_size", None)
    ids = {"tokens": len(tokenizer) - 1, "EOS": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    over = {name: i for name, i in ids.items() if isinstance(i, int) and isinstance(rows, int) and i >= rows}
    if over:
        what = f"{len(tokenizer)} tokens" if "tokens" in over else " and ".join(f"{k} id {v}" for k, v in over.items())
        out.append(
            f"the tokenizer of {where} has {what}, past the model's vocab_size of {rows} embedding rows (config.json): "
            "use the tokenizer saved with these weights, or resize the embeddings to it and save the model again"
        )
    if not isinstance(getattr(model_config, "hidden_size", None), int):
        out.append(
            f"the config.json of {where} states no hidden_size, which the reward model's and PPO's value heads are "
            "sized by: use a causal LM whose config has one"
        )
    return out


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_problems(cfg: Config, tokenizer: Any, where: str) -> list[str]:
    """A chat template the stages would use (model.chat_template and the tokenizer has one): it renders, the rendered
    prompt starts the rendered conversation, and the tokens it adds leave room for the prompt."""
    if not (cfg.model.chat_template and getattr(tokenizer, "chat_template", None)):
        return []
    off = "or set model.chat_template=false (plain text)"
    user = [{"role": "user", "content": PROBE_PROMPT}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": PROBE_RESPONSE}], tokenize=False)
    except Exception as e:  # a template is a program of the model's: any error it raises is its own
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return [
            f"the chat template of {where} fails on one user message and its answer ({first}): fix the template {off}"
        ]
    if not isinstance(prompt, str) or not isinstance(whole, str) or PROBE_PROMPT not in prompt:
        return [f"the chat template of {where} does not render a user message's text as it is: fix the template {off}"]
    out = []
    if not whole.startswith(prompt):
        out.append(
            f"the chat template of {where} renders a prompt differently alone than at the start of its conversation "
            f"(SFT trains on the conversation, the reward model and PPO read the prompt rendered alone + the "
            f"response): fix the template {off}"
        )
    after = _tokens(tokenizer, prompt[prompt.index(PROBE_PROMPT) + len(PROBE_PROMPT) :])  # the assistant's turn
    around = _tokens(tokenizer, whole) - _tokens(tokenizer, PROBE_PROMPT) - _tokens(tokenizer, PROBE_RESPONSE)
    for key, value, used, kept in (
        ("ppo.max_prompt_tokens", cfg.ppo.max_prompt_tokens, after, "after each prompt, and a prompt keeps its end"),
        ("sft.max_length", cfg.sft.max_length, around, "to each example, and SFT keeps an example's start"),
    ):
        if used >= value:
            out.append(
                f"{key}={value} leaves no room for the prompt: the chat template of {where} adds {used} tokens "
                f"{kept}; raise {key} above {used} {off}"
            )
    return out


def problems(cfg: Config, model_config: Any, tokenizer: Any, where: str | None = None) -> list[str]:
    """Why `cfg` cannot train the model whose transformers config and tokenizer (as loaded, before
    `loading.load_tokenizer`'s pad and template settings) are given: one sentence each, [] when it fits.
    `where`: how the sentences name the model (model.name_or_path)."""
    where = where or cfg.model.name_or_path
    out = vocabulary_problems(model_config, tokenizer, where) + template_problems(cfg, tokenizer, where)
    context, source = context_length(model_config, tokenizer)
    if context is not None:
        read = "model_max_length in the tokenizer of" if source == TOKENIZER else f"{source} in"
        out += length_problems(cfg, context, f"{read} {where}" + ("" if source == TOKENIZER else "/config.json"))
    if cfg.ppo.reward_fn == SELF_EVAL and cfg.ppo.self_eval.judge == "reference" and tokenizer.eos_token_id is not None:
        from components.training.self_eval import verdict_token_ids

        try:
            verdict_token_ids(tokenizer, cfg.ppo.self_eval)  # each answer one token of the judge's (this) tokenizer
        except ValueError as e:
            out.append(str(e))
    return out


# ---------------------------------------------------------------------------- loading (I/O)

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # what a hub id looks like: name or owner/name


def _offline() -> bool:
    """Whether nothing may be downloaded: HF_HUB_OFFLINE, which `rlhf` sets to 1 unless the environment says 0."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().upper() in ("1", "ON", "YES", "TRUE")


def model_dir(m: ModelConfig) -> tuple[Path | None, str | None]:
    """The local directory model.name_or_path names (a directory, or a hub id's snapshot in the local Hugging Face
    cache), or why there is none in one sentence; (None, None): a hub id not cached where downloads are allowed."""
    name = m.name_or_path
    local = Path(name).expanduser()
    if local.is_dir():
        return local, None
    if local.exists():
        return (
            None,
            f"model.name_or_path={name} is a file: name the model's directory (config.json, tokenizer, weights)",
        )
    if not HUB_ID.fullmatch(name):
        return None, f"model.name_or_path={name}: no such directory; name a directory saved with save_pretrained"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True)), None
    except LocalEntryNotFoundError:
        if not _offline():
            return None, None  # the stage downloads it: nothing here to check it against
        return None, (
            f"model.name_or_path={name} is neither a directory here nor a hub id in the local Hugging Face cache "
            f"(HF_HOME), and nothing is downloaded (HF_HUB_OFFLINE=1): download it once with `HF_HUB_OFFLINE=0 hf "
            f"download {name}`, or set model.name_or_path to the model's directory"
        )
    except Exception as e:  # huggingface_hub's HFValidationError for a name that is no repo id (`a--b`, `a/.b`)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"model.name_or_path={name}: no such directory, and not a hub id ({first})"


def check_model_fits(cfg: Config) -> list[str]:
    """`problems` for the model model.name_or_path names, its config and tokenizer read from the local directory or
    the local Hugging Face cache (local_files_only: no weights loaded, nothing downloaded); one sentence instead
    when there is no model to read there. [] for the demo base (model.build_demo_base=true): it is built from the
    config itself (its context is model.max_position_embeddings), and for a hub id not in the cache when downloads
    are allowed (HF_HUB_OFFLINE=0: the stage downloads it)."""
    m = cfg.model
    if m.build_demo_base:
        return []
    path, missing = model_dir(m)
    if missing is not None:
        return [missing]
    if path is None:
        return []
    name = m.name_or_path
    if not (path / "config.json").is_file():
        return [f"{name} has no config.json: not a transformers model directory (save the model with save_pretrained)"]
    if not any(path.glob("*.safetensors")):
        return [
            f"{name} has no *.safetensors weights, the only ones the stages load: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        ]
    from transformers import AutoConfig, AutoTokenizer

    loaded: dict[str, Any] = {}
    for what, auto in (("config.json", AutoConfig), ("tokenizer", AutoTokenizer)):
        try:
            loaded[what] = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=m.trust_remote_code)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for what it cannot read
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return [f"the {what} of {name} does not load ({first}): save the model and its tokenizer there again"]
    return problems(cfg, loaded["config.json"], loaded["tokenizer"], where=name)
