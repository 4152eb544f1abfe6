"""Structured configs: the one place where defaults live.

Each config group in ``conf/`` (model, data, sft, reward, ppo, gate, tracking,
infra) has a dataclass here, registered in Hydra's ConfigStore as
``<group>/schema``. Every YAML option in the group starts with
``defaults: [schema]`` so it is type-checked against the dataclass and only
states what differs from the defaults.

``compose(overrides)`` returns a typed ``Config`` instance; components take
these dataclasses (or one of their fields), never raw dicts. ``compose_project(overrides)``
first reads the project's own file (``<root>/rlhf.yaml``, written by ``rlhf init``): its
values become the first overrides, so ``cfg.overrides`` carries them to every process that
composes the same config again (stage workers, sweeps, the served deployment).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # packaged beside the code (pyproject: conf*)
PROJECT_FILE = "rlhf.yaml"  # a project's own settings, on top of the packaged defaults (`rlhf init`)
GROUPS = ("model", "data", "sft", "reward", "ppo", "policy", "gate", "registry", "tracking", "infra")
SUBGROUPS = ("ppo/guide",)  # groups inside a group: `ppo/guide=rollin` sets ppo.guide


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run names and tags
    name_or_path: str = MISSING  # hub id or local dir; for `tiny`/`small` the demo builder's cache dir
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # render prompts with the tokenizer's chat template when it has one (an instruct checkpoint's), in every stage
    # and in serving (components/models/chat.py); false: plain "prompt response" text
    chat_template: bool = True
    # recompute activations in the backward pass instead of keeping them (SFT, reward model, PPO): less memory for
    # long sequences and big models, ~30% more time
    gradient_checkpointing: bool = False
    # 4bit | 8bit: the frozen base loaded quantised through bitsandbytes (QLoRA: the adapters train in model.dtype on
    # top); CUDA only (`pip install bitsandbytes`). The SFT stage's merged model is written in model.dtype
    quantization: Optional[str] = None
    # Demo base model (built locally when `build_demo_base` is true): tokenizer + tiny Llama.
    build_demo_base: bool = False
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 128
    # 600: the tiny base also learns to answer the self-evaluation question from the feedback's judgement texts
    # (held-out AUC of P(" yes") vs the annotator: 0.45 after 300 steps, 0.83 after 600, 0.87 after 1000)
    pretrain_steps: int = 600
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3


@dataclass
class DataConfig:
    dir: str = "data"  # relative to `root`; tracked by DVC through <root>/data.dvc
    # true (data=demo, data=demo_small): an empty data/ is filled by the demo generator below. false (data=own, what
    # `rlhf init` sets): the data is the project's own, started and grown by `rlhf ingest`; nothing is ever generated
    demo: bool = False
    # Demo generator (deterministic for a given seed and sizes).
    seed: int = 1234
    n_demonstrations: int = 2000
    n_preferences: int = 2000
    ranked_fraction: float = 0.3  # share of preference examples that are rankings of K responses
    max_rank_k: int = 6  # demo rankings have K in 3..max_rank_k
    n_prompts: int = 500
    n_eval: int = 100
    n_feedback: int = 1000  # thumbs up/down the simulated annotator gives to sampled responses (data/feedback/)
    feedback_rating_fraction: float = 0.3  # share of demo feedback rows that also carry a graded `rating`
    annotator_temperature: float = 0.15  # Bradley-Terry noise: labels agree with the latent order ~91%
    # Validation rules (apply to every data kind).
    min_prompt_chars: int = 3
    max_prompt_chars: int = 2000
    min_response_chars: int = 1
    max_response_chars: int = 4000
    min_rank_k: int = 2
    max_rank_k_allowed: int = 9
    # feedback `rating` (optional graded score, e.g. stars): its range; the reward model's soft target is
    # (rating - min_rating) / (max_rating - min_rating), and a label must agree with the rating's side of the middle
    min_rating: float = 1.0
    max_rating: float = 5.0
    report_max_examples: int = 5  # offending lines shown per broken rule


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # All linear layers but the LM head (attention-only LoRA halves the SFT gain on the demo): peft's "all-linear",
    # in every family (components/models/families.py: GPT-2's Conv1D too). On the demo's Llama it adapts exactly
    # q/k/v/o/gate/up/down_proj with the same init as that list did. Or name modules: [q_proj, v_proj]
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class SFTConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_steps: int = 200
    batch_size: int = 16
    learning_rate: float = 5e-3  # demo/tiny: held-out loss 1.090 -> 1.033 (2e-3 reached 1.051)
    max_length: int = 96
    eval_fraction: float = 0.05
    save_steps: int = 50  # checkpoint interval (resume picks up the last one)


@dataclass
class RewardConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_steps: int = 400
    batch_size: int = 16  # preference examples per step (a ranking expands to its C(K,2) pairs)
    # sequences per forward/backward (gradient accumulation over groups of whole examples): bounds memory. Each
    # distinct response of a ranking is encoded once, its C(K,2) pairs read from those K scores
    micro_batch_size: int = 128
    learning_rate: float = 5e-3  # demo/tiny: held-out accuracy 0.857 (1e-3 x 200 steps: 0.784)
    max_length: int = 96
    eval_fraction: float = 0.1
    save_steps: int = 50  # checkpoint interval (resume picks up the last one)
    max_grad_norm: float = 1.0
    log_steps: int = 10
    stats_max_responses: int = 2000  # training responses scored for the reward mean/std PPO normalises with
    # Direct feedback (data/feedback/, thumbs up/down): a logistic loss on sigmoid(score + bias), bias learned,
    # beside Bradley-Terry on the comparisons: loss = BT + feedback_weight * BCE (each a mean over its examples)
    feedback_weight: float = 0.5
    feedback_batch_size: int = 16  # feedback rows per step, beside batch_size comparisons
    # An ensemble of K reward models (LoRA adapter + head each) on the one SFT base: the first on all the data (the
    # model ensemble=1 trains), the others each on its own bootstrap sample and seed; K x the stage's time, and K
    # forwards per score. The score is their mean; their disagreement (the std of the members' scores, each
    # standardised) is logged by every policy stage, gated (gate.max_disagreement_ratio) and can be penalised
    # (ppo.uncertainty_penalty). Serving's best-of-n ranks with the first member. 1: no ensemble
    ensemble: int = 1
    # an incremental retrain (retrain.mode): the champion's reward model (every member) trains on for this many steps
    # (at most max_steps) on the rows new since the champion's data, plus `replay_ratio` earlier rows per new row
    # drawn at random from the champion's data (and at least what two passes of its steps need: reward.replay_size),
    # so that what it learned is rehearsed, not forgotten. At 5e-3 (a full
    # run's rate) it lost more of what it knew: demo + 200 comparisons, seed 0, held-out accuracy old/new 0.874/0.857
    # (its champion's 0.904/0.878); at 1e-3 0.886/0.881
    incremental_steps: int = 80
    incremental_learning_rate: float = 1e-3
    replay_ratio: float = 1.0


@dataclass
class GuideConfig:
    """Guided RL (RLGF: Chang et al. 2023, "Learning to Generate Better Than Your LLM"; code Cornell-RL/tril).
    The guide is a black box, text in, continuation out (components/models/guide.py); each rollout is, with
    these probabilities, one of: the policy alone; a roll-in (the guide writes the start, the policy goes on:
    PPO++); a roll-out (the policy's response is cut, the guide completes it: AggreVaTeD or D2LOLS).
    See components/training/guided.py."""

    # reference (the SFT model: adapters off, already in memory) | a local model dir | an MLflow model URI
    # (models:/rlhf-policy@champion, runs:/...) | the URL of a served model (http://host:5001/invocations)
    model: Optional[str] = None
    rollin_prob: float = 0.0  # share of rollouts that start from the guide (PPO++)
    max_rollin_tokens: int = 8  # a roll-in's guide writes h tokens, h uniform in 0..max_rollin_tokens
    rollout_prob: float = 0.0  # share of rollouts the guide completes from a random cut
    rollout_advantage: str = "aggrevated"  # aggrevated | d2lols: how a roll-out's reward enters the advantage
    lols_beta: float = 0.5  # d2lols: weight of the guide's advantage beside PPO's own GAE (LOLS's beta)
    rollout_iterations: Optional[int] = None  # roll-outs only in the first N iterations (TRIL's D2LOLS tau)
    temperature: float = 1.0  # the guide's sampling (a served guide: its request params)
    top_p: float = 1.0
    request_batch: int = 16  # contexts per request to a served or MLflow guide (the pyfunc's max_prompts)
    timeout_s: float = 60.0  # a served guide's request timeout


@dataclass
class SelfEvalConfig:
    """The self-evaluation reward ("the survey trick"): a judge model's probability of a positive verdict after a
    question, read from its next-token distribution, nothing sampled:
    P(positive) / (P(positive) + P(negative)) (components/training/self_eval.py). Use it as a reward with
    ppo.reward_fn=components.training.self_eval:SelfEvalReward."""

    judge: str = "reference"  # reference (the SFT model: PPO's adapters off, already in memory) | a local model dir
    template: str = "{prompt} {response}\nQuestion: thumbs up? Answer:"  # {prompt} and {response} filled in
    positive: str = " yes"  # each must be one token of the judge's tokenizer
    negative: str = " no"
    batch_size: int = 32
    max_length: int = 160  # tokens of a filled template (the start of an over-long one is cut)


@dataclass
class PPOConfig:
    """LoRA PPO on one shared base (policy, reference, value, reward): see components/training/ppo.py."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    # Defaults set by measurement (benchmarks/ppo_vs_rloo.py: the demo, judge reward, 1280 samples, seeds 0-2;
    # benchmarks/results/ppo_vs_rloo.md): 32 rollouts, 2 epochs of 2 minibatches of 16, lr 2e-3, the value head
    # shared with the policy: ~3x the samples/s of the earlier 4 epochs x 4 minibatches of 8, lr 1e-3, value adapter,
    # at almost its reward per sample, and the shortest time to a reward level. Most samples/s (1.5x TRL RLOO's, a
    # lower reward per sample): ppo.batch_size=64 ppo.minibatch_size=32.
    steps: int = 40  # PPO iterations (rollout batch -> update): 1280 rollouts
    incremental_steps: int = 8  # an incremental retrain: the champion's policy and value go on this many iterations
    # ... at this rate (demo + 200 comparisons, seed 0, against the champion: reward -0.107 +- 0.071 at 2e-3, -0.021
    # +- 0.053 at 1e-3; win rate 0.505 and 0.530)
    incremental_learning_rate: float = 1e-3
    batch_size: int = 32  # rollouts per iteration
    minibatch_size: int = 16
    ppo_epochs: int = 2
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    # rollouts
    max_new_tokens: int = 24
    max_prompt_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: Optional[float] = 1.0  # subtracted from the score of a response that never emits EOS
    # subtracted from the score of a response with a word repeated back to back ("worth every every penny"): the
    # cheapest reward hack of a small reward model, priced out where it is bought (the gate's guard measures it)
    repeated_word_penalty: float = 0.0
    # the rollouts' KV cache: dynamic | static (preallocated: on CUDA transformers compiles the decode step into a
    # CUDA graph; the same samples either way, tested on CPU; not yet measured on a GPU, so not the default)
    generation_cache: str = "dynamic"
    # objective
    kl_estimator: str = "k1"  # k1 | k3: per-token KL to the reference in the reward
    init_kl_coef: float = 0.1  # the KL coefficient beta at the start
    target_kl: float = 6.0  # summed KL per response the controller steers to
    # pid: beta as a Lagrange multiplier under PID control (Stooke et al. 2020; ppo_math.PIDKLController)
    # ziegler: Ziegler et al. 2019's multiplicative controller (kl_horizon) | fixed: init_kl_coef throughout
    kl_controller: str = "pid"
    # pid gains, measured on the demo (held-out KL for target 6, seeds 0/1/2): kp 0.1 ki 0.005: 7.0/7.0/6.7 after
    # 40 iterations; kp 0.05: 6.2/8.1/5.9; kp 0.05 ki 0.01: 6.4/7.8/8.1; Ziegler (kl_horizon 500): 2.5 at 40, 9.8 at 120
    kl_kp: float = 0.1  # pid: proportional gain (beta per unit of relative KL error)
    kl_ki: float = 0.005  # pid: integral gain
    kl_kd: float = 0.0  # pid: derivative gain (on a rising KL)
    kl_horizon: int = 500  # ziegler
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_scores: bool = False  # running whitening of the (RM-normalised) score on top of the RM statistics
    max_approx_kl: Optional[float] = 0.1  # stop an epoch's minibatches early when approx-KL exceeds this
    # rewards: the reward model (adapter + head from the RM stage) and/or a callable by import path
    use_reward_model: bool = True
    reward_fn: Optional[str] = None  # "package.module:function", called as f(prompts, responses) -> list[float]
    reward_fn_weight: float = 1.0
    # PPO-ptx (InstructGPT, Ouyang et al. 2022, sec. 3.5): + ptx_coef x the policy's language-model loss on
    # ptx_batch_size demonstrations (prompt + response tokens) per minibatch (per rank), which holds the policy to
    # fluent text on every prompt, not only where PPO samples (the KL penalty's reach). 0.5 measured on the demo
    # (benchmarks/results/ppo_ptx.md, 3 seeds, served sampling): word repeats at or under SFT's on the eval prompts
    # and on prompts unlike the demo's (2.4% against SFT's 3.5%; 5.3% without), for a judge of 0.55 against 0.71 and
    # a KL under its target (2.0: the target is then a ceiling the controller never needs); 0: plain PPO
    ptx_coef: float = 0.5
    ptx_batch_size: int = 8
    # a conservative reward with an ensemble reward model (reward.ensemble > 1): the normalised score less this x
    # the members' disagreement (mean - lambda * std, Coste et al. 2023); also for rejection sampling, GRPO and RLOO
    uncertainty_penalty: float = 0.0
    value_init: str = "reward"  # reward: value adapter + head start from the reward model (InstructGPT) | fresh
    # adapter: the value function is its own LoRA adapter + head (a second forward per minibatch, no coupling) |
    # shared: a head on the policy's own hidden states (one forward; the value loss also trains the policy's LoRA)
    value_model: str = "shared"
    # guards, checkpoints, logging
    kl_ceiling: float = 50.0  # stop with an error when the mean KL per response exceeds this (divergence)
    save_every: int = 10
    sample_every: int = 10  # log a table of prompts and sampled responses every N iterations
    merge: bool = False  # also write the policy merged into the SFT weights
    eval_max_prompts: int = 200  # held-out eval prompts scored at the end (policy vs reference)
    # also score the policy on them every N iterations (0: only at the end): ppo/eval_reward, ppo/eval_kl curves
    # against iterations and ppo/train_elapsed_seconds (the eval's own time is left out of the training clock)
    eval_every: int = 0
    guide: GuideConfig = field(default_factory=GuideConfig)  # guided RL (RLGF); off unless guide.model is set
    self_eval: SelfEvalConfig = field(default_factory=SelfEvalConfig)  # read by the self-evaluation reward_fn


@dataclass
class RejectionSamplingConfig:
    """Rejection-sampling fine-tuning (components/training/rejection_sampling.py): for `rounds` rounds, sample
    `samples_per_prompt` responses to each of `prompts_per_round` prompts, keep each prompt's best
    `keep_fraction` of them (and, with `min_score`, only those scoring at least that), fine-tune the policy LoRA
    on the kept ones with TRL's SFTTrainer. Sampling, reward and LoRA settings are PPO's (ppo.max_new_tokens,
    ppo.temperature, ppo.use_reward_model, ppo.reward_fn, ppo.lora, ...): the same policy stage, another algorithm.
    The defaults sample as many responses as PPO's defaults (4 x 80 x 4 = 40 x 32 = 1280)."""

    rounds: int = 4
    prompts_per_round: int = 80
    samples_per_prompt: int = 4
    keep_fraction: float = 0.25  # of each prompt's samples, the best round(keep_fraction * n) (at least 1)
    min_score: Optional[float] = None  # also drop kept samples scoring below this (normalised reward units)
    train_epochs: float = 2.0  # passes over a round's kept samples
    incremental_rounds: int = 1  # an incremental retrain: rounds from the champion's policy
    batch_size: int = 8
    # demo/tiny, seed 0, held-out RM reward / judge / KL: lr 1e-3: 0.12 / 0.01 / 0.9; 3e-3: 0.16 / 0.12 / 1.7;
    # 5e-3: 0.31 / 0.07 / 5.9; 3e-3 x 4 epochs: 0.37 / 0.12 / 6.8; 8 rounds x 40 prompts: 0.22 / 0.10 / 3.8
    learning_rate: float = 3e-3


@dataclass
class GroupRLConfig:
    """Critic-free online RL (components/training/group_rl.py), GRPO or RLOO: each step samples
    `samples_per_prompt` responses to each of `prompts_per_step` prompts, scores them with PPO's reward (the reward
    model and/or ppo.reward_fn, the missing-EOS penalty), turns each prompt's group of scores into advantages (GRPO:
    normalised by the group's mean and std; RLOO: minus the mean of the others) and takes `epochs` passes of clipped
    policy-gradient minibatches. The KL to the SFT reference: GRPO, `kl_coef` x k3 in the loss; RLOO, `kl_coef` x the
    response's KL off the score. Sampling, reward and LoRA settings are PPO's (`ppo.*`). The defaults sample as many
    responses as PPO's (40 x 8 x 4 = 1280)."""

    steps: int = 40
    incremental_steps: int = 8  # an incremental retrain: steps from the champion's policy
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    epochs: int = 2
    minibatch_size: int = 16  # rows of a step's prompts_per_step * samples_per_prompt
    learning_rate: float = 2e-3
    cliprange: float = 0.2
    kl_coef: float = 0.05
    max_grad_norm: float = 1.0
    save_every: int = 10  # checkpoint interval in steps (resume picks up the last one)


@dataclass
class DirectConfig:
    """Direct alignment (components/training/direct.py): the policy's LoRA trained offline on the project's
    judgements, no sampling and no reward model in the loss; the reference is the SFT model (the adapters disabled).
    `beta` scales the implicit reward beta * log(pi / pi_ref): higher keeps the policy nearer the SFT model. The LoRA
    settings, and the held-out evaluation's sampling, are PPO's (`ppo.*`)."""

    # Set by measurement on the demo (seed 0, 64 held-out prompts): beta 0.1 (the usual for long responses) let the
    # ~20-token responses drift (KL 30-55 nats, held-out RM reward below SFT's); DPO beta 2 and KTO beta 1 at lr 1e-3
    # for 200 steps raised it by 0.28 and 0.35 with KL 1.0 and 1.1 (benchmarks/results/methods.md: 3 seeds).
    steps: int = 200
    incremental_steps: int = 40  # an incremental retrain: steps from the champion's policy
    # ... and at most this many passes over the training judgements: on 90 comparisons (small data, seed 0) DPO's
    # judge gain was 0.19 at 3 passes (17 steps), 0.43 at 9 (50 steps), 0.32 at 36 (200 steps, KL 7.6: overfit)
    max_epochs: float = 10.0
    batch_size: int = 16  # DPO: comparisons per step (a ranking of K counts as one); KTO: feedback rows per step
    learning_rate: float = 1e-3
    beta: float = 1.0
    max_response_tokens: int = 64  # a longer response is cut (and then has no EOS)
    max_grad_norm: float = 1.0
    save_every: int = 25  # checkpoint interval in steps (resume picks up the last one)
    eval_max_examples: int = 200  # held-out comparisons / feedback rows for the implicit reward's accuracy


@dataclass
class DPOConfig(DirectConfig):
    """DPO on the comparisons (data/preferences/): `policy=dpo`."""

    beta: float = 2.0
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust: TRL's DPOTrainer's names and formulas
    label_smoothing: float = 0.0  # robust: the share of comparisons assumed flipped, in [0, 0.5)


@dataclass
class KTOConfig(DirectConfig):
    """KTO on the thumbs (data/feedback/): `policy=kto`."""

    desirable_weight: float = 1.0  # lambda_D: the loss's weight on thumbs up
    undesirable_weight: float = (
        1.0  # lambda_U: on thumbs down (KTO's paper: keep lambda_D n_D / (lambda_U n_U) in 1..4/3)
    )


@dataclass
class PolicyConfig:
    """Which algorithm trains the policy from the SFT model and the reward: `policy=ppo` (default),
    `policy=rejection_sampling`, `policy=grpo`, `policy=rloo` (online, from the reward), `policy=dpo` (offline, from
    the comparisons) or `policy=kto` (offline, from the thumbs); also `policy.algorithm=...`."""

    algorithm: str = "ppo"  # ppo | rejection_sampling | grpo | rloo | dpo | kto
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    grpo: GroupRLConfig = field(default_factory=GroupRLConfig)
    rloo: GroupRLConfig = field(default_factory=GroupRLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)


@dataclass
class FeedbackConfig:
    """Who may put judgements into the data, and how much (service/raters.py, components/registry/feedback.py). The
    per-rater limits hold for a canary's votes too (feedback.canary_votes: per UTC day, and a share of an arm's)."""

    raters_file: Optional[str] = None  # None: <state dir>/raters.json (`rlhf raters add|list|revoke`)
    votes_per_rater_per_day: int = 200  # a rater's votes that reach the data per UTC day; more wait for the next day
    # no rater's share of one ingested batch above this, when the batch has at least min_raters raters (a project
    # with one or two raters still ingests); the rows over it wait for a later harvest
    max_rater_share: float = 0.5
    min_raters: int = 3
    window_days: float = 7.0  # votes on an answer count for this long after it was served
    page_size: int = 500  # judged traces read per request to the tracking server


@dataclass
class CanaryConfig:
    """The canary (`registry.promotion=canary`, or `rlhf model serve --challenger`): the challenger takes a share of the
    traffic, a sequential test on the users' trusted thumbs decides (components/evaluation/sequential.py), and the
    guardrails take it out at once (components/evaluation/guardrails.py). docs/service.md: the life of a candidate."""

    share: float = 0.1  # of the users (sticky: a user is hashed to an arm) who get the challenger
    shadow: bool = False  # the challenger only ever answers in shadow: every prompt, traced, never shown (guardrails)
    # > 0: a canary starts in shadow, and moves to its share once this many challenger answers passed the guardrails
    shadow_answers: int = 0
    on_new_candidate: str = (
        "queue"  # a candidate passing the gate while a canary runs: queue | replace (the running one)
    )
    # with promotion=canary, `rlhf serve` decides the canary this often (null: only `rlhf canary check` decides)
    check_every_s: Optional[int] = 300
    # the sequential test: P(promote | the challenger's thumbs-up rate is not above the champion's), and
    # P(retire | it is at least min_improvement above)
    false_promotion_rate: float = 0.05
    futility_rate: float = 0.05
    min_improvement: float = 0.02  # the smallest rise of the thumbs-up rate worth promoting
    min_judged: int = 50  # judged answers of each arm before any verdict
    deadline_h: float = 72.0  # no verdict by then: the challenger is retired
    # guardrails, per window of `window` challenger answers against the champion's answers of the same time
    # (in shadow: of the same prompts); after `max_failed_windows` failed windows the challenger leaves traffic
    window: int = 50
    max_failed_windows: int = 2
    max_error_rate_gain: float = 0.02  # the challenger's share of failed answers minus the champion's
    max_latency_ratio: float = 1.5  # the challenger's p95 latency as a multiple of the champion's
    max_repeated_word_gain: Optional[float] = 0.05  # share of answers repeating a word, minus the champion's
    min_distinct_2_ratio: Optional[float] = 0.9  # distinct-2 as a share of the champion's
    max_length_ratio: Optional[float] = 2.0  # mean answer length in words, as a multiple of the champion's
    min_length_ratio: Optional[float] = 0.5
    max_reward_drop: Optional[float] = 0.5  # the champion's reward model's mean score, champion minus challenger
    poll_s: float = 10.0  # the serving process re-reads the champion and challenger aliases this often
    webhook: Optional[str] = (
        None  # verdicts, rollbacks and guardrail trips are POSTed here as JSON (and Prefect events)
    )


@dataclass
class RegistryConfig:
    """What a registered model bundles (components/registry/registry.py), and who may judge its answers."""

    # bundle the reward model (its adapter and head): the served model can then answer best-of-n
    # (params.n > 1: n samples per prompt, the one the reward model scores highest) and returns a `score` column
    include_reward_model: bool = True
    # `rlhf model serve`: each answered prompt is an MLflow trace in the project's experiment (prompt, response,
    # candidates and scores, model version), which `rlhf feedback` and `rlhf ingest --from-traces` build on. Prompts
    # are user data: false serves without recording them
    trace_requests: bool = True
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    # what a retrain does with a candidate that passes the gate: direct (move `champion` to it) or canary (make it the
    # `challenger` of the running server, promoted or retired on the users' votes: flows/canary.py)
    promotion: str = "direct"
    canary: CanaryConfig = field(default_factory=CanaryConfig)

    def __post_init__(self):
        if self.promotion not in ("direct", "canary"):
            raise ValueError(f"registry.promotion must be direct or canary, got {self.promotion!r}")


@dataclass
class GateConfig:
    """Evaluation on the frozen eval prompts, then the thresholds a candidate must meet to be registered."""

    approval: str = "auto"  # auto | manual (the flow pauses for an Approval input; needs a reachable Prefect server)
    approval_timeout_s: int = 3600  # manual: no decision within this time -> nothing is promoted
    # thresholds: candidate vs the champion (vs the SFT policy when there is no champion)
    min_reward_gain: float = 0.0  # mean reward-model score (RM std units), candidate minus baseline
    min_win_rate: float = 0.52  # share of eval prompts where the RM prefers the candidate (ties count half):
    # above 0.5, so a candidate identical to the champion (all ties: 0.5) is not promoted again
    min_judge_gain: Optional[float] = 0.0  # mean independent-judge score, candidate minus baseline (None: not gated)
    max_kl: float = 20.0  # the candidate's KL to its SFT reference (nats per response)
    # the reward-hacking guard: the candidate's degeneration against the SFT policy's on the same prompts
    # (components/evaluation/degeneration.py); null switches a check off
    max_repeated_word_gain: Optional[float] = 0.05  # share of answers repeating a word back to back, minus SFT's
    min_distinct_2_ratio: Optional[float] = 0.9  # distinct-2 over all answers, as a share of SFT's
    max_length_ratio: Optional[float] = None  # mean answer length in words, as a multiple of SFT's
    # with an ensemble reward model: its members' mean disagreement on the candidate's answers, as a multiple of
    # their disagreement on SFT's (answers the reward model cannot judge reliably)
    max_disagreement_ratio: Optional[float] = 2.0
    # an incremental candidate (retrain.mode) is its champion trained on a little further: a win rate of 0.52 against
    # its own parent is rarely reached. It must be non-inferior instead - win rate >= 0.5 - margin, judge gain >= its
    # minimum - margin, reward gain >= its minimum - max(margin, 2 standard errors of the per-prompt difference) - and
    # hold what is new: its reward model's accuracy on the held-out new comparisons at most -min_new_accuracy_gain
    # under the champion's reward model's on the same comparisons (on the demo's 20 held-out new comparisons per 200
    # the accuracy's standard error is ~0.07; the champion's already scores them 0.88). The degeneration guard against
    # SFT is the same as for any candidate
    incremental_margin: float = 0.05
    min_new_accuracy_gain: Optional[float] = -0.05  # null: not gated
    # evaluation
    judge: Optional[str] = "components.evaluation.judges:sentiment"  # f(prompts, responses) -> scores; not the RM
    max_prompts: int = 200
    max_new_tokens: int = 24
    temperature: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 1234


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite:///<root>/<state_dir>/mlflow.db
    artifact_root: Optional[str] = None  # None: <root>/<state_dir>/mlartifacts
    experiment: str = "rlhf-ops"
    registered_model_name: str = "rlhf-policy"
    run_name_prefix: str = ""


@dataclass
class InfraConfig:
    name: str = "local"
    state_dir: str = ".rlhf"  # relative to `root`: MLflow db, Prefect home, DVC remote, caches
    dvc_remote_name: str = "rlhf"
    dvc_remote_url: Optional[str] = None  # None: <root>/<state_dir>/dvc-remote; any DVC remote URL works
    dvc_push: bool = True
    prefect_api_url: Optional[str] = None  # None: Prefect's local (ephemeral) server under <state_dir>/prefect
    # a Prefect work pool: SFT, reward model, PPO and evaluation run as flow runs on its workers (flows/dispatch.py);
    # None: every stage runs in the retrain flow's process
    training_pool: Optional[str] = None
    stage_timeout_s: Optional[float] = 86400.0  # how long the retrain waits for a dispatched stage (None: no limit)
    # a dispatched stage whose pool has had no worker online this long is lost (crashed, retried): Prefect's server
    # marks a worker offline ~90 s after its last heartbeat
    worker_lost_s: float = 180.0
    # Data parallel training (service/launch.py): SFT, the reward model and PPO as num_processes processes per machine
    # (one per GPU; on CPU, gloo), started by torchrun or `accelerate launch` where the stage runs (this process, or
    # the pool's worker). Batch sizes stay global: each process takes its share. README, "Scale".
    num_processes: int = 1
    launcher: str = "torchrun"  # torchrun | accelerate (GPUs; with accelerate_config: FSDP, DeepSpeed)
    accelerate_config: Optional[str] = None  # a file of conf/accelerate/ by name (ddp, fsdp, deepspeed_zero2, ...)
    num_machines: int = 1  # several machines: each runs the stage's launcher with its machine_rank
    machine_rank: int = 0
    main_process_ip: Optional[str] = None  # the address of machine_rank 0 (num_machines > 1)
    main_process_port: int = 29500
    retrain_cron: Optional[str] = "0 3 * * *"  # `rlhf serve`: scheduled retrain (None: no schedule)
    # `rlhf serve`: `rlhf ingest --from-traces` on this schedule (the judged served answers become feedback rows,
    # whose new data version triggers the retrain); None: by hand only
    ingest_traces_cron: Optional[str] = None
    retrain_on_new_data: bool = True  # `rlhf serve`: retrain on each `rlhf.data.updated` event
    keep_stage_outputs: Optional[int] = 3  # per stage, the most recently used output dirs kept (None: all)
    # a retrain slot holder on another host with no heartbeat (every 15 s) for this long is taken as crashed
    retrain_slot_stale_s: float = 120.0
    data_lock_timeout_s: float = 1800.0  # an ingest or retrain waits this long for another writer of data/
    # What a triggered or remote run (a Prefect parameter, not the operator's command line) may override: exact keys,
    # deny by default. Each must have bounds in the schema (REMOTE_BOUNDS below: a bounded number, an enum, or a gate
    # setting that may only be made stricter than the operator's); a key without bounds cannot be listed. A group
    # choice (`policy=grpo`) is checked as the keys it changes. Never, whatever is listed: NEVER_REMOTE (code, weights,
    # hosts, files, URIs, the guide, the approval). Not by default: gate.* (allowed only stricter when listed),
    # registry.*, sft.* (it moves the SFT policy the degeneration guard compares against), data.*, model.*.
    remote_overrides: list[str] = field(default_factory=lambda: default_remote())


@dataclass
class RetrainConfig:
    """Full or incremental retraining (flows/retrain.py, components/data/lineage.py). incremental: the champion's
    reward model and policy train on from where they are, on the data new since the champion's (its SFT model, and
    so the KL anchor, unchanged). full: every stage from scratch. auto: incremental when the champion's data is
    contained in today's (every shard of it unchanged) and the config is otherwise the same, full otherwise; the
    run's log says which and why."""

    mode: str = "auto"  # auto | incremental | full


@dataclass
class Config:
    root: str = "."  # project root: data/, data.dvc and the state dir live here
    overrides: list[str] = field(default_factory=list)  # set by `compose`: what this config was composed from
    seed: int = 0
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    sft: SFTConfig = MISSING
    reward: RewardConfig = MISSING
    ppo: PPOConfig = MISSING
    policy: PolicyConfig = MISSING
    gate: GateConfig = MISSING
    registry: RegistryConfig = MISSING
    tracking: TrackingConfig = MISSING
    infra: InfraConfig = MISSING
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    # Derived paths (not config: computed from the fields above).
    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    @property
    def state_path(self) -> Path:
        p = Path(self.infra.state_dir).expanduser()
        return p if p.is_absolute() else self.root_path / p

    @property
    def data_path(self) -> Path:
        p = Path(self.data.dir).expanduser()
        return p if p.is_absolute() else self.root_path / p


_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "sft": SFTConfig,
    "reward": RewardConfig,
    "ppo": PPOConfig,
    "policy": PolicyConfig,
    "gate": GateConfig,
    "registry": RegistryConfig,
    "tracking": TrackingConfig,
    "infra": InfraConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schema in _SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    cs.store(group="ppo/guide", name="schema", node=GuideConfig)


class ConfigError(Exception):
    """A config could not be composed (unknown option, bad override, wrong type)."""


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path = CONF_DIR) -> Config:
    """Compose conf/config.yaml with Hydra overrides and return the typed Config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="rlhf"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        composed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        composed.overrides = list(overrides)
        return composed
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ConfigError(
            f"{e}{cause}\n  (config dir: {config_dir}; options per group: `rlhf config --options`)"
        ) from None


def project_root(overrides: list[str] | tuple[str, ...]) -> Path:
    """The project the command addresses: the last `root=` override, else the working directory."""
    roots = [o.split("=", 1)[1] for o in overrides if o.startswith("root=")]
    return Path(roots[-1] if roots else ".").expanduser().resolve()


def project_overrides(root: Path) -> list[str]:
    """`<root>/rlhf.yaml` as Hydra overrides, group choices first: [] when the project has no such file.

    The file is what `rlhf init` writes: a `defaults:` list of group choices (`- data: own`), then values as nested
    YAML (`model: {name_or_path: /models/mine}`). ConfigError, naming the file, for anything else."""
    import yaml

    path = root / PROJECT_FILE
    if not path.is_file():
        return []

    class Strict(yaml.SafeLoader):
        """A key given twice is refused (PyYAML keeps the last one: a second `gate:` would drop the first)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if (key := self.construct_object(key_node, deep=deep)) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"`{key}` is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        doc = yaml.load(path.read_text(), Loader=Strict) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must be a mapping of config groups (model:, data:, gate:, ...), got {doc!r}")
    out = []
    for choice in doc.pop("defaults", None) or []:
        if not (isinstance(choice, dict) and len(choice) == 1):
            raise ConfigError(
                f"{path}: each `defaults:` entry is one `group: option` (e.g. `- data: own`), got {choice!r}"
            )
        ((group, option),) = choice.items()
        out.append(f"{group}={option}")
    for key, value in doc.items():
        if key in ("root", "overrides", "hydra"):
            raise ConfigError(f"{path}: `{key}` cannot be set in the project file (the project is where the file is)")
        out += [f"{k}={_hydra_value(v)}" for k, v in _leaves(str(key), value)]
    return out


