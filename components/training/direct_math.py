"""The losses of direct alignment (DPO, KTO): pure functions of sequence log-probs, no model, no side effects.

A response's implicit reward is beta times its log-ratio to the reference, beta * (log pi(y|x) - log pi_ref(y|x)),
the log-probs summed over the response's tokens (EOS included). The formulas are TRL's (trl/trainer/dpo_trainer.py,
kto_trainer.py, TRL 1.16), written out so each can be checked by hand (tests/training/test_direct.py) and so DPO can
weigh the pairs of a ranking, which TRL's DPOTrainer cannot.

    DPO, pair (chosen c, rejected r), d = logratio_c - logratio_r (Rafailov et al. 2023):
        sigmoid   -log sigmoid(beta d)
        hinge     max(0, 1 - beta d)                                           (SLiC, Zhao et al. 2023)
        ipo       (d' - 1 / (2 beta))^2, d' the difference of per-token log-ratios   (Azar et al. 2023)
        robust    ((1 - e) (-log sigmoid(beta d)) - e (-log sigmoid(-beta d))) / (1 - 2e),
                  e = label_smoothing, the share of flipped labels assumed        (Chowdhury et al. 2024)
      the loss is the weighted mean over pairs, sum(w * l) / sum(w): a ranking of K gives C(K,2) pairs of weight
      1 / C(K,2), so it counts as one example (as in the reward model).

    KTO, unpaired rows with a thumbs up (desirable) or down (Ethayarajh et al. 2024, eq. 7):
        z         = max(0, mean over the batch of the log-ratio of mismatched (prompt, response) pairs), no gradient
        desirable   lambda_D * (1 - sigmoid(beta (logratio - z)))
        undesirable lambda_U * (1 - sigmoid(beta (z - logratio)))
      the loss is the mean over the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of a response's token log-probs: (B, T), mask (B, T) -> (B,)."""
    return (token_logprobs * mask).sum(1)


def dpo_pair_losses(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each pair's DPO loss: log-ratios (P,), (P,) -> (P,). `ipo` needs each response's token count (P,), (P,):
    its difference is of per-token log-ratios."""
    d = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs each response's token count")
        per_token = chosen_logratio / chosen_tokens.clamp(min=1) - rejected_logratio / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        e = label_smoothing
        return ((1 - e) * -F.logsigmoid(beta * d) - e * -F.logsigmoid(-beta * d)) / (1 - 2 * e)
    raise ValueError(f"DPO loss_type {loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * l) / sum(w): (P,), (P,) -> scalar. A ranking's pairs together weigh as much as one pairwise example."""
    return (weights * losses).sum() / weights.sum()


def kto_reference_point(mismatched_logratio: torch.Tensor) -> torch.Tensor:
    """KTO's z: the batch's mean log-ratio on mismatched pairs, at least 0, without gradient: (B,) -> scalar."""
    return mismatched_logratio.detach().mean().clamp(min=0)


def kto_losses(
    logratio: torch.Tensor,
    desirable: torch.Tensor,
    z: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Each row's KTO loss: log-ratios (B,), thumbs up (B,) bool, z scalar -> (B,). The loss is their mean."""
    up = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (z - logratio)))
    return torch.where(desirable, up, down)
