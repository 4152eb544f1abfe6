"""Batched sampling from a causal LM (plain or peft): left-padded prompts, KV cache, stop at EOS.

Used by PPO rollouts, evaluation and the served model, so all three generate the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.models.chat import render_prompt

CACHES = ("dynamic", "static")  # KV caches `sample_from` can generate with
STATIC_BUCKET = 64  # a static cache's prompts are left-padded to a multiple of this: one compiled shape per bucket


@dataclass
class Rollout:
    query: torch.Tensor  # (B, Tq) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, Tq)
    response: torch.Tensor  # (B, Tr) sampled ids; pad after EOS
    response_mask: torch.Tensor  # (B, Tr) 1 up to and including EOS
    ended: torch.Tensor  # (B,) bool: the response emitted EOS within max_new_tokens
    texts: list[str]  # decoded responses (special tokens dropped, stripped)

    @property
    def sequence(self) -> torch.Tensor:  # (B, Tq + Tr)
        return torch.cat([self.query, self.response], dim=1)

    @property
    def sequence_mask(self) -> torch.Tensor:  # (B, Tq + Tr)
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def select(self, idx: torch.Tensor) -> Rollout:
        ids = idx.tolist()
        return Rollout(
            self.query[idx],
            self.query_mask[idx],
            self.response[idx],
            self.response_mask[idx],
            self.ended[idx],
            [self.texts[i] for i in ids],
        )


def encode_prompts(tok, prompts: list[str], max_prompt_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids (keeping the *end* of an over-long prompt; with a chat template, of the rendered
    prompt: components/models/chat.py): -> (B, Tq) ids, mask."""
    ids = [
        tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"][-max_prompt_tokens:] or [tok.eos_token_id]
        for p in prompts
    ]
    return left_pad(ids, tok.pad_token_id, device)


def left_pad(ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded (B, T) ids and mask."""
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, T - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, T - len(x) :] = 1
    return input_ids.to(device), mask.to(device)


def response_mask(response: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS, 0 after: (B, Tr) -> mask (B, Tr), ended (B,)."""
    is_eos = response == eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long(), is_eos.any(1)


@torch.no_grad()
def sample(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int = 64,
    do_sample: bool = True,
    cache: str = "dynamic",
) -> Rollout:
    """Sample one response per prompt. `temperature`/`top_p` as in transformers; top_k is off so the
    sampling distribution is exactly softmax(logits / temperature) (what PPO's log-probs assume). `cache`: see
    `sample_from`."""
    device = next(model.parameters()).device
    query, qmask = encode_prompts(tok, prompts, max_prompt_tokens, device)
    return sample_from(model, tok, query, qmask, max_new_tokens, temperature, top_p, do_sample, cache)


@torch.no_grad()
def sample_from(
    model,
    tok,
    query: torch.Tensor,
    qmask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    cache: str = "dynamic",
) -> Rollout:
    """`sample` from left-padded ids: query (B, Tq), qmask (B, Tq) -> Rollout.

    cache: "dynamic" (transformers' default KV cache, grown each step) or "static" (preallocated to the whole
    length: fixed shapes, so on CUDA transformers compiles the decode step and replays it as a CUDA graph; on CPU
    it runs eagerly). The same draws either way (tests/training/test_ppo.py holds them equal). With a static
    cache the prompts are left-padded further, to a multiple of STATIC_BUCKET, for generating only: every new
    prompt length would otherwise compile again (measured on an H200: 30-50 s per new length, and torch gives up
    compiling after 8); the Rollout keeps the ids as given."""
    from transformers import GenerationConfig

    if cache not in CACHES:
        raise ValueError(f"generation cache {cache!r}: expected one of {', '.join(CACHES)}")
    device = query.device
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        use_cache=True,
        cache_implementation=None if cache == "dynamic" else cache,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    was_training = model.training
    model.eval()
    ids, mask = query, qmask
    if cache == "static" and query.shape[1] % STATIC_BUCKET:
        extra = STATIC_BUCKET - query.shape[1] % STATIC_BUCKET  # (B, Tq) -> (B, Tq + extra), masked out
        ids = torch.cat([query.new_full((len(query), extra), tok.pad_token_id), query], dim=1)
        mask = torch.cat([qmask.new_zeros((len(query), extra)), qmask], dim=1)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    if was_training:
        model.train()
    response = out[:, ids.shape[1] :]
    if response.shape[1] == 0:  # every row stopped at once: keep one (EOS/pad) column
        response = torch.full((len(query), 1), tok.eos_token_id, dtype=torch.long, device=device)
    rmask, ended = response_mask(response, tok.eos_token_id)
    response = torch.where(rmask.bool(), response, torch.full_like(response, tok.pad_token_id))
    texts = [t.strip() for t in tok.batch_decode(response, skip_special_tokens=True)]
    return Rollout(query, qmask, response, rmask, ended, texts)