def _hydra_value(value: Any) -> str:
    """A YAML value in Hydra's override grammar: strings quoted (paths, URLs, any character), lists and numbers as is."""
    if isinstance(value, str):
        # Hydra reads a backslash literally unless it precedes a quote or ends the string: double only those
        doubled = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
        return "'" + doubled.replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def compose_project(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`compose` with the project's file (`project_overrides`) first: what every `rlhf` command of the operator
    composes. A bad value in the file is named with the file."""
    root = project_root(overrides)
    project = project_overrides(root)
    if list(overrides[: len(project)]) == project:  # composed from a config that already has them (a sweep variant)
        project = []
    try:
        return compose([*project, *overrides])
    except ConfigError as e:
        if project:
            try:
                compose(project)
            except ConfigError as bad:
                raise ConfigError(f"in {root / PROJECT_FILE}: {bad}") from None
        raise e from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---- what a triggered or remote run may override ----
# Never from a remote, whatever infra.remote_overrides allows: key pattern -> why.
NEVER_REMOTE = {
    "*_fn": "an import path: code the run would call",
    "gate.judge": "an import path: code the run would call",
    "*trust_remote_code": "runs code from the model's repository",
    "gate.approval": "whether a person approves a promotion: only the operator decides",
    "overrides": "the record of what a config was composed from",
    "root": "where the project lives",
    "infra.state_dir": "where the MLflow store, caches and Prefect home live",
    "infra.remote_overrides*": "the allow-list itself",
    "hydra*": "Hydra's own settings (config search path, output dirs)",
    "ppo.guide*": "the guide: a model that is loaded (MLflow models unpickle: code) or a host the prompts are sent to",
    "*name_or_path": "which weights are loaded",
    "*.judge": "a model or import path the run would load",
    "*uri": "a location: a host or a file",
    "*url": "a location: a host or a file",
    "*dir": "a location on this host",
    "*_path": "a location on this host",
    "*file": "a file on this host",
    "*config": "a file on this host",
}


@dataclass(frozen=True)
class Range:
    """A number in lo..hi (an integer where `integer`)."""

    lo: float
    hi: float
    integer: bool = False

    def problem(self, value: Any, operator: Any) -> str | None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.integer and not isinstance(value, int))
        ):
            return f"must be {'an integer' if self.integer else 'a number'} in {self.lo:g}..{self.hi:g}"
        return None if self.lo <= value <= self.hi else f"{value!r} is outside {self.lo:g}..{self.hi:g}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    options: tuple[str, ...]

    def problem(self, value: Any, operator: Any) -> str | None:
        return None if value in self.options else f"{value!r} is not one of {', '.join(self.options)}"


@dataclass(frozen=True)
class Stricter:
    """A setting of the gate's evidence that a remote run may only make stronger than the operator's: a minimum
    raised (`direction` min: at least the operator's value), a maximum lowered (max: at most it), an ensemble at
    least as large; never switched off (null) where the operator has it on."""

    direction: str  # min | max
    lo: float
    hi: float
    integer: bool = False

    def problem(self, value: Any, operator: Any) -> str | None:
        if (bad := Range(self.lo, self.hi, self.integer).problem(value, None)) is not None:
            return bad if value is not None or operator is None else "may not switch off the operator's check"
        if operator is None:
            return None
        weaker = value < operator if self.direction == "min" else value > operator
        return (
            f"{value!r} is weaker than the operator's {operator!r} (a remote run may only make it "
            f"{'larger' if self.direction == 'min' else 'smaller'})"
            if weaker
            else None
        )


Bound = Range | OneOf | Stricter
_POLICIES = ("ppo", "rejection_sampling", "grpo", "rloo", "dpo", "kto")


def _method_bounds(method: str, fields: Mapping[str, Bound]) -> dict[str, Bound]:
    return {f"policy.{method}.{name}": bound for name, bound in fields.items()}


_GROUP_RL = {
    "steps": Range(1, 1000, True),
    "prompts_per_step": Range(1, 256, True),
    "samples_per_prompt": Range(2, 32, True),
    "epochs": Range(1, 16, True),
    "learning_rate": Range(1e-7, 0.1),
    "kl_coef": Range(0.0, 10.0),
}
_DIRECT = {"steps": Range(1, 5000, True), "learning_rate": Range(1e-7, 0.1), "beta": Range(0.01, 100.0)}
# The only keys a remote run can ever set (infra.remote_overrides picks among them), each with what it may be.
REMOTE_BOUNDS: dict[str, Bound] = {
    "seed": Range(0, 2**31 - 1, True),
    "policy": OneOf(_POLICIES),  # the group choice: a packaged conf/policy option
    "policy.algorithm": OneOf(_POLICIES),
    "ppo": OneOf(("default",)),
    "ppo.steps": Range(1, 1000, True),
    "ppo.batch_size": Range(1, 1024, True),
    "ppo.minibatch_size": Range(1, 1024, True),
    "ppo.ppo_epochs": Range(1, 16, True),
    "ppo.learning_rate": Range(1e-7, 0.1),
    "ppo.max_new_tokens": Range(1, 512, True),
    "ppo.temperature": Range(0.1, 2.0),
    "ppo.top_p": Range(0.1, 1.0),
    "ppo.init_kl_coef": Range(0.0, 10.0),
    "ppo.target_kl": Range(0.1, 100.0),
    "ppo.kl_controller": OneOf(("pid", "ziegler", "fixed")),
    "ppo.ptx_coef": Range(0.0, 10.0),
    "ppo.uncertainty_penalty": Range(0.0, 10.0),
    "ppo.repeated_word_penalty": Range(0.0, 10.0),
    "ppo.cliprange": Range(0.01, 1.0),
    "ppo.lora.r": Range(1, 256, True),
    "ppo.lora.alpha": Range(1, 512, True),
    **_method_bounds("rejection_sampling", {"rounds": Range(1, 100, True), "learning_rate": Range(1e-7, 0.1)}),
    **_method_bounds("grpo", _GROUP_RL),
    **_method_bounds("rloo", _GROUP_RL),
    **_method_bounds("dpo", _DIRECT),
    **_method_bounds("kto", {**_DIRECT, "batch_size": Range(2, 1024, True)}),
    "reward.ensemble": Stricter("min", 1, 8, True),  # more members: more evidence, never less than the operator's
    # listable by an operator who wants runs to tighten the gate; never loosen it
    "gate.min_reward_gain": Stricter("min", -10.0, 10.0),
    "gate.min_win_rate": Stricter("min", 0.0, 1.0),
    "gate.min_judge_gain": Stricter("min", -10.0, 10.0),
    "gate.max_kl": Stricter("max", 0.0, 1000.0),
    "gate.max_repeated_word_gain": Stricter("max", -1.0, 1.0),
    "gate.min_distinct_2_ratio": Stricter("min", 0.0, 10.0),
    "gate.max_length_ratio": Stricter("max", 0.0, 100.0),
    "gate.max_disagreement_ratio": Stricter("max", 0.0, 100.0),
    "gate.max_prompts": Stricter("min", 1, 100_000, True),  # more eval prompts: more evidence
}


def default_remote() -> list[str]:
    """What `rlhf serve` lets a run change unless the operator says otherwise (infra.remote_overrides)."""
    return [k for k in REMOTE_BOUNDS if not k.startswith("gate.")]


class OverrideNotAllowed(ValueError):
    """A triggered or remote run asked to override what it may not (infra.remote_overrides)."""


def check_remote_overrides(
    overrides: list[str] | tuple[str, ...], allowed: list[str], base: Config | None = None
) -> None:
    """Raise OverrideNotAllowed naming each refused override, the allow-list setting (infra.remote_overrides)
    and what to do. Whoever can reach the Prefect API can set a run's parameters: an import path, a guide or
    `trust_remote_code` there would run their code on this host, `gate=default` would replace the operator's
    `gate=manual`, `reward.ensemble=1` would drop the operator's ensemble. Deny by default: a key must be listed in
    `allowed` exactly and have bounds in REMOTE_BOUNDS, and its value must be within them. With `base` (the config
    the run starts from), a group choice is checked as every key it changes there, and a `Stricter` bound against
    the operator's value there."""
    refused = [f"  {o}: {why}" for o in overrides if (why := _refusal(o, allowed, base))]
    if refused:
        raise OverrideNotAllowed(
            "refused override(s) of a triggered or remote run:\n"
            + "\n".join(refused)
            + f"\n  allowed (infra.remote_overrides of the serving config): {allowed}\n  To change these, "
            "pass them on the `rlhf serve` command line (the operator's overrides are trusted), or list the key in "
            "infra.remote_overrides there (only keys with bounds in the schema, components/config.py REMOTE_BOUNDS, "
            "can be listed; the never-list (" + ", ".join(NEVER_REMOTE) + ") cannot)."
        )


def _refusal(override: str, allowed: list[str], base: Config | None = None) -> str | None:
    """Why `override` is refused, or None. A dict value (`model={trust_remote_code:true}`) is checked
    key by key, and so is a group choice when `base` is given (the keys it changes); an interpolation
    (`${oc.env:AWS_SECRET_ACCESS_KEY}`) would read this host's environment."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        return "not a Hydra override (key=value, +key=value, ++key=value, ~key)"
    if parsed.package is not None:
        return "a package override (`group@package`) moves config under other keys: never remote"
    if "${" in override.partition("=")[2]:
        return "an interpolation (`${...}`) would read this host's environment or config"
    key = parsed.key_or_group.replace("/", ".")
    if parsed.is_delete():
        denied = next((p for p in NEVER_REMOTE if fnmatchcase(key.lower(), p)), None)
        why = f" (`{key}` matches `{denied}`: {NEVER_REMOTE[denied]})" if denied else ""
        return f"a deletion (`~key`) drops the operator's value: never remote{why}"
    is_choice = parsed.key_or_group in (*GROUPS, *SUBGROUPS) and isinstance(parsed.value(), str)
    if is_choice and parsed.value() not in group_options().get(parsed.key_or_group, []):
        return f"`{parsed.value()}` is not an option of the group `{parsed.key_or_group}` (`rlhf config --options`)"
    leaves = [(key, parsed.value())] if is_choice else _leaves(key, parsed.value())
    if is_choice and base is not None:
        leaves += _changed(base, override, key)
    for key, value in leaves:
        denied = next((p for p in NEVER_REMOTE if fnmatchcase(key.lower(), p)), None)
        if denied:
            return f"`{key}` matches `{denied}`, which is never overridable remotely ({NEVER_REMOTE[denied]})"
        if key not in allowed:
            return f"`{key}` is not listed in infra.remote_overrides"
        bound = REMOTE_BOUNDS.get(key)
        if bound is None:
            return f"`{key}` has no bounds in the schema (REMOTE_BOUNDS), so it is never remote even when listed"
        if (problem := bound.problem(value, _value_at(base, key) if base is not None else None)) is not None:
            return f"`{key}` {problem}"
    return None


def _value_at(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _changed(base: Config, override: str, group: str) -> list[tuple[str, Any]]:
    """The leaf keys under `group` whose values a group choice changes in `base`, with their new values (e.g.
    `gate=default` over `gate=manual`: gate.approval): composed with and without it."""

    def flat(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for sub, value in node.items() for k, v in flat(value, f"{prefix}.{sub}").items()}
        return {prefix: node}

    def leaves(cfg: Config) -> dict[str, Any]:
        node: Any = to_dict(cfg)
        for part in group.split("."):
            node = node[part]
        return flat(node, group)

    before, after = leaves(base), leaves(compose([*base.overrides, override]))
    return sorted((k, after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _leaves(key: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [kv for sub, v in value.items() for kv in _leaves(f"{key}.{sub}", v)]
    return [(key, value)]


def group_options(config_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """The YAML options of every config group and subgroup (what `group=option` accepts)."""
    return {g: sorted(p.stem for p in (config_dir / g).glob("*.yaml")) for g in (*GROUPS, *SUBGROUPS)}
