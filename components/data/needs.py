"""What a retrain needs of the data, checked on the rows per kind before any model loads.

Every retrain trains SFT on the demonstrations, a reward model on the comparisons or the thumbs, and evaluates on
the frozen eval prompts; the RL methods also sample answers to the prompts, and the direct ones train on one kind
of judgement (components/training/direct.data_problem says which). Each missing kind is one sentence naming the
stage that needs it and the command that adds it.

    missing("ppo", {"demonstrations": 300, "preferences": 0, "feedback": 0, "prompts": 100, "eval": 30})
    -> ["no comparisons or feedback: the reward model needs one of them: rlhf ingest FILE --kind preferences"]
"""

from __future__ import annotations

SAMPLES_PROMPTS = ("ppo", "grpo", "rloo", "rejection_sampling")  # RL methods: they answer data/prompts/


def missing(method: str, rows: dict[str, int]) -> list[str]:
    """One sentence per kind of data the pipeline with policy `method` needs and `rows` (per kind) lacks."""
    out = []
    if not rows.get("demonstrations"):
        out.append("no demonstrations: SFT needs them: rlhf ingest FILE --kind demonstrations")
    if not rows.get("preferences") and not rows.get("feedback"):
        out.append("no comparisons or feedback: the reward model needs one of them: rlhf ingest FILE --kind preferences")
    if method in SAMPLES_PROMPTS and not rows.get("prompts"):
        out.append(f"no prompts: policy={method} samples answers to them: rlhf ingest FILE --kind prompts")
    if not rows.get("eval"):
        out.append(
            "no eval prompts: the gate compares candidate and champion on them: rlhf ingest FILE --kind eval "
            "(once: they are frozen)"
        )
    return out
