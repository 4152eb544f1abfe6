"""Loss scaling for a float16 base (`model.dtype=float16`), in the loops of our own (reward model, PPO).

fp16's smallest normal number is 6e-5: the activation gradients of a backward through an fp16 base underflow to 0
long before the loss is small. `LossScaler` is torch.amp.GradScaler around one optimizer: the loss is multiplied by
a scale before the backward, the gradients are divided by it before clipping, and a step whose gradients overflowed
(inf/NaN) is skipped while the scale halves (it doubles again after 2000 clean steps). fp32 and bf16 (fp32's
exponent range) pass through unchanged: the same calls, the same numbers. The scale is not checkpointed: a resumed
run starts again from 2^16 and finds its level within a few steps. SFT and rejection sampling train through TRL's
SFTTrainer, where mixed precision is the trainer's (`fp16`/`bf16` arguments), not this.
"""

from __future__ import annotations

import torch


class LossScaler:
    def __init__(self, dtype: str, device: torch.device | str):
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float) -> None:
        """Unscale the gradients, clip them to `max_grad_norm`, step (skipped if they overflowed), update the scale."""
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
