"""Guided rollouts for PPO: RL with guided feedback (RLGF; Chang, Brantley, Ramamurthy, Misra & Sun 2023,
"Learning to Generate Better Than Your LLM"; their code: Cornell-RL/tril).

A guide LLM (components/models/guide.py: text in, continuation out) takes part in a PPO batch in two ways.
Each rollout of the batch is one of (`ppo.guide`, shares drawn exactly: `assign_kinds`):

    POLICY   the policy writes the whole response: plain PPO.
    ROLLIN   PPO++: the guide writes the first h tokens, h ~ U{0..max_rollin_tokens}, then the policy goes on
             from that state. PPO then optimises  E_{s ~ d_mix}[ V^{pi}(s) ]  from a restart distribution that
             mixes the guide's states into the policy's (RLGF's PPO++; TRIL ppo_pp.py + RollinProcessor in
             utils/logit_processors.py). The guide's tokens join the query, so they carry no loss, no KL, no
             value and no advantage: only the policy's own tokens do.
    ROLLOUT  AggreVaTeD (Sun et al. 2017) / D2LOLS: the policy writes its response, it keeps its first t tokens
             (t uniform over word boundaries, 1 <= t < length), and the guide completes it from there. The
             reward R of prompt + policy[:t] + completion is a one-sample estimate of Q^{pi_g}(s, a) at the
             policy's last kept token a = a_{t-1}, so the policy's tokens before the cut are credited with
             the guide's advantage

                 AggreVaTeD:  grad = E[ sum_{j<t} grad log pi(a_j|s_j) * A^{pi_g}_j ],  A^{pi_g} by GAE over
                              policy[:t] with R at its last token (TRIL aggrevated.py: the update is on the
                              roll-in part, the guide's part is masked out);
                 D2LOLS:      the LOLS mixture (Chang et al. 2015) of the guide's and the policy's advantage,
                              A_j = beta * A^{pi_g}_j + (1 - beta) * A^{pi}_j for j < t and A^{pi}_j after, with
                              A^{pi} PPO's own GAE of the policy's full response (ppo_math.lols_mix), and roll-outs
                              only in the first `rollout_iterations` iterations, PPO++ after (TRIL d2lols.py's tau).

The random choices (kinds, h, t) come from their own torch.Generator, and a guide samples under a forked
RNG: with both probabilities 0 no draw is made and PPO is plain PPO, bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from components.config import PPOConfig
from components.models.generation import Rollout, left_pad, sample, sample_from
from components.models.guide import Guide
from components.models.roles import Roles, lora_merged

POLICY, ROLLIN, ROLLOUT = 0, 1, 2
ADVANTAGES = ("aggrevated", "d2lols")
GUIDE_STREAM = 10**12  # the guide's generator seeds start here: disjoint from the minibatch order's (ppo.py)


@dataclass
class Guidance:
    """What the guide did in one batch. B = rollouts."""

    kinds: torch.Tensor  # [B] long: POLICY | ROLLIN | ROLLOUT
    guide_tokens: torch.Tensor  # [B] long: tokens the guide wrote (roll-in prefix, roll-out completion)
    cut: torch.Tensor  # [B] long: roll-out rows: policy tokens kept before the guide took over; 0 elsewhere
    rows: torch.Tensor  # [R] the roll-out rows, in batch order
    completed: Rollout | None  # [R] prompt + policy[:t] + the guide's completion: what the reward scores


def check_config(cfg: PPOConfig) -> None:
    """Refuse a guide config that cannot work, before any model loads."""
    g = cfg.guide
    for name in ("rollin_prob", "rollout_prob", "lols_beta"):
        if not 0.0 <= getattr(g, name) <= 1.0:
            raise ValueError(f"ppo.guide.{name}={getattr(g, name)} must be in [0, 1]")
    if g.rollin_prob + g.rollout_prob > 1.0:
        raise ValueError(
            f"ppo.guide.rollin_prob + rollout_prob = {g.rollin_prob + g.rollout_prob} > 1: a rollout is one of "
            "policy alone, roll-in or roll-out"
        )
    if g.model is None and (g.rollin_prob or g.rollout_prob):
        raise ValueError(
            "ppo.guide.rollin_prob/rollout_prob are set but ppo.guide.model is not: set it to `reference`, a "
            "model dir, an MLflow model URI or a served model's URL"
        )
    if g.rollout_advantage not in ADVANTAGES:
        raise ValueError(f"ppo.guide.rollout_advantage={g.rollout_advantage!r}: expected one of {ADVANTAGES}")
    if g.rollin_prob and not 0 <= g.max_rollin_tokens < cfg.max_new_tokens:
        raise ValueError(
            f"ppo.guide.max_rollin_tokens={g.max_rollin_tokens} must be in 0..ppo.max_new_tokens-1 "
            f"({cfg.max_new_tokens - 1}): the policy must write at least one token"
        )


# ---------------------------------------------------------------------------- the random choices (pure)


def assign_kinds(n: int, rollin_prob: float, rollout_prob: float, generator: torch.Generator) -> torch.Tensor:
    """-> [n] kinds. Each share is n * prob rounded stochastically (so its expectation is exact and it is
    never off by a whole row), the rows drawn at random. No draw at all when both probabilities are 0."""
    kinds = torch.full((n,), POLICY, dtype=torch.long)
    if not (rollin_prob or rollout_prob):
        return kinds
    u = torch.rand(2, generator=generator)
    n_in = min(n, int(n * rollin_prob + u[0].item()))
    n_out = min(n - n_in, int(n * rollout_prob + u[1].item()))
    order = torch.randperm(n, generator=generator)
    kinds[order[:n_in]] = ROLLIN
    kinds[order[n_in : n_in + n_out]] = ROLLOUT
    return kinds


def rollin_lengths(kinds: torch.Tensor, max_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[B] kinds -> [B] h: uniform in 0..max_tokens on roll-in rows, 0 elsewhere."""
    h = torch.randint(0, max_tokens + 1, kinds.shape, generator=generator)
    return torch.where(kinds == ROLLIN, h, torch.zeros_like(h))


