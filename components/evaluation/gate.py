"""The gate: compare a candidate with the baseline (the champion, or the SFT policy when there is
none) on the evaluation numbers and the thresholds in `conf/gate`. Pure: numbers in, verdict out."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import GateConfig


@dataclass
class Verdict:
    passed: bool
    baseline: str  # "champion v3" or "sft"
    checks: list[tuple[str, float, str, float, bool]] = field(default_factory=list)  # (name, value, op, threshold, ok)

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
        out["gate/passed"] = float(self.passed)
        return out

    def summary(self) -> str:
        lines = [f"gate {'PASSED' if self.passed else 'FAILED'} (candidate vs {self.baseline}):"]
        for name, value, op, limit, ok in self.checks:
            lines.append(
                f"  {'ok ' if ok else 'NO '} {name} = {value:+.3f}  (needs {'>=' if op == 'min' else '<='} {limit:g})"
            )
        return "\n".join(lines)


def decide(
    candidate: dict[str, float], baseline: dict[str, float], win_rate: float, baseline_name: str, cfg: GateConfig
) -> Verdict:
    """candidate/baseline: evaluation metrics (reward_mean, judge_mean, kl); win_rate: candidate vs baseline."""
    checks = [
        ("reward_gain", candidate["reward_mean"] - baseline["reward_mean"], "min", cfg.min_reward_gain),
        ("win_rate", win_rate, "min", cfg.min_win_rate),
        ("kl", candidate["kl"], "max", cfg.max_kl),
    ]
    if cfg.min_judge_gain is not None and "judge_mean" in candidate and "judge_mean" in baseline:
        checks.append(("judge_gain", candidate["judge_mean"] - baseline["judge_mean"], "min", cfg.min_judge_gain))
    rows = [(n, v, op, t, (v >= t) if op == "min" else (v <= t)) for n, v, op, t in checks]
    return Verdict(all(ok for *_, ok in rows), baseline_name, rows)
