"""Tiny collectives that keep replicated training state identical across processes.

Each helper works with and without an initialised ``torch.distributed`` process group: with none (or a
group of one process) it returns its input untouched, so single-process code paths stay bit-identical.
Under a group every process of the group must call the same helpers in the same order (they are
collectives); models call them from ``training_loss`` / ``forward`` in training mode only, which every
data-parallel rank runs in lockstep.

Replica checks (:func:`replica_mismatches`) compare per-tensor checksums of the raw bits across ranks,
for the trainer's "every rank holds the same model" guard.
"""
from __future__ import annotations

from typing import Iterable

import torch

_OPS = ("sum", "max", "min")


def world_size() -> int:
    """Processes in the default group (1 without an initialised group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without an initialised group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return world_size() > 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over all processes (``op``: ``"sum"``, ``"max"`` or ``"min"``) and return it.

    Integer tensors reduce exactly; float sums depend on the backend's order (use float64 or integers
    where the result must be the same on every rank, which it is: every rank receives the same value).
    Without a process group ``t`` is returned as it is.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"all_reduce_ needs a tensor, got {type(t).__name__}")
    if not is_distributed():
        return t
    import torch.distributed as dist

    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    if t.dtype == torch.bool:  # gloo/nccl have no bool reduction: go through uint8
        u = t.to(torch.uint8)
        dist.all_reduce(u, op=red)
        t.copy_(u > 0)  # sum and max: any; min: all
        return t
    dist.all_reduce(t, op=red)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s copy and return it (no-op without a process group)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"broadcast_ needs a tensor, got {type(t).__name__}")
    if not is_distributed():
        return t
    import torch.distributed as dist

    if not 0 <= src < dist.get_world_size():
        raise ValueError(f"src must be a rank in [0, {dist.get_world_size()}), got {src}")
    dist.broadcast(t, src=src)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t [n, ...]`` along dim 0 in rank order (all ranks must pass the same
    shape); ``t`` itself without a process group."""
    if not is_distributed():
        return t
    import torch.distributed as dist

    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of ``t``'s raw bits: their sum, and their sum weighted by position
    (``i % 65521 + 1``), so a changed, swapped or moved value almost surely changes it. ``[2]`` int64,
    on ``t``'s device."""
    x = t.detach().contiguous().reshape(-1)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    size = x.element_size()
    if x.is_floating_point() or x.is_complex():
        x = x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[size])
    x = x.to(torch.int64) if size < 8 else x
    if x.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=t.device)
    w = torch.arange(x.numel(), device=x.device, dtype=torch.int64) % 65521 + 1
    # int64 wrap-around on overflow is fine: equal bits give equal sums on every rank
    return torch.stack([x.sum(), (x * w).sum()])


def replica_mismatches(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names whose tensors differ between the ranks (compared through :func:`checksum`); ``[]``
    without a process group. A collective: every rank must pass the same names in the same order."""
    named = list(named)
    if not is_distributed() or not named:
        return []
    import torch.distributed as dist

    device = named[0][1].device
    local = torch.stack([checksum(v).to(device) for _, v in named])  # [n, 2]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    same = torch.stack([(p == parts[0]).all(1) for p in parts[1:]]).all(0)  # [n]
    return [n for (n, _), ok in zip(named, same.tolist()) if not ok]