def cut_points(allowed: torch.Tensor, kinds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, T] allowed cut positions, [B] kinds -> [B] t: uniform over the allowed positions on roll-out rows;
    0 (no roll-out) on other rows and where no position is allowed."""
    rows = (kinds == ROLLOUT) & allowed.any(1)
    t = torch.zeros(kinds.shape, dtype=torch.long)
    if rows.any():
        t[rows] = torch.multinomial(allowed[rows].float(), 1, generator=generator).squeeze(1)
    return t


@functools.lru_cache(maxsize=4)
def word_starts(tok, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the token begins a word (byte-level BPE `Ġ`, SentencePiece `▁`, a leading space) or is
    EOS. A cut there hands the guide whole words. A tokenizer with no such marks: every token. Ids past the
    tokenizer (a model's padded vocabulary) never begin one. Cached: once per tokenizer."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    starts = torch.zeros(max(vocab_size, len(tok)), dtype=torch.bool)
    starts[: len(tok)] = torch.tensor([bool(p) and p[0] in ("Ġ", "▁", " ") for p in pieces])
    if not starts.any():
        starts[: len(tok)] = True
    starts[tok.eos_token_id] = True
    return starts


def allowed_cuts(ro: Rollout, starts: torch.Tensor) -> torch.Tensor:
    """[B, Tr] bool: t >= 1, inside the response (EOS included), and token t begins a word."""
    ok = starts.to(ro.response.device)[ro.response] & ro.response_mask.bool()
    ok[:, 0] = False
    return ok.cpu()


# ---------------------------------------------------------------------------- rollouts


@torch.no_grad()
def rollouts(
    roles: Roles, guide: Guide | None, prompts: list[str], cfg: PPOConfig, iteration: int, seed: int
) -> tuple[Rollout, Guidance | None]:
    """Step 1 of a PPO iteration: one response per prompt from the policy, with the guide's roll-ins and
    roll-outs when `ppo.guide` asks for them. -> the policy's rollout (a roll-in's prefix in its query),
    and what the guide did (None without a guide)."""
    args = (cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if guide is None:
        with lora_merged(roles.model):  # sampling only: one matmul per adapted layer
            return sample(
                roles.model, roles.tok, prompts, *args, cfg.max_prompt_tokens, cache=cfg.generation_cache
            ), None
    g, tok = cfg.guide, roles.tok
    gen = torch.Generator().manual_seed(GUIDE_STREAM + seed * 100_003 + iteration)
    rollout_on = g.rollout_iterations is None or iteration < g.rollout_iterations
    kinds = assign_kinds(len(prompts), g.rollin_prob, g.rollout_prob if rollout_on else 0.0, gen)
    h = rollin_lengths(kinds, g.max_rollin_tokens, gen)
    guide_seeds = torch.randint(0, 2**31 - 1, (2,), generator=gen).tolist()  # its sampling: a stream of its own
    # what the policy sees of each prompt (its end, max_prompt_tokens), as text: what the guide is shown
    # (the cut as generation.encode_prompts makes it; each prompt tokenised once)
    whole = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prompt_ids = [ids[-cfg.max_prompt_tokens :] or [tok.eos_token_id] for ids in whole]
    shown = [
        p if len(ids) <= cfg.max_prompt_tokens else tok.decode(tail).strip()
        for p, ids, tail in zip(prompts, whole, prompt_ids, strict=True)
    ]

    # roll-in: the guide writes the first h tokens; the policy continues within the same response budget
    if (h > 0).any():
        prefixes = guide_prefixes(guide, tok, shown, h, g.max_rollin_tokens, guide_seeds[0])
        device = next(roles.model.parameters()).device
        query, qmask = left_pad([p + x for p, x in zip(prompt_ids, prefixes, strict=True)], tok.pad_token_id, device)
        with lora_merged(roles.model):
            ro = sample_from(roles.model, tok, query, qmask, *args, cache=cfg.generation_cache)
        written = torch.tensor([len(x) for x in prefixes])
        ro = truncate(ro, cfg.max_new_tokens - written, tok)
        ro.texts = [
            tok.decode(x + ro.response[i][ro.response_mask[i].bool()].tolist(), skip_special_tokens=True).strip()
            for i, x in enumerate(prefixes)
        ]
    else:
        with lora_merged(roles.model):
            ro = sample(roles.model, tok, prompts, *args, cfg.max_prompt_tokens, cache=cfg.generation_cache)
        written = torch.zeros(len(prompts), dtype=torch.long)

    # roll-out: cut the policy's response at a word boundary, the guide completes it
    vocab = roles.model.get_output_embeddings().weight.shape[0]
    cut = cut_points(allowed_cuts(ro, word_starts(tok, vocab)), kinds, gen)
    kinds = torch.where((kinds == ROLLOUT) & (cut == 0), torch.full_like(kinds, POLICY), kinds)
    rows = torch.nonzero(cut > 0).squeeze(1)
    completed = None
    if len(rows):
        completed, tokens = complete(
            guide, tok, ro, [shown[i] for i in rows.tolist()], rows, cut[rows], cfg, guide_seeds[1]
        )
        written[rows] = tokens
    return ro, Guidance(kinds, written, cut, rows, completed)


def guide_prefixes(
    guide: Guide, tok, prompts: list[str], h: torch.Tensor, max_tokens: int, seed: int
) -> list[list[int]]:
    """The guide's first h[i] tokens (in the policy's tokenizer) after each prompt; [] where h is 0."""
    rows = torch.nonzero(h > 0).squeeze(1).tolist()
    texts = guide.complete([prompts[i] for i in rows], max_tokens, seed)
    out: list[list[int]] = [[] for _ in prompts]
    for i, text in zip(rows, texts, strict=True):
        out[i] = tok(" " + text, add_special_tokens=False)["input_ids"][: int(h[i])] if text else []
    return out


def complete(
    guide: Guide, tok, ro: Rollout, prompts: list[str], rows: torch.Tensor, cut: torch.Tensor, cfg: PPOConfig, seed: int
) -> tuple[Rollout, torch.Tensor]:
    """The guide completes prompt + policy[:t] within the response budget (max_new_tokens - t). ->
    [R] rollout of prompt + policy[:t] + completion (+ EOS when the guide stopped on its own), and [R]
    the guide's token counts."""
    kept = [ro.response[i, : int(t)].tolist() for i, t in zip(rows.tolist(), cut, strict=True)]
    contexts = [f"{p} {tok.decode(k, skip_special_tokens=True).strip()}" for p, k in zip(prompts, kept, strict=True)]
    budget = cfg.max_new_tokens - cut
    texts = guide.complete(contexts, int(budget.max()), seed)
    responses, ended, tokens = [], [], []
    for k, text, b in zip(kept, texts, budget.tolist(), strict=True):
        ids = tok(" " + text, add_special_tokens=False)["input_ids"] if text else []
        # the guide ended before the budget: it ends with EOS, as a sampled response does. (A black box says
        # only its text; re-tokenised, a completion that hit the guide's own limit can come out a token short.)
        stopped = len(ids) < b
        tokens.append(min(len(ids), b))
        responses.append(k + ids[:b] + ([tok.eos_token_id] if stopped else []))
        ended.append(stopped)
    device = ro.response.device
    T = max(len(r) for r in responses)
    response = torch.full((len(responses), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(responses), T), dtype=torch.long)
    for i, r in enumerate(responses):
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    texts_out = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
    completed = Rollout(
        ro.query[rows],
        ro.query_mask[rows],
        response.to(device),
        mask.to(device),
        torch.tensor(ended, device=device),
        texts_out,
    )
    return completed, torch.tensor(tokens)


def truncate(ro: Rollout, budget: torch.Tensor, tok) -> Rollout:
    """Each row's response cut to its budget [B] of tokens (a sample of fewer tokens: the same distribution
    over the first ones): padding after, `ended` only when EOS falls within the budget."""
    device = ro.response.device
    keep = torch.arange(ro.response.shape[1], device=device)[None, :] < budget.to(device)[:, None]
    mask = ro.response_mask * keep.long()
    response = torch.where(mask.bool(), ro.response, torch.full_like(ro.response, tok.pad_token_id))
    ended = ((response == tok.eos_token_id) & mask.bool()).any(1)
    return Rollout(ro.query, ro.query_mask, response, mask, ended, ro.texts)
