"""The reward-hacking guard at work (issue 30): PPO against a reward that pays for a repeated word (on top of the
reward model) learns to repeat words while its reward rises; the gate, which reads the degeneration of the
candidate's held-out answers against the SFT policy's, refuses it and names the measure, where the default gate
without the guard passes the same candidate (measured: reward +0.73, win rate 0.68, judge +0.52, KL 7.8, and a
quarter more of its answers repeating a word than SFT's)."""

import re
from dataclasses import replace

from components.data.readers import read_prompts
from components.evaluation.evaluate import PolicySpec, evaluate_policies, win_rate
from components.evaluation.gate import decide
from components.training.plots import ppo_curves
from components.training.ppo import train_ppo

HACKABLE = "tests.training.test_reward_hacking:pays_for_repeats"


def pays_for_repeats(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward anyone can hack: 2 for each word repeated back to back ("worth every every penny")."""
    return [2.0 * len(re.findall(r"\b(\w+)\s+\1\b", r.lower())) for r in responses]


def test_the_gate_refuses_a_policy_that_hacked_its_reward_and_names_the_measure(stages, reward, tmp_path):
    cfg = stages.cfg
    # without PPO-ptx, whose demonstrations would pull against the hack: the policy must buy its reward for the
    # guard to have something to refuse
    ppo = replace(
        cfg.ppo, steps=20, reward_fn=HACKABLE, reward_fn_weight=1.0, eval_max_prompts=8, save_every=1000, ptx_coef=0.0
    )
    result = train_ppo(ppo, cfg.model, stages.sft_dir, reward.head_dir, cfg.data_path, tmp_path / "ppo", seed=0)
    first, last = result.history[:3], result.history[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "ppo/reward_mean") > mean(first, "ppo/reward_mean"), "the hacked reward rose"
    assert mean(last, "ppo/repeated_word_share") > mean(first, "ppo/repeated_word_share") + 0.2, "by repeating words"
    (panel,) = [ax for ax in ppo_curves(result.history).axes if "degeneration" in ax.get_title()]
    assert {line.get_label() for line in panel.get_lines()} == {"repeated_word_share", "distinct_2"}

    gate = replace(cfg.gate, max_prompts=64)
    specs = [PolicySpec("sft", stages.sft_dir), PolicySpec("candidate", stages.sft_dir, result.policy_dir)]
    evals = evaluate_policies(
        specs, stages.sft_dir, reward.head_dir, read_prompts(cfg.data_path, "eval"), gate, cfg.model
    )
    cand, sft = evals["candidate"].metrics, evals["sft"].metrics
    wins = win_rate(evals["candidate"].rewards, evals["sft"].rewards)
    guarded = decide(cand, sft, wins, "the SFT policy", gate, sft=sft)
    assert not guarded.passed and any(r.startswith("repeated_word_gain_vs_sft") for r in guarded.reasons), (
        guarded.summary()
    )
    # reward, win rate, judge and KL all pass the default gate: only the guard stands in the way
    unguarded = replace(gate, max_repeated_word_gain=None, min_distinct_2_ratio=None)
    assert decide(cand, sft, wins, "the SFT policy", unguarded, sft=sft).passed, "without the guard it would pass"
    print(guarded.summary())
