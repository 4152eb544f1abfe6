"""Reward model stage: Bradley-Terry on preference pairs, plus a logistic loss on thumbs up/down feedback;
a LoRA adapter + scalar head on the SFT model.

Entry: `train_reward(cfg, model_cfg, sft_dir, data_dir, out_dir)` -> RewardResult (paths + metrics).

A ranking of K responses (best first) becomes its C(K,2) ordered pairs, each weighted
1/C(K,2), so one ranking counts as one example (InstructGPT, Ouyang et al. 2022, sec. 3.5;
`components.data.readers.read_preferences`). Each of the K responses is encoded once and the pairs are read
from those K scores (`score_comparisons`): K forwards instead of 2 * C(K,2), the same loss and gradient.
TRL's RewardTrainer has no per-pair weights, hence this short loop. The score of a text is
the head applied to the last token's hidden state (the EOS that closes the response).

Direct feedback (data/feedback/: a response with label 1/0, optionally a graded rating) enters through the
same score r: P(thumbs up) = sigmoid(r + b) with a learned bias b (Bradley-Terry is blind to a shift of r, so
the bias lets the feedback fix the score's zero without moving its differences), fitted by binary cross-entropy
on the row's target (the label, or the rating rescaled to [0, 1]). Per step:

    loss = BT(batch_size comparisons) + reward.feedback_weight * BCE(feedback_batch_size feedback rows)

each term the mean over its own examples; with only one kind of data, that term alone. Held out per kind:
`rm/eval_accuracy` (comparisons) and `rm/feedback_auc`, `rm/feedback_accuracy`, `rm/feedback_loss` (feedback).

Output (`out_dir`): `adapter/` (peft, safetensors), `head.safetensors` + `head.json` with the
reward mean/std over training responses (PPO normalises with them) and the base it was
trained on; `COMPLETE.json` once all of it is written (`checkpoint.is_complete(out_dir)`).
Checkpoints every `save_steps` under `out_dir/checkpoints`, resumed when the stage is restarted
with the same config and inputs.

Data parallel (`infra.num_processes` > 1, components/training/distributed.py): each rank takes its share of every
step's `batch_size` comparisons and `feedback_batch_size` feedback rows, the gradients are averaged over the ranks
before the step (each example weighs 1 in its rank's loss and every rank has as many, so the average is the whole
batch's gradient), and rank 0 alone evaluates, logs and writes checkpoints and outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from components.config import DataConfig, ModelConfig, RewardConfig
from components.data.readers import Feedback, Pair, read_feedback, read_preferences
from components.models.loading import load_causal_lm, load_tokenizer, resolve_device
from components.models.roles import (
    ENSEMBLE,
    HEAD_META,
    REWARD,
    RewardScale,
    ScalarHead,
    attach_reward_members,
    lora_config,
    member_scores,
    sequence_scores,
)
from components.models.scoring import encode
from components.training import checkpoint, distributed
from components.training.callbacks import log_to_active_run
from components.training.precision import LossScaler

if TYPE_CHECKING:  # annotations only: peft and transformers load lazily, where a stage needs them
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


@dataclass
class RewardResult:
    adapter_dir: str
    head_dir: str  # head.safetensors + head.json (reward_mean, reward_std, base)
    metrics: dict[str, float]


# ---------------------------------------------------------------------------- pure functions


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of -log sigmoid(r_chosen - r_rejected).

    r_chosen, r_rejected, weights: (P,) -> scalar. Normalised by sum(weights): the mean over
    examples, where a ranking's pairs together weigh as much as one pairwise example (all weights 0: loss 0).
    """
    return -(weights * F.logsigmoid(r_chosen - r_rejected)).sum() / weights.sum().clamp(min=1e-12)


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted share of pairs ranked correctly (a tie counts half): (P,) x3 -> scalar."""
    correct = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return (weights * correct).sum() / weights.sum()


def feedback_loss(
    scores: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy of sigmoid(score + bias) against soft targets in [0, 1]:
    -(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))), z = score + bias. scores, targets: (F,); bias: () -> scalar.
    counts (F,): each row's weight (an ensemble member's bootstrap count; None: 1 each) -> the weighted mean.
    """
    if counts is None:
        return F.binary_cross_entropy_with_logits(scores + bias, targets)
    per_row = F.binary_cross_entropy_with_logits(scores + bias, targets, reduction="none")
    return (counts * per_row).sum() / counts.sum().clamp(min=1e-12)


