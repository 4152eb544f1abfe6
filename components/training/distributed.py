"""Data parallelism for the project's own training loops (reward model, PPO): ranks, reductions, rank 0's side
effects. TRL's trainers (SFT, rejection sampling's fine-tuning) are accelerate-native and need none of this.

A stage runs as N processes when `infra.num_processes` > 1 (service/launch.py starts them with torchrun or
`accelerate launch`); the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT and `init` joins the
process group through accelerate's PartialState (gloo on CPU, nccl on GPU, each rank on its own GPU). Without a
launcher a stage is rank 0 of 1 and every function here is the identity or a no-op, so one code path serves both.

The scheme (what `components/training/ppo.py` and `reward.py` do with it):
- each rank takes its own slice of the global batch (`shard`), so the config's batch sizes stay global: 2 processes
  at `ppo.batch_size=32` sample 16 rollouts each and train on the same number of samples per step as 1 process;
- after each backward, `all_reduce_gradients` averages the trainable parameters' gradients (one flat all-reduce of
  the LoRA and head gradients, plus any scalars the ranks must agree on: a loss to check, an approx-KL to stop on);
  every rank then clips and steps the same averaged gradient, so the replicas stay identical;
- decisions (early stop, divergence) are taken on reduced values, so all ranks take them together (a rank that
  raised alone would leave the others waiting in the next collective);
- metrics are reduced across ranks (`reduce_metrics`); only rank 0 logs to MLflow and writes checkpoints and outputs.

Why not torch's DistributedDataParallel wrapper: PPO runs one base model in four roles, switching peft adapters and
calling the backbone directly (components/models/roles.py); DDP only syncs gradients of forwards through its own
wrapper and needs every trainable parameter used in each. The trainable parameters are LoRA weights and a head,
a few MB: one explicit all-reduce per optimizer step is what DDP's bucketing would do for them anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cpu: bool) -> World:
    """Join the launcher's process group (accelerate's PartialState: gloo on CPU, nccl on GPU, the GPU of
    LOCAL_RANK made current); a no-op in a single process. -> this process's place in the world."""
    if launched() and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=cpu)
    return world()


def world() -> World:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return World()
    return World(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    )


def is_main() -> bool:
    return world().main


def shard(items: Sequence, w: World | None = None) -> list:
    """This rank's contiguous slice of a global batch; its length must divide evenly (checked by the caller)."""
    w = w or world()
    n = len(items) // w.size
    return list(items[w.rank * n : (w.rank + 1) * n])


def per_rank(total: int, name: str, w: World | None = None) -> int:
    """A global batch size split over the ranks: -> the per-rank size. A size the world does not divide is an error
    (uneven ranks would train on different amounts and deadlock on the last collective)."""
    w = w or world()
    if total % w.size:
        raise ValueError(f"{name}={total} is not divisible by the {w.size} processes (infra.num_processes)")
    return total // w.size


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], *scalars: torch.Tensor) -> list[torch.Tensor]:
    """Average the gradients of `params` over the ranks, in place, in one flat all-reduce; `scalars` (0-dim
    tensors) ride along and come back averaged. A parameter without a gradient counts as zeros. -> the scalars."""
    w = world()
    if w.size == 1:
        return [s.detach() for s in scalars]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device if grads else scalars[0].device
    flat = torch.cat(
        [g.reshape(-1).float() for g in grads] + [s.detach().reshape(1).float().to(device) for s in scalars]
    )
    torch.distributed.all_reduce(flat)
    flat /= w.size
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    return list(flat[offset:].unbind())


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of a tensor over the ranks (a copy; the input itself in a single process)."""
    if world().size == 1:
        return values
    out = values.detach().to(_device(), copy=True)
    torch.distributed.all_reduce(out)
    return out.to(values.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any."""
    return bool(all_sum(torch.tensor([float(flag)])).item() > 0)


def reduce_metrics(
    row: dict[str, float], optional: Sequence[str] = (), sum_keys: Sequence[str] = ()
) -> dict[str, float]:
    """A metrics row averaged over the ranks (the keys in `sum_keys`, throughputs, summed). Every rank passes the same
    keys, except those in `optional`, which a rank may lack: those are averaged over the ranks that have them and
    left out where none has. A NaN is averaged like a missing value."""
    w = world()
    if w.size == 1:
        return dict(row)
    keys = sorted(set(row) | set(optional))
    values = torch.tensor([float(row.get(k, float("nan"))) for k in keys], dtype=torch.float64)
    present = ~torch.isnan(values)
    totals = all_sum(torch.cat([torch.where(present, values, 0.0), present.double()]))
    sums, counts = totals[: len(keys)], totals[len(keys) :]
    out = {}
    for k, total, n in zip(keys, sums.tolist(), counts.tolist(), strict=True):
        if n:
            out[k] = total if k in sum_keys else total / n
        elif k in row:
            out[k] = float("nan")
    return out


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape on all), concatenated in rank order along dim 0."""
    w = world()
    if w.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(w.size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def check_replicas(params: Sequence[torch.nn.Parameter], what: str) -> None:
    """Raise on every rank unless all ranks hold the same values of `params` (sum, sum of squares and max of
    their entries, compared exactly): replicas that drifted apart would each write a different model."""
    if world().size == 1:
        return
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    digest = torch.stack([flat.sum(), (flat * flat).sum(), flat.abs().max()]).to(_device())
    digests = gather_tensor(digest[None])  # (ranks, 3)
    if not (digests == digests[:1]).all():
        raise RuntimeError(f"{what}: the processes' replicas differ ({digests.tolist()}); nothing was written")


def barrier() -> None:
    if world().size > 1:
        torch.distributed.barrier()


def _device() -> torch.device:
    """Where collectives put their buffers: the current GPU under nccl, the CPU under gloo."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
