"""LoRA roles on one shared base: named peft adapters plus scalar heads.

The reward model and the PPO value function are "an adapter + a scalar head" on the SFT
model; the policy is "an adapter + the LM head"; the reference is "adapters disabled".
All roles run through the same base weights (peft multi-adapter), so the base is in
memory once. This module holds the pieces every role shares:

- `ScalarHead`: hidden state -> one number, saved as safetensors.
- `reward_members`, `attach_reward_members`, `member_scores`, `RewardScale`: a reward model's members (one, or an
  ensemble's adapters and heads), loading them onto a model, their scores, and how those become the normalised score and the ensemble's disagreement.
- `hidden_states(model, ...)`: the backbone's last hidden states (no LM head, no vocab-size
  logits) for whichever adapter is active.
- `last_token_index`: where a sequence ends, for left or right padding.
- `activate(model, name, trainable)`: switch the active adapter without peft's side effect
  of changing which adapters train.
- `Roles`: the shared model with its adapters and heads (PPO's four roles); `with roles.use("value"):`
  runs a block with one role active and always switches back, even when the block raises.
- `lora_merged(model)`: the active adapter folded into the base weights for a block of sampling.
- `lora_config(settings)`: the peft LoraConfig of a stage's `lora` settings (SFT, reward model, PPO); "all-linear"
  adapts every linear layer but the LM head in any family (components/models/families.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:  # annotations only: peft and transformers load lazily, where a stage needs them
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HEAD_FILE = "head.safetensors"
HEAD_META = "head.json"
REFERENCE = "reference"  # the role with every adapter disabled (the SFT model), for `Roles.use`


class ScalarHead(nn.Module):
    """Linear(hidden, 1). Initialised small (std 1/sqrt(hidden+1)), as in summarize_from_feedback.

    Runs in fp32 whatever the base's `model.dtype`: its weights are created, saved and loaded in fp32, and the
    hidden states (bf16 or fp16 from a half-precision base) are cast up before it. A reward or a value is one
    number read from H features: bf16's 8-bit mantissa would round it to ~0.4% of its size (a reward margin or a
    GAE target smaller than that vanishes), and the head is H + 1 weights, so fp32 costs nothing measurable."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (..., H) in the base's dtype -> (...) fp32
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, directory: Path, **meta) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / HEAD_FILE))
        (directory / HEAD_META).write_text(json.dumps({"hidden_size": self.linear.in_features, **meta}, indent=2))

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> tuple[ScalarHead, dict]:
        meta = json.loads((Path(directory) / HEAD_META).read_text())
        head = cls(meta["hidden_size"])
        head.load_state_dict({k: v.float() for k, v in load_file(str(Path(directory) / HEAD_FILE)).items()})
        return head.to(device), meta


ENSEMBLE = "ensemble"  # head.json of a reward ensemble's first member: the other members and the ensemble's statistics
REWARD = "reward"  # the adapter name of a reward model's (first) member; the others are reward_1, reward_2, ...


def reward_members(reward_dir: str | Path) -> list[tuple[str, Path]]:
    """(adapter name, directory) of each member of a reward model: ("reward", reward_dir) for one model; with an
    ensemble (`reward.ensemble` > 1) also ("reward_1", reward_dir/members/1), ... Each directory holds `adapter/`
    and the head (the first member is a complete reward model on its own)."""
    meta = json.loads((Path(reward_dir) / HEAD_META).read_text())
    others = meta.get(ENSEMBLE, {}).get("members", [])
    return [(REWARD, Path(reward_dir))] + [(f"{REWARD}_{i}", Path(reward_dir) / m) for i, m in enumerate(others, 1)]


