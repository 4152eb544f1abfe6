"""The gate: compare a candidate with the baseline (the champion, or the SFT policy when there is
none) on the evaluation numbers and the thresholds in `conf/gate`. Pure: numbers in, verdict out.

The reward-hacking guard is part of it: the candidate's degeneration (repeated words, distinct-2, length) and,
with an ensemble reward model, its members' disagreement on the candidate's answers, against the SFT policy's on the
same prompts, always SFT's, so a drift each generation of champions inherits is still
caught; against the champion the same measures are reported, not gated. A refusal names the measure."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import GateConfig


@dataclass
class Verdict:
    passed: bool
    baseline: str  # "champion v3" or "sft"
    checks: list[tuple[str, float, str, float, bool]] = field(default_factory=list)  # (name, value, op, threshold, ok)
    info: dict[str, float] = field(default_factory=dict)  # measured, not gated: degeneration against the champion

    @property
    def reasons(self) -> list[str]:
        """One phrase per failed check: "win_rate 0.420 < 0.5"."""
        return [
            f"{name} {value:.3f} {'<' if op == 'min' else '>'} {limit:g}"
            for name, value, op, limit, ok in self.checks
            if not ok
        ]

    def metrics(self) -> dict[str, float]:
        out = {f"gate/{name}": value for name, value, *_ in self.checks}
        out |= {f"gate/{name}": value for name, value in self.info.items()}
        out["gate/passed"] = float(self.passed)
        return out

    def summary(self) -> str:
        lines = [f"gate {'PASSED' if self.passed else 'FAILED'} (candidate vs {self.baseline}):"]
        for name, value, op, limit, ok in self.checks:
            lines.append(
                f"  {'ok ' if ok else 'NO '} {name} = {value:+.3f}  (needs {'>=' if op == 'min' else '<='} {limit:g})"
            )
        return "\n".join(lines)


def degeneration_against(candidate: dict[str, float], other: dict[str, float], name: str) -> dict[str, float]:
    """The guard's measures of the candidate against another policy's evaluation (those both have):
    repeated_word_gain_vs_<name> (difference of shares), distinct_2_ratio_vs_<name>, length_ratio_vs_<name>, and
    with an ensemble reward model disagreement_ratio_vs_<name> (its members' spread on the candidate's answers over
    their spread on the other's)."""
    out = {}
    if "repeated_word_share" in candidate and "repeated_word_share" in other:
        out[f"repeated_word_gain_vs_{name}"] = candidate["repeated_word_share"] - other["repeated_word_share"]
    for key, measure in (
        ("distinct_2", "distinct_2_ratio"),
        ("mean_words", "length_ratio"),
        ("reward_disagreement", "disagreement_ratio"),
    ):
        if key in candidate and other.get(key):
            out[f"{measure}_vs_{name}"] = candidate[key] / other[key]
    return out


def decide(
    candidate: dict[str, float],
    baseline: dict[str, float],
    win_rate: float,
    baseline_name: str,
    cfg: GateConfig,
    sft: dict[str, float] | None = None,
    champion: dict[str, float] | None = None,
    ensemble: int = 1,
    new_data: dict[str, float] | None = None,
) -> Verdict:
    """candidate/baseline: evaluation metrics (reward_mean, judge_mean, kl, the degeneration measures); win_rate:
    candidate vs baseline; sft, champion: their evaluations, for the guard (against SFT) and the report; ensemble: the
    operator's reward.ensemble. With an ensemble configured and a disagreement check on, a missing measure fails
    closed (`disagreement_measured` 0 < 1): evidence the operator asked for and did not get is not a pass.

    new_data: an incremental candidate's evidence (flows/incremental.new_data_measures and the gate task): its reward
    model's accuracy on the held-out new rows and its champion's on the same rows ("new_accuracy",
    "new_accuracy_parent"; absent when none was held out) and the standard error of the per-prompt reward difference
    against the champion ("reward_gain_se"): the incremental gate. Against its own parent the candidate must be
    non-inferior - win rate >= min(min_win_rate, 0.5 - incremental_margin), judge gain >= min_judge_gain -
    incremental_margin, reward gain >= min_reward_gain - max(incremental_margin, 2 x reward_gain_se) - and hold the new
    rows (new_accuracy_gain >= min_new_accuracy_gain). The guard against SFT is the same."""
    incremental = new_data is not None
    new_data = {k: v for k, v in (new_data or {}).items()}
    margin = cfg.incremental_margin if incremental else 0.0
    min_win = min(cfg.min_win_rate, 0.5 - margin) if incremental else cfg.min_win_rate
    reward_margin = max(margin, 2 * new_data.get("reward_gain_se", 0.0)) if incremental else 0.0
    checks = [
        ("reward_gain", candidate["reward_mean"] - baseline["reward_mean"], "min", cfg.min_reward_gain - reward_margin),
        ("win_rate", win_rate, "min", min_win),
        ("kl", candidate["kl"], "max", cfg.max_kl),
    ]
    if cfg.min_judge_gain is not None and "judge_mean" in candidate and "judge_mean" in baseline:
        judge_gain = candidate["judge_mean"] - baseline["judge_mean"]
        checks.append(("judge_gain", judge_gain, "min", cfg.min_judge_gain - margin))
    if "new_accuracy" in new_data and cfg.min_new_accuracy_gain is not None:
        gain = new_data["new_accuracy"] - new_data["new_accuracy_parent"]
        checks.append(("new_accuracy_gain", gain, "min", cfg.min_new_accuracy_gain))
    guard = degeneration_against(candidate, sft or {}, "sft")
    for measure, op, limit in (
        ("repeated_word_gain_vs_sft", "max", cfg.max_repeated_word_gain),
        ("distinct_2_ratio_vs_sft", "min", cfg.min_distinct_2_ratio),
        ("length_ratio_vs_sft", "max", cfg.max_length_ratio),
        ("disagreement_ratio_vs_sft", "max", cfg.max_disagreement_ratio),
    ):
        if limit is not None and measure in guard:
            checks.append((measure, guard[measure], op, limit))
    if ensemble > 1 and cfg.max_disagreement_ratio is not None and "disagreement_ratio_vs_sft" not in guard:
        checks.append(("disagreement_measured", 0.0, "min", 1.0))
    gated = {name for name, *_ in checks}
    info = {k: v for k, v in guard.items() if k not in gated}
    info |= degeneration_against(candidate, champion or {}, "champion")
    info |= new_data
    rows = [(n, v, op, t, (v >= t) if op == "min" else (v <= t)) for n, v, op, t in checks]
    return Verdict(all(ok for *_, ok in rows), baseline_name, rows, info)