def bootstrap_counts(n: int, seed: int) -> torch.Tensor:
    """How often each of n training examples is drawn in a bootstrap sample (n draws with replacement): -> (n,)
    float counts summing to n; about 37% of the examples are 0 (left out), the others 1, 2, ..."""
    if n == 0:
        return torch.zeros(0)
    draws = torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.bincount(draws, minlength=n).float()


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the share of (up, down) pairs where the thumbs-up response scores higher (a tie
    counts half); nan without both labels. scores, labels: (F,)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]  # (P, N)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


# ---------------------------------------------------------------------------- model


@dataclass
class Comparisons:
    """A batch of preference examples with each distinct (prompt, response) encoded once: a ranking of K is K
    sequences and C(K,2) pairs of indices into them (the per-pair way encodes 2 * C(K,2): 30 for K = 6).
    S = distinct sequences, P = pairs."""

    prompts: list[str]  # [S]
    responses: list[str]  # [S]
    chosen: torch.Tensor  # [P] long: index of each pair's better response among the S sequences
    rejected: torch.Tensor  # [P] long: index of its worse response
    weights: torch.Tensor  # [P] 1 for a pairwise example, 1/C(K,2) for a pair of a ranking of K


def index_comparisons(examples: list[list[Pair]]) -> Comparisons:
    """Examples (each a list of weighted pairs) -> the distinct sequences and the pairs as indices into them.

    [[("p", "a", "b", 1/3), ("p", "a", "c", 1/3), ("p", "b", "c", 1/3)]] -> sequences p+a, p+b, p+c;
    chosen [0, 0, 1], rejected [1, 2, 2]
    """
    index: dict[tuple[str, str], int] = {}
    chosen, rejected, weights = [], [], []
    for ex in examples:
        for p in ex:
            chosen.append(index.setdefault((p.prompt, p.chosen), len(index)))
            rejected.append(index.setdefault((p.prompt, p.rejected), len(index)))
            weights.append(p.weight)
    return Comparisons(
        [p for p, _ in index],
        [r for _, r in index],
        torch.tensor(chosen, dtype=torch.long),
        torch.tensor(rejected, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float),
    )


def example_chunks(examples: list[list[Pair]], max_sequences: int) -> list[list[list[Pair]]]:
    """Consecutive examples grouped so that each group has at most `max_sequences` distinct sequences (an example
    with more is a group of its own): a group's pairs never reach into another group, so each group's loss and
    gradient are complete on their own (gradient accumulation)."""
    chunks: list[list[list[Pair]]] = []
    current: list[list[Pair]] = []
    seen: set[tuple[str, str]] = set()
    for ex in examples:
        texts = {(p.prompt, r) for p in ex for r in (p.chosen, p.rejected)}
        if current and len(seen | texts) > max_sequences:
            chunks.append(current)
            current, seen = [], set()
        current.append(ex)
        seen |= texts
    if current:
        chunks.append(current)
    return chunks


