"""Scoring text with a model, shared by training (reward model, PPO) and evaluation:

- `encode`: prompt + response + EOS as right-padded ids, the input of a scalar head (reward model).
- `logprobs_of`: token log-probs of a response under logits; `kl_k1`: the per-token KL estimate from them.
- `load_reward_fn`: a reward / judge callable named by import path ("package.module:function").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from components.models.chat import prompt_and_response


def encode(tok, prompts: list[str], responses: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + " " + response + EOS (with a chat template: the rendered prompt + response + EOS,
    components/models/chat.py), truncated to max_length from the left (the prompt's start goes first, the response
    and EOS stay: a reward model scores at the last token, and a cut response would score every candidate of a long
    prompt alike), right-padded: -> (B, T) x2."""
    ids = [
        tok(prompt_and_response(tok, p, r), add_special_tokens=False)["input_ids"][-(max_length - 1) :]
        + [tok.eos_token_id]
        for p, r in zip(prompts, responses, strict=True)
    ]
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


CHUNK_ELEMENTS = 2**26  # fp32 logits worked on at once without autograd: 256 MB (a 152k vocabulary: 441 positions)


def row_chunks(logits: torch.Tensor, chunk_rows: int | None = None) -> list[torch.Tensor]:
    """The positions of (..., V) logits as (n, V) pieces to upcast one at a time. With autograd the fp32 copy is
    saved for the backward whatever the chunking, so one piece; without it (scoring, evaluation), pieces of
    CHUNK_ELEMENTS (or `chunk_rows` rows): the peak is one piece's fp32 copy, not the whole batch's."""
    flat = logits.reshape(-1, logits.shape[-1])
    if chunk_rows is None:
        grad = torch.is_grad_enabled() and logits.requires_grad
        chunk_rows = flat.shape[0] if grad else max(1, CHUNK_ELEMENTS // logits.shape[-1])
    return list(flat.split(chunk_rows))


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_rows: int | None = None
) -> torch.Tensor:
    """log softmax(logits / temperature) at the given tokens, in fp32 whatever the logits' dtype:
    (B, T, V), (B, T) -> (B, T) fp32. A bf16 log-prob is off by up to ~0.03 nats at |log p| ~ 8, more than a PPO
    step moves it, so the ratio, the KL and the clip fraction would be rounding noise. Without autograd the
    vocabulary is upcast a few positions at a time (`row_chunks`)."""
    chunks = row_chunks(logits, chunk_rows)
    picked = tokens.reshape(-1, 1).split([len(c) for c in chunks])
    out = []
    for c, t in zip(chunks, picked, strict=True):
        c = c.float() / temperature  # (n, V) fp32
        out.append(c.gather(-1, t).squeeze(-1) - torch.logsumexp(c, dim=-1))
    return torch.cat(out).reshape(tokens.shape)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(policy || ref) on samples from the policy: log p - log q. (B, T)"""
    return logprobs - ref_logprobs


def load_reward_fn(path: str | None) -> Callable[[list[str], list[str]], list[float]] | None:
    """`package.module:function` -> the function (called as fn(prompts, responses) -> scores); None -> None.
    An object with a `build(ppo_cfg, model_cfg, roles)` classmethod instead (a reward that needs PPO's model,
    e.g. components.training.self_eval:SelfEvalReward) is built by PPO's `build_roles`."""
    if not path:
        return None
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"ppo.reward_fn={path!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)