def attach_reward_members(
    model: PreTrainedModel | PeftModel, members: list[tuple[str, Path]], device: torch.device | str
) -> tuple[PeftModel, dict[str, ScalarHead], RewardScale]:
    """Each member's LoRA adapter onto `model`, frozen, under its name (`reward_members`), and its head on `device`:
    -> the peft model (a plain model becomes one on the first member's adapter), the heads by adapter name, and the
    scale of the first member's head.json (the ensemble's, once it is written there)."""
    from peft import PeftModel

    heads: dict[str, ScalarHead] = {}
    scale = RewardScale(0.0, 1.0)
    for name, member in members:
        adapter = str(member / "adapter")
        if isinstance(model, PeftModel):
            model.load_adapter(adapter, adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
        heads[name], meta = ScalarHead.load(member, device)
        heads[name].requires_grad_(False)
        if name == REWARD:
            scale = RewardScale.of(meta)
    assert isinstance(model, PeftModel)  # members is never empty: reward_members lists the first
    return model, heads, scale


@dataclass(frozen=True)
class RewardScale:
    """How a reward model's raw scores become what the policy stages optimise. One member: its score normalised with
    its training responses' mean and std. An ensemble: the members' mean score, normalised with that mean's
    training statistics; and their disagreement: the std over the members of each one's score standardised by its
    own training mean and std (members trained with Bradley-Terry agree only up to a shift and a scale, so their raw
    spread would measure nothing). Both in units of one training-reward std."""

    mean: float
    std: float
    member_mean: tuple[float, ...] = (0.0,)
    member_std: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, meta: dict) -> RewardScale:
        """From the (first member's) head.json."""
        stats = meta.get(ENSEMBLE, meta)
        mean, std = stats["reward_mean"], stats["reward_std"]
        return cls(mean, std, tuple(stats.get("member_mean", [mean])), tuple(stats.get("member_std", [std])))

    def normalise(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """members: (B, K) raw member scores -> the normalised score (B,) and the disagreement (B,) (0 for one)."""
        score = (members.mean(-1) - self.mean) / self.std
        m = torch.tensor(self.member_mean, device=members.device, dtype=members.dtype)
        s = torch.tensor(self.member_std, device=members.device, dtype=members.dtype)
        return score, ((members - m) / s).std(-1, correction=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row, for left or right padding.

    attention_mask: (B, T) of 0/1 -> (B,) long
    """
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token (left padding must not shift them).

    attention_mask: (B, T) -> (B, T) long
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone(model: PreTrainedModel | PeftModel) -> nn.Module:
    """The transformer without its LM head, for a plain or peft-wrapped causal LM."""
    unwrap = getattr(model, "get_base_model", None)  # a PeftModel's; a plain model has none
    base = unwrap() if unwrap is not None else model
    return base.get_decoder()


def hidden_states(
    model: PreTrainedModel | PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Last-layer hidden states with the currently active adapter: (B, T) -> (B, T, H)."""
    out = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    )
    return out.last_hidden_state


def lm_logits(model: PreTrainedModel | PeftModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on last hidden states, with what the family's own forward applies after it (Gemma 2/3's final
    logit soft-capping, Cohere's logit_scale, Granite's logits_scaling): (..., H) -> (..., V), equal to
    model(...).logits at those positions."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if scale := getattr(config, "logit_scale", None):  # Cohere
        logits = logits * scale
    if scaling := getattr(config, "logits_scaling", None):  # Granite
        logits = logits / scaling
    if cap := getattr(config, "final_logit_softcapping", None):  # Gemma 2, Gemma 3
        logits = torch.tanh(logits / cap) * cap
    return logits


def sequence_scores(
    model: PreTrainedModel | PeftModel, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """One scalar per sequence, read at its last real token: (B, T) -> (B,)."""
    h = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    idx = last_token_index(attention_mask)  # (B,)
    return head(h[torch.arange(h.shape[0], device=h.device), idx])


def member_scores(
    model: PeftModel, heads: dict[str, ScalarHead], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Each reward member's score of the sequences, its adapter active in turn: (B, T) -> (B, K). For scoring, not
    training: every adapter is frozen meanwhile, and the last member's stays active; the caller switches back
    (`Roles.use` restores the active adapter and which ones train)."""
    out = []
    for name, head in heads.items():
        activate(model, name)
        out.append(sequence_scores(model, head, input_ids, attention_mask))
    return torch.stack(out, -1)


def activate(model, name: str, trainable: set[str] | frozenset[str] = frozenset()) -> None:
    """Make `name` the active adapter; exactly the adapters in `trainable` keep requires_grad.

    peft's `set_adapter` also flips requires_grad (active on, others off), which would silently
    freeze the policy while the value adapter runs; this undoes that.
    """
    model.set_adapter(name)
    names = set(model.peft_config)
    if trainable:
        model.set_requires_grad(sorted(trainable & names), True)
    if names - set(trainable):
        model.set_requires_grad(sorted(names - set(trainable)), False)


@contextmanager
def lora_merged(model) -> Iterator[object]:
    """The active LoRA adapter folded into the base weights for the block (peft's merge_adapter / unmerge_adapter):
    each adapted linear layer then runs one matmul instead of three (x W + x A B), and launches a third of the
    kernels. For sampling, where nothing trains: ~18% less time per PPO rollout batch on the demo
    (benchmarks/results/ppo_vs_rloo.md). Unfolded on exit, even by an exception. In fp32, float rounding leaves the
    base weights within a few ulp of where they were (TRL's GRPO does the same before each vLLM weight sync). In bf16
    or fp16, W + BA - BA does not: it moved every weight of a tiny Llama, by up to 0.0025 after ten cycles, which
    would drift the frozen reference role a little each PPO iteration; so a half-precision base's adapted weights
    are copied before the merge and copied back after the unmerge, bit for bit (memory: one copy of the adapted
    weights while the block runs). A 4/8-bit base (model.quantization) is not merged into: requantising on every
    merge would drift it. For a training process only: never around a model that serves requests from several
    threads, nor inside `disable_adapter()` (the reference role). A plain model runs as it is."""
    from components.models.loading import is_quantized

    merge = hasattr(model, "merge_adapter") and not is_quantized(model)
    saved = half_precision_base_weights(model) if merge else []
    if merge:
        model.merge_adapter()
    try:
        yield model
    finally:
        if merge:
            model.unmerge_adapter()
            with torch.no_grad():
                for weight, copy in saved:
                    weight.copy_(copy)


def half_precision_base_weights(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, a copy of it) for each LoRA-adapted base weight stored in bf16 or fp16; [] for an fp32 base."""
    return [
        (m.base_layer.weight, m.base_layer.weight.detach().clone())
        for m in model.modules()
        if hasattr(m, "lora_A")
        and hasattr(m, "base_layer")
        and m.base_layer.weight.dtype in (torch.bfloat16, torch.float16)
    ]


def lora_config(settings, model=None):
    """peft LoraConfig for a causal LM from a stage's `lora` settings (components.config.LoraConfig).

    target_modules ["all-linear"] (the default) goes to peft as "all-linear": every nn.Linear and transformers
    Conv1D layer but the LM head, resolved on the model by peft, whatever the family (the modules per family:
    components/models/families.py). A Conv1D layer (GPT-2) stores its weight (in, out): LoRA needs
    fan_in_fan_out=True there. peft sets it on the config itself when it meets one (with a UserWarning; merges
    and saved adapters are right: tests/models/test_families.py), so callers need not pass `model`. With `model`:
    fan_in_fan_out is set up front (no warning), and a family whose `all_linear` is false in the table gets its
    explicit module list instead."""
    from peft import LoraConfig

    from components.models.families import ALL_LINEAR, family_of, has_conv1d

    targets = [settings.target_modules] if isinstance(settings.target_modules, str) else list(settings.target_modules)
    all_linear = [t.lower() for t in targets] == [ALL_LINEAR]
    family = family_of(model) if model is not None else None
    if all_linear and family is not None and not family.all_linear:
        targets, all_linear = list(family.lora_targets), False
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=ALL_LINEAR if all_linear else targets,
        fan_in_fan_out=model is not None and has_conv1d(model),
        task_type="CAUSAL_LM",
    )


@dataclass
class Roles:
    """One base model, several roles as peft adapters (+ scalar heads). PPO: policy (adapter "policy" + LM head),
    reference (adapters disabled), value (adapter "value" + `value_head`), reward (frozen adapter "reward" +
    `reward_heads`, normalised with `reward_scale`; an ensemble is one adapter + head per member: reward, reward_1,
    ...), and an optional reward callable."""

    model: PeftModel  # PeftModelForCausalLM: SFT base + adapters policy, value[, reward]
    tok: PreTrainedTokenizerBase
    value_head: ScalarHead | None  # None: rejection sampling's roles, which have no critic
    reward_heads: dict[str, ScalarHead]  # adapter name -> head, per reward member ({}: no reward model)
    reward_scale: RewardScale
    reward_fn: Callable[[list[str], list[str]], list[float]] | None
    trainable: frozenset[str] = frozenset({"policy", "value"})
    policy: str = "policy"  # the policy's adapter name

    @property
    def reward_members(self) -> int:
        """The reward model's ensemble size (0: no reward model)."""
        return len(self.reward_heads)

    @contextmanager
    def use(self, name: str) -> Iterator[PeftModel]:
        """Run the block with adapter `name` active (`REFERENCE`: all adapters disabled); on exit, even by an
        exception, the adapter active before is active again and exactly `trainable` keep requires_grad."""
        previous = self.model.active_adapter
        try:
            if name == REFERENCE:
                with self.model.disable_adapter():
                    yield self.model
            else:
                activate(self.model, name, self.trainable)
                yield self.model
        finally:
            activate(self.model, previous, self.trainable)  # also undoes peft's disable/enable resetting requires_grad
