"""The collectives the training code uses, each the identity without a process group (one
worker, or the local runtime): sums and means over data-parallel workers, gathers of tensors
and of Python objects."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over data-parallel workers (themselves on one worker)."""
    if not distributed():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def global_mean(value: float, device: torch.device) -> float:
    """Average a scalar over data-parallel workers (identity on one worker)."""
    world = dist.get_world_size() if distributed() else 1
    return float(global_sum(torch.tensor([value], dtype=torch.float64, device=device))) / world


def all_gather_1d(local: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized 1-D tensors from every worker (identity without a process group)."""
    if not distributed():
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any, world_size: int) -> list:
    """Every worker's `obj`, in rank order (a collective; [obj] without a process group)."""
    if world_size == 1 or not distributed():
        return [obj]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
