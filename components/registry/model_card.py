"""A short model card for a registered policy: what it is, what it was trained on, how it compared."""

from __future__ import annotations

from typing import Any


def model_card(
    name: str, model: str, data_version: str, git_commit: str, gate: dict[str, Any], lineage: dict | None = None
) -> str:
    evals = gate.get("eval", {})
    rows = ["| policy | reward (RM std) | judge | KL to SFT | length | distinct-2 |", "|---|---|---|---|---|---|"]
    for policy, m in evals.items():
        rows.append(
            f"| {policy} | {m.get('reward_mean', float('nan')):+.3f} | {m.get('judge_mean', float('nan')):+.3f} "
            f"| {m.get('kl', float('nan')):.2f} | {m.get('response_length', float('nan')):.1f} "
            f"| {m.get('distinct_2', float('nan')):.2f} |"
        )
    return "\n".join(
        [
            f"# {name}",
            "",
            f"A LoRA PPO policy on `{model}` (SFT -> reward model -> PPO, rlhf-ops).",
            "",
            f"- data version (DVC md5 of data/): `{data_version}`",
            f"- code: git `{git_commit}`",
            f"- compared against: {('champion v' + gate['champion_version']) if gate.get('champion_version') else 'the SFT policy'}",
            *lineage_lines(lineage),
            "",
            "## Evaluation on the frozen eval prompts",
            "",
            *rows,
            "",
            "## Gate",
            "",
            "```",
            gate.get("summary", ""),
            "```",
            "",
            "## Use and limits",
            "",
            "Input a prompt, get a continuation (`mlflow models serve`, column `prompt` or a list of strings).",
            "Scores come from this run's reward model and an independent judge; both are proxies for human",
            "preference and can be gamed (watch KL and the judge, not the reward alone).",
            "",
        ]
    )


def lineage_lines(lineage: dict | None) -> list[str]:
    """How it was trained: full, or incremental from its parent, and the chain of incremental parents back to the last
    full retrain (flows/incremental.lineage_of)."""
    if not lineage:
        return []
    if lineage.get("mode") != "incremental":
        return ["- trained: full retrain (every stage from scratch)"]
    chain = " -> ".join(
        f"v{c['version']} ({c.get('mode', 'full')}, data `{str(c.get('data_version'))[:8]}`)" for c in lineage["chain"]
    )
    return [
        f"- trained: incremental from champion v{lineage['parent']} (its SFT model, reward model and policy trained on "
        "with the data new since its own)",
        f"- lineage: {chain} -> this version (data `{str(lineage.get('data_version'))[:8]}`)",
    ]