def score_comparisons(
    model, head, tok, examples: list[list[Pair]], max_length: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every distinct response of the examples scored once, in one forward; the pairs read from those scores:
    -> r_chosen (P,), r_rejected (P,), weights (P,), and the number of non-padding tokens scored."""
    c = index_comparisons(examples)
    ids, mask = encode(tok, c.prompts, c.responses, max_length, device)
    scores = sequence_scores(model, head, ids, mask)  # (S,)
    return scores[c.chosen.to(device)], scores[c.rejected.to(device)], c.weights.to(device), int(mask.sum())


def score_texts(model, head, tok, prompts: list[str], responses: list[str], cfg: RewardConfig, device) -> torch.Tensor:
    """Scores of prompt + response texts in micro-batches of micro_batch_size: -> (N,)."""
    out = []
    for i in range(0, len(prompts), cfg.micro_batch_size):
        ids, mask = encode(
            tok,
            prompts[i : i + cfg.micro_batch_size],
            responses[i : i + cfg.micro_batch_size],
            cfg.max_length,
            device,
        )
        out.append(sequence_scores(model, head, ids, mask))
    return torch.cat(out) if out else torch.zeros(0, device=device)


@torch.no_grad()
def evaluate_feedback(
    model, head, bias: torch.Tensor, tok, rows: list[Feedback], cfg: RewardConfig, device
) -> dict[str, float]:
    """Held-out feedback: AUC of the score against the labels, accuracy of sigmoid(score + bias) > 1/2, the loss."""
    if not rows:
        return {}
    model.eval()
    scores = score_texts(model, head, tok, [r.prompt for r in rows], [r.response for r in rows], cfg, device)
    model.train()
    labels = torch.tensor([r.label for r in rows], device=device)
    targets = torch.tensor([r.target for r in rows], device=device)
    return {
        "rm/feedback_auc": binary_auc(scores, labels),
        "rm/feedback_accuracy": (((scores + bias) > 0).long() == labels).float().mean().item(),
        "rm/feedback_loss": feedback_loss(scores, bias, targets).item(),
        "rm/feedback_bias": bias.item(),
        "rm/eval_feedback_rows": float(len(rows)),
    }


@torch.no_grad()
def evaluate_reward_model(model, head, tok, examples: list[list[Pair]], cfg: RewardConfig, device) -> dict[str, float]:
    if not examples:
        return {"rm/eval_accuracy": float("nan"), "rm/eval_examples": 0.0}
    model.eval()
    rc_parts: list[torch.Tensor] = []  # per chunk: chosen and rejected scores, pair weights
    rr_parts: list[torch.Tensor] = []
    w_parts: list[torch.Tensor] = []
    pairs = [p for ex in examples for p in ex]
    for chunk in example_chunks(examples, cfg.micro_batch_size):
        c, r, wt, _ = score_comparisons(model, head, tok, chunk, cfg.max_length, device)
        rc_parts.append(c)
        rr_parts.append(r)
        w_parts.append(wt)
    rc, rr, w = torch.cat(rc_parts), torch.cat(rr_parts), torch.cat(w_parts)
    single = w == 1.0
    model.train()
    return {
        "rm/eval_accuracy": pairwise_accuracy(rc, rr, w).item(),
        "rm/eval_accuracy_pairwise": pairwise_accuracy(rc[single], rr[single], w[single]).item()
        if single.any()
        else float("nan"),
        "rm/eval_margin": ((w * (rc - rr)).sum() / w.sum()).item(),
        "rm/eval_loss": bradley_terry_loss(rc, rr, w).item(),
        "rm/eval_examples": float(len(examples)),
        "rm/eval_pairs": float(len(pairs)),
    }


def distinct_texts(examples: list[list[Pair]], feedback: Sequence[Feedback] = ()) -> list[tuple[str, str]]:
    """The distinct (prompt, response) pairs of the examples (compared ones first), then of the feedback rows."""
    seen = dict.fromkeys((p.prompt, r) for ex in examples for p in ex for r in (p.chosen, p.rejected))
    seen.update(dict.fromkeys((f.prompt, f.response) for f in feedback))
    return list(seen)


@torch.no_grad()
def reward_stats(
    model, head, tok, examples: list[list[Pair]], cfg: RewardConfig, device, feedback: Sequence[Feedback] = ()
) -> tuple[float, float]:
    """Mean and std of the reward over (up to stats_max_responses) distinct training responses (compared ones
    first, then those with feedback)."""
    model.eval()
    texts = distinct_texts(examples, feedback)[: cfg.stats_max_responses]
    s = score_texts(model, head, tok, [p for p, _ in texts], [r for _, r in texts], cfg, device)
    model.train()
    return s.mean().item(), s.std().clamp(min=1e-6).item()


# ---------------------------------------------------------------------------- training


@dataclass
class RewardModel:
    """What the reward stage trains and the optimiser state that goes with it."""

    model: PeftModel  # LoRA adapter on the SFT model
    head: ScalarHead
    bias: torch.nn.Parameter  # () the feedback bias b: P(thumbs up) = sigmoid(score + b)
    tok: PreTrainedTokenizerBase
    params: list[torch.nn.Parameter]  # the trainable ones: LoRA weights, the head's, then the feedback bias
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    scaler: LossScaler  # fp16: loss scaling; fp32/bf16: a pass-through

    def restore(self, ckpt: Path) -> None:
        """Load a checkpoint's adapter and head weights in place (the optimizer keeps its params)."""
        checkpoint.load_adapter_weights(self.model, ckpt / "adapter")
        head, meta = ScalarHead.load(ckpt, self.device)
        self.head.load_state_dict(head.state_dict())
        with torch.no_grad():
            self.bias.fill_(meta["feedback_bias"])

    def write(self, d: Path) -> None:
        """Write a checkpoint: adapter, head, optimizer/scheduler and RNG state."""
        self.model.save_pretrained(str(d / "adapter"), safe_serialization=True)
        self.head.save(d, feedback_bias=self.bias.item())
        checkpoint.save_trainer_state(d, optimizer=self.optimizer, scheduler=self.scheduler, rng=checkpoint.rng_state())


def setup_reward_model(cfg: RewardConfig, model_cfg: ModelConfig, sft_dir: str, device, seed: int) -> RewardModel:
    """Seed the global RNG, then: tokenizer, LoRA on the SFT model, a fresh scalar head, AdamW with cosine LR."""
    from peft import get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    # peft's LoRA init, the head's init and LoRA dropout draw from the global RNG (they take no generator);
    # the batches come from checkpoint.batch_for_step's own seeded random.Random.
    torch.manual_seed(seed)
    tok = load_tokenizer(sft_dir, model_cfg, padding_side="right")
    model = get_peft_model(load_causal_lm(sft_dir, model_cfg, device), lora_config(cfg.lora))
    head = ScalarHead(model.config.hidden_size).to(device)
    bias = torch.nn.Parameter(torch.zeros((), device=device))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters()) + [bias]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(10, cfg.max_steps // 10), cfg.max_steps)
    return RewardModel(
        model, head, bias, tok, params, optimizer, scheduler, device, LossScaler(model_cfg.dtype, device)
    )


def reward_step(
    rm: RewardModel,
    examples: list[list[Pair]],
    cfg: RewardConfig,
    step: int,
    feedback: Sequence[Feedback] = (),
    counts: torch.Tensor | None = None,
    feedback_counts: torch.Tensor | None = None,
) -> tuple[float, float, int, float]:
    """One optimizer step on a batch of preference examples and of feedback rows: -> (weighted BT loss, weighted
    accuracy, tokens scored, feedback loss).

    Each distinct response of an example is encoded once and its pairs are read from those scores
    (`score_comparisons`). A ranking of K is K sequences, so a step's sequence count varies; groups of whole examples
    with at most `micro_batch_size` sequences keep memory bounded. Each group's loss is scaled by its share of the
    weight, so the accumulated gradient is exactly that of the whole batch. The feedback rows add
    feedback_weight * BCE (the BCE alone when there are no pairs).

    `counts` (E,), `feedback_counts` (F,): each example's and feedback row's weight, an ensemble member's bootstrap
    counts (None: 1 each); a pair weighs its own weight times its example's count.
    """
    counts = torch.ones(len(examples)) if counts is None else counts
    total_w = sum(p.weight for ex in examples for p in ex)
    total_counted = sum(c * sum(p.weight for p in ex) for c, ex in zip(counts.tolist(), examples, strict=True))
    rm.optimizer.zero_grad(set_to_none=True)
    loss, correct, tokens, fb_loss = 0.0, 0.0, 0, 0.0
    if feedback:
        ids, mask = encode(
            rm.tok, [f.prompt for f in feedback], [f.response for f in feedback], cfg.max_length, rm.device
        )
        targets = torch.tensor([f.target for f in feedback], device=rm.device)
        fc = None if feedback_counts is None else feedback_counts.to(rm.device)
        term = feedback_loss(sequence_scores(rm.model, rm.head, ids, mask), rm.bias, targets, fc)
        if not torch.isfinite(term):
            raise FloatingPointError(
                f"reward model feedback loss is {term.item()} at step {step}: lower reward.learning_rate"
            )
        rm.scaler.backward(term * (cfg.feedback_weight if total_w else 1.0))
        fb_loss, tokens = term.item(), int(mask.sum())
    first = 0  # the chunk's first example in `examples`
    for chunk in example_chunks(examples, cfg.micro_batch_size):
        # rc, rr, w: (P,) each: the pairs of the chunk's examples; wc: (P,) w times the pair's example's count
        rc, rr, w, n_tokens = score_comparisons(rm.model, rm.head, rm.tok, chunk, cfg.max_length, rm.device)
        tokens += n_tokens
        per_pair = torch.repeat_interleave(counts[first : first + len(chunk)], torch.tensor([len(ex) for ex in chunk]))
        first += len(chunk)
        wc = w * per_pair.to(rm.device)
        chunk_loss = bradley_terry_loss(rc, rr, wc) * (wc.sum() / max(total_counted, 1e-12))
        if not torch.isfinite(chunk_loss):
            raise FloatingPointError(
                f"reward model loss is {chunk_loss.item()} at step {step}: lower reward.learning_rate"
            )
        rm.scaler.backward(chunk_loss)
        loss += chunk_loss.item()
        correct += (pairwise_accuracy(rc.detach(), rr.detach(), w) * w.sum() / total_w).item()
    # the ranks' mean gradient; the step's loss, accuracy and feedback loss averaged with it
    loss_t, correct_t, fb_t = distributed.all_reduce_gradients(
        rm.params, *(torch.tensor(v, dtype=torch.float64) for v in (loss, correct, fb_loss))
    )
    loss, correct, fb_loss = loss_t.item(), correct_t.item(), fb_t.item()
    rm.scaler.step(rm.optimizer, rm.params, cfg.max_grad_norm)
    rm.scheduler.step()
    return loss, correct, tokens, fb_loss


def log_running(running: dict[str, float], rm: RewardModel, done: int, bar, member: Member) -> None:
    """Log the mean loss/accuracy over the steps since the last log, and the learning rate."""
    n = running["n"]
    row = {
        "rm/loss": running["loss"] / n,
        "rm/accuracy": running["acc"] / n,
        "rm/feedback_train_loss": running["fb"] / n,
        "rm/learning_rate": float(rm.scheduler.get_last_lr()[0]),  # a float lr: torch types it float | Tensor
    }
    log_to_active_run({member.name(k): v for k, v in row.items()}, done)
    bar.set_postfix(loss=f"{running['loss'] / n:.3f}", acc=f"{running['acc'] / n:.2f}")


# ---------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class Member:
    """Which member of the reward ensemble a training run is. The first (index 0) trains on all the data with the
    stage's seed: it is the reward model `reward.ensemble=1` trains, and the others' directories (`others`) go in
    its head.json. Member k > 0 trains on its own bootstrap sample with seed + 1000 k (its own LoRA and head init,
    batch order and sample), and logs as rm/member_k/*."""

    index: int = 0
    others: tuple[Path, ...] = ()

    def seed(self, seed: int) -> int:
        return seed + 1000 * self.index

    def name(self, key: str) -> str:
        """A metric's name for this member: rm/loss -> rm/member_2/loss."""
        return key if self.index == 0 else key.replace("rm/", f"rm/member_{self.index}/", 1)


def train_reward(
    cfg: RewardConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    data_dir: Path,
    out_dir: Path,
    seed: int = 0,
    data_cfg: DataConfig | None = None,
    warm_from: str | None = None,
) -> RewardResult:
    """Train the reward model on the preferences and feedback under `data_dir` (`data_cfg`: the feedback rating
    range; default: DataConfig's), resuming from the last checkpoint under `out_dir/checkpoints`; writes adapter,
    head and reward statistics to `out_dir`.

    An ensemble (`reward.ensemble` = K > 1): members 1..K-1 first, each a whole reward model in
    `out_dir/members/k` (resumed, or only re-evaluated when it finished), then the first member in `out_dir`; its
    head.json then also lists the others and holds the ensemble's statistics, and `out_dir` is complete last.

    `warm_from`: a champion's warm-start bundle (components/models/warm_start.py): each member starts from the
    champion's, and trains on the rows new since the champion's data plus a replay sample of the earlier ones
    (`Increment`); its held-out metrics also come split into new and earlier rows, and the champion's own accuracy
    on the new ones (`rm/eval_accuracy_new_parent`) is measured first."""
    if cfg.ensemble < 1:
        raise ValueError(
            f"reward.ensemble={cfg.ensemble}: the reward model needs at least 1 member; use 1 (no ensemble)"
        )
    if distributed.world().main:
        checkpoint.mark_incomplete(out_dir)  # not this run's outputs until the last member finishes
    others = tuple(out_dir / "members" / str(k) for k in range(1, cfg.ensemble))
    for k, member_dir in enumerate(others, 1):
        train_member(cfg, model_cfg, sft_dir, data_dir, member_dir, seed, data_cfg, Member(k), warm_from)
    return train_member(cfg, model_cfg, sft_dir, data_dir, out_dir, seed, data_cfg, Member(0, others), warm_from)


def replay_size(ratio: float, n_new: int, n_new_kind: int, draws: int) -> int:
    """Earlier rows of one kind to replay: `ratio` per new row (of both kinds), and at least enough that the kind's
    training rows (new + replayed) take `draws` (steps x batch) in at most two passes.

    ratio 1, 20 new rows (18 of this kind), 80 steps x 16: max(20, 640 - 18) = 622
    ratio 1, 200 new rows (182 of this kind), 20 steps x 16: max(200, 160 - 182) = 200
    """
    return max(round(ratio * n_new), draws // 2 - n_new_kind, 0)


@dataclass
class Increment:
    """An incremental retrain's reward data (`train_reward(warm_from=...)`): the rows of the shards new since the
    champion's data, and of the earlier ones a replay sample drawn with the member's seed: of each kind `replay_ratio`
    rows per new row (of either kind, so that new thumbs alone still rehearse the comparisons), and at least enough
    that the run's steps pass over that kind's training rows at most twice (`replay_size`). A few new rows are then
    not fitted for 80 steps on their own: demo + 20 comparisons (seed 0), one replayed row per new row, held the old
    comparisons at 0.818 against a full retrain's 0.910. Held out: all rows, as a full retrain holds them out, and
    split into new and earlier to show learning and forgetting."""

    train: list[list[Pair]]  # new + replayed comparisons
    fb_train: list[Feedback]
    evals_new: list[list[Pair]]
    evals_old: list[list[Pair]]
    fb_evals_new: list[Feedback]
    fb_evals_old: list[Feedback]
    new_rows: int  # training rows new since the champion's data, both kinds
    replayed: int

    @classmethod
    def read(cls, data_dir: Path, warm_from: str, cfg: RewardConfig, data_cfg: DataConfig, seed: int) -> Increment:
        import random

        from components.models.warm_start import lineage

        parent = set(lineage(warm_from)["manifest"])
        old, new = (lambda shard: shard in parent), (lambda shard: shard not in parent)
        train_old, evals_old = read_preferences(data_dir, cfg.eval_fraction, old)
        train_new, evals_new = read_preferences(data_dir, cfg.eval_fraction, new)
        rating = (data_cfg.min_rating, data_cfg.max_rating)
        fb_old, fb_evals_old = read_feedback(data_dir, cfg.eval_fraction, *rating, old)
        fb_new, fb_evals_new = read_feedback(data_dir, cfg.eval_fraction, *rating, new)
        n_new = len(train_new) + len(fb_new)
        rng = random.Random(seed + 4)
        n = replay_size(cfg.replay_ratio, n_new, len(train_new), cfg.max_steps * cfg.batch_size)
        n_fb = replay_size(cfg.replay_ratio, n_new, len(fb_new), cfg.max_steps * cfg.feedback_batch_size)
        replay = rng.sample(train_old, min(len(train_old), n))
        fb_replay = rng.sample(fb_old, min(len(fb_old), n_fb))
        return cls(
            train_new + replay, fb_new + fb_replay, evals_new, evals_old, fb_evals_new, fb_evals_old, n_new,
            len(replay) + len(fb_replay),
        )  # fmt: skip

    def metrics(self, rm: RewardModel, cfg: RewardConfig, suffix: str) -> dict[str, float]:
        """Held-out accuracy on the new comparisons (and thumbs) and on the earlier ones: rm/eval_accuracy_new<suffix>,
        rm/eval_accuracy_old<suffix>, rm/feedback_accuracy_new<suffix>, ..."""
        out: dict[str, float] = {}
        for part, evals, fb in (("new", self.evals_new, self.fb_evals_new), ("old", self.evals_old, self.fb_evals_old)):
            if evals:
                m = evaluate_reward_model(rm.model, rm.head, rm.tok, evals, cfg, rm.device)
                out[f"rm/eval_accuracy_{part}{suffix}"] = m["rm/eval_accuracy"]
            if fb:
                m = evaluate_feedback(rm.model, rm.head, rm.bias.detach(), rm.tok, fb, cfg, rm.device)
                out[f"rm/feedback_accuracy_{part}{suffix}"] = m["rm/feedback_accuracy"]
        return out


def train_member(
    cfg: RewardConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    data_dir: Path,
    out_dir: Path,
    seed: int,
    data_cfg: DataConfig | None,
    member: Member,
    warm_from: str | None = None,
) -> RewardResult:
    """One reward model (an ensemble's member) in `out_dir`: see train_reward."""
    # 1. inputs
    w = distributed.world()
    ckpt_root = out_dir / "checkpoints"
    if w.main:  # rank 0 alone writes
        checkpoint.mark_incomplete(out_dir)  # outputs of an earlier run here are not this run's until it finishes
        checkpoint.recover(ckpt_root)  # what a kill left mid-save, put right before any rank reads a checkpoint
    distributed.barrier()
    per_rank = distributed.per_rank(cfg.batch_size, "reward.batch_size", w)
    fb_per_rank = distributed.per_rank(cfg.feedback_batch_size, "reward.feedback_batch_size", w)
    data_cfg = data_cfg or DataConfig()
    increment = None
    if warm_from is None:
        train, evals = read_preferences(data_dir, cfg.eval_fraction)
        fb_train, fb_evals = read_feedback(data_dir, cfg.eval_fraction, data_cfg.min_rating, data_cfg.max_rating)
    else:
        increment = Increment.read(data_dir, warm_from, cfg, data_cfg, member.seed(seed))
        train, fb_train = increment.train, increment.fb_train
        evals, fb_evals = increment.evals_new + increment.evals_old, increment.fb_evals_new + increment.fb_evals_old
    if not (train and evals) and not (fb_train and fb_evals):
        raise ValueError(
            f"the reward model needs preferences ({data_dir}/preferences) or feedback ({data_dir}/feedback) with rows "
            f"for training and held-out eval (reward.eval_fraction={cfg.eval_fraction}): got {len(train)}/{len(evals)} "
            f"comparisons and {len(fb_train)}/{len(fb_evals)} feedback rows (train/held out)"
        )
    # 2. model and optimizer, restored from the last checkpoint if there is one
    seed = member.seed(seed)
    rm = setup_reward_model(cfg, model_cfg, sft_dir, resolve_device(model_cfg.device), seed)
    before: dict[str, float] = {}
    if warm_from is not None and increment is not None:  # the champion's member, measured on the new rows first
        from components.models.warm_start import reward_member

        rm.restore(reward_member(warm_from, member.index))
        before = increment.metrics(rm, cfg, "_parent") if w.main else {}
    fp = checkpoint.fingerprint(
        cfg,
        sft_dir=str(sft_dir),
        data=str(data_dir),
        seed=seed,
        n_train=len(train),
        n_feedback=len(fb_train),
        **({"warm_from": str(warm_from)} if warm_from else {}),
    )
    # a member k > 0 trains on its own bootstrap sample of the comparisons and of the feedback rows: (E,), (F,)
    boot = bootstrap_counts(len(train), seed + 2) if member.index else torch.ones(len(train))
    fb_boot = bootstrap_counts(len(fb_train), seed + 3) if member.index else None
    start, _ = checkpoint.resume(ckpt_root, fp, rm.restore, optimizer=rm.optimizer, scheduler=rm.scheduler)

    # 3. train: one step per batch of rankings, logging every log_steps, checkpoints every save_steps
    rm.model.train()
    running = {"loss": 0.0, "acc": 0.0, "fb": 0.0, "n": 0}
    tokens, started = 0, time.perf_counter()
    bar = tqdm(
        range(start, cfg.max_steps),
        desc=f"reward model member {member.index + 1}/{cfg.ensemble}" if cfg.ensemble > 1 else "reward model",
        initial=start,
        total=cfg.max_steps,
        unit="step",
        disable=not w.main,
    )
    for step in bar:
        picked = checkpoint.batch_for_step(len(train), cfg.batch_size, step, seed)
        fb_picked = checkpoint.batch_for_step(len(fb_train), cfg.feedback_batch_size, step, seed + 1)
        picked, fb_picked = distributed.shard(picked, w)[:per_rank], distributed.shard(fb_picked, w)[:fb_per_rank]
        examples, fb = [train[i] for i in picked], [fb_train[i] for i in fb_picked]  # this rank's
        fb_counts = None if fb_boot is None else fb_boot[fb_picked]
        loss, correct, n_tokens, fb_loss = reward_step(rm, examples, cfg, step, fb, boot[picked], fb_counts)
        tokens += n_tokens
        running["loss"] += loss
        running["acc"] += correct
        running["fb"] += fb_loss
        running["n"] += 1
        done = step + 1
        if done % cfg.log_steps == 0 or done == cfg.max_steps:
            log_running(running, rm, done, bar, member)
            running = {"loss": 0.0, "acc": 0.0, "fb": 0.0, "n": 0}
        if done % cfg.save_steps == 0 and done < cfg.max_steps and w.main:
            checkpoint.save(ckpt_root, done, fp, rm.write)
    bar.close()
    seconds = time.perf_counter() - started
    tokens = int(distributed.all_sum(torch.tensor([float(tokens)])).item())  # every rank's
    distributed.check_replicas(rm.params, "the reward model")
    if not w.main:  # the model is the same on every rank: rank 0 evaluates it and writes it
        return RewardResult(str(out_dir / "adapter"), str(out_dir), {})

    # 4. held-out metrics, reward statistics, outputs
    metrics = finish_reward(rm, cfg, (train, evals), (fb_train, fb_evals), sft_dir, out_dir, start, seconds, tokens)
    if increment is not None:
        metrics |= before | increment.metrics(rm, cfg, "")
        metrics |= {"rm/new_rows": float(increment.new_rows), "rm/replayed_rows": float(increment.replayed)}
    if member.others:  # the ensemble's statistics, from every member's scores, into the first member's head.json
        metrics |= finish_ensemble(
            cfg, model_cfg, sft_dir, out_dir, member.others, (train, evals), (fb_train, fb_evals)
        )
    metrics = {member.name(k): v for k, v in metrics.items()}
    log_to_active_run(metrics, cfg.max_steps)
    checkpoint.save(ckpt_root, cfg.max_steps, fp, rm.write)
    checkpoint.mark_complete(
        out_dir, {"stage": "reward", "outputs": ["adapter", "head.safetensors", "head.json"], "metrics": metrics}
    )
    return RewardResult(str(out_dir / "adapter"), str(out_dir), metrics)


def finish_reward(
    rm: RewardModel,
    cfg: RewardConfig,
    comparisons: tuple[list[list[Pair]], list[list[Pair]]],
    feedback: tuple[list[Feedback], list[Feedback]],
    sft_dir: str,
    out_dir: Path,
    start: int,
    seconds: float,
    tokens: int,
) -> dict[str, float]:
    """Evaluate on the held-out comparisons and feedback (train, held out) each, measure the reward's mean/std on
    training responses and write the adapter and the head (with the statistics) to `out_dir`: -> the metrics."""
    (train, evals), (fb_train, fb_evals) = comparisons, feedback
    metrics = evaluate_reward_model(rm.model, rm.head, rm.tok, evals, cfg, rm.device)
    metrics.update(evaluate_feedback(rm.model, rm.head, rm.bias.detach(), rm.tok, fb_evals, cfg, rm.device))
    mean, std = reward_stats(rm.model, rm.head, rm.tok, train, cfg, rm.device, fb_train)
    metrics.update(
        {
            "rm/reward_mean": mean,
            "rm/reward_std": std,
            "rm/resumed_from_step": float(start),
            "rm/train_seconds": seconds,
            "rm/tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
            "rm/train_examples": float(len(train)),
            "rm/train_pairs": float(sum(len(ex) for ex in train)),
            "rm/train_feedback_rows": float(len(fb_train)),
            "rm/world_size": float(distributed.world().size),
        }
    )
    rm.model.save_pretrained(str(out_dir / "adapter"), safe_serialization=True)
    rm.head.save(
        out_dir,
        reward_mean=mean,
        reward_std=std,
        base=str(sft_dir),
        max_length=cfg.max_length,
        feedback_bias=rm.bias.item(),
    )
    return metrics


@torch.no_grad()
def finish_ensemble(
    cfg: RewardConfig,
    model_cfg: ModelConfig,
    sft_dir: str,
    first: Path,
    others: tuple[Path, ...],
    comparisons: tuple[list[list[Pair]], list[list[Pair]]],
    feedback: tuple[list[Feedback], list[Feedback]],
) -> dict[str, float]:
    """Every member (the first in `first`, already written) scores the training and the held-out responses: the
    ensemble's statistics (its mean's, each member's) and the others' directories go into the first member's
    head.json (`RewardScale.of` reads them; `roles.reward_members` lists the members) -> the ensemble's metrics:
    held-out accuracy of the mean score and the disagreement on held-out responses (the level on answers like its
    data, against which a policy's is read)."""
    (train, evals), (fb_train, fb_evals) = comparisons, feedback
    device = resolve_device(model_cfg.device)
    dirs = (first, *others)
    names = [REWARD] + [f"{REWARD}_{k}" for k in range(1, len(dirs))]  # as roles.reward_members will list them
    base = load_causal_lm(sft_dir, model_cfg, device)
    scorer, heads, _ = attach_reward_members(base, list(zip(names, dirs, strict=True)), device)
    scorer.eval()
    tok = load_tokenizer(sft_dir, model_cfg, padding_side="right")

    def members(texts: list[tuple[str, str]]) -> torch.Tensor:  # -> (N, K) raw scores
        out = []
        for i in range(0, len(texts), cfg.micro_batch_size):
            part = texts[i : i + cfg.micro_batch_size]
            ids, mask = encode(tok, [p for p, _ in part], [r for _, r in part], cfg.max_length, device)
            out.append(member_scores(scorer, heads, ids, mask))
        return torch.cat(out)

    trained = members(distinct_texts(train, fb_train)[: cfg.stats_max_responses])
    mean = trained.mean(-1)
    scale = RewardScale(
        mean.mean().item(),
        mean.std().clamp(min=1e-6).item(),
        tuple(trained.mean(0).tolist()),
        tuple(trained.std(0).clamp(min=1e-6).tolist()),
    )
    meta = json.loads((first / HEAD_META).read_text())
    meta[ENSEMBLE] = {
        "members": [str(d.relative_to(first)) for d in others],
        "reward_mean": scale.mean,
        "reward_std": scale.std,
        "member_mean": list(scale.member_mean),
        "member_std": list(scale.member_std),
    }
    (first / HEAD_META).write_text(json.dumps(meta, indent=2))
    held_out = distinct_texts(evals, fb_evals)
    score, spread = scale.normalise(members(held_out))
    out = {
        "rm/ensemble": float(len(dirs)),
        "rm/ensemble_reward_mean": scale.mean,
        "rm/ensemble_reward_std": scale.std,
        "rm/eval_disagreement": spread.mean().item(),
        "rm/eval_disagreement_p90": spread.quantile(0.9).item(),
    }
    if evals:  # the held-out comparisons, ranked by the ensemble's mean score
        index = {text: i for i, text in enumerate(held_out)}
        c = index_comparisons(evals)
        at = torch.tensor([index[t] for t in zip(c.prompts, c.responses, strict=True)])
        s = score[at]
        out["rm/ensemble_eval_accuracy"] = pairwise_accuracy(s[c.chosen], s[c.rejected], c.weights).item()
    return out
