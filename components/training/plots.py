"""Training curves as figures for MLflow (`mlflow.log_figure`): a person reads curves, not only numbers."""

from __future__ import annotations

DEGENERATION = ("ppo/repeated_word_share", "ppo/distinct_2")
ENSEMBLE = ("ppo/rm_disagreement",)  # only with an ensemble reward model (reward.ensemble > 1)


def ppo_curves(history: list[dict[str, float]]):
    """The score PPO optimises (normalised RM + reward_fn, EOS penalty) and the raw reward-model score (zero
    without one), KL to the reference, the KL coefficient, and the batch's degeneration (the share of answers
    repeating a word, distinct-2, and with an ensemble reward model its members' disagreement: where the reward keeps
    rising while these turn, it is being hacked) per PPO iteration (one figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    steps = range(1, len(history) + 1)
    for ax, keys, title in (
        (axes[0], ("ppo/reward_mean", "ppo/score_mean"), "reward optimised (normalised) and raw RM score"),
        (axes[1], ("ppo/kl", "ppo/kl_k3"), "KL to the reference (per response)"),
        (axes[2], ("ppo/beta",), "KL coefficient beta"),
        (axes[3], DEGENERATION + ENSEMBLE, "degeneration: reward bought with quality?"),
    ):
        for k in keys:
            if k in ENSEMBLE and k not in history[0]:
                continue  # a single reward model: no disagreement to draw
            ax.plot(steps, [h.get(k, float("nan")) for h in history], label=k.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    return fig


def rs_curves(history: list[dict[str, float]]):
    """Rejection sampling per round: the reward of all samples, of the kept ones and of each prompt's best; the
    KL of the samples to the reference; the fine-tuning loss (one figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    rounds = range(1, len(history) + 1)
    for ax, keys, title in (
        (axes[0], ("rs/score_mean", "rs/score_kept_mean", "rs/score_best_mean"), "reward of the samples"),
        (axes[1], ("rs/kl", "rs/kl_kept"), "KL to the reference (per response)"),
        (axes[2], ("rs/sft_loss",), "fine-tuning loss on the kept samples"),
    ):
        for k in keys:
            ax.plot(rounds, [h[k] for h in history], marker="o", label=k.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.legend()
    fig.tight_layout()
    return fig


def group_rl_curves(history: list[dict[str, float]], algorithm: str):
    """GRPO / RLOO per step: the raw RM score and the reward optimised, the KL of the samples to the reference,
    and the share of prompt groups whose samples all scored alike (no learning signal) (one figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = algorithm
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = range(1, len(history) + 1)
    for ax, keys, title in (
        (axes[0], (f"{ns}/reward_mean", f"{ns}/score_mean"), "reward optimised (normalised) and raw RM score"),
        (axes[1], (f"{ns}/kl",), "KL to the reference (per response)"),
        (axes[2], (f"{ns}/groups_without_signal", f"{ns}/clipfrac"), "groups without signal, clip fraction"),
    ):
        for k in keys:
            ax.plot(steps, [h[k] for h in history], label=k.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(algorithm.upper())
    fig.tight_layout()
    return fig


def direct_curves(history: list[dict[str, float]], method: str):
    """DPO / KTO per step: the loss; the share of the batch the implicit reward orders (DPO) or sides (KTO) as the
    people did; the log-ratios to the reference of the chosen / thumbs-up and rejected / thumbs-down responses (a
    falling chosen log-ratio is DPO's known drift), and KTO's reference point z (one figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = method
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    steps = range(1, len(history) + 1)
    ratios = (f"{ns}/chosen_logratio", f"{ns}/rejected_logratio") + ((f"{ns}/z",) if method == "kto" else ())
    for ax, keys, title in (
        (axes[0], (f"{ns}/loss",), "loss"),
        (axes[1], (f"{ns}/accuracy",), "implicit reward agrees with the judgements"),
        (axes[2], ratios, "log-ratio to the reference (per response)"),
    ):
        for k in keys:
            ax.plot(steps, [h[k] for h in history], label=k.split("/")[1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle(method.upper())
    fig.tight_layout()
    return fig


def canary_curves(curves: dict[str, list[tuple[int, float]]], intervals: dict[str, tuple[float, float]]):
    """Each arm's running thumbs-up rate against its judged answers, its final anytime-valid interval as a band at
    the end (one figure): the canary's decision as a person reads it (flows/canary.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for arm, colour in (("champion", "tab:blue"), ("challenger", "tab:orange")):
        points = curves.get(arm) or []
        if not points:
            continue
        ax.plot([n for n, _ in points], [r for _, r in points], color=colour, label=arm)
        lo, hi = intervals[arm]
        ax.errorbar([points[-1][0]], [points[-1][1]], yerr=[[points[-1][1] - lo], [hi - points[-1][1]]], color=colour)
    ax.set_xlabel("judged answers of the arm")
    ax.set_ylabel("thumbs-up rate")
    ax.set_ylim(0, 1)
    ax.set_title("canary: thumbs-up rate per arm (bars: anytime-valid interval)")
    ax.legend()
    fig.tight_layout()
    return fig
