"""Guarded collectives: the one place that decides whether a reduction needs communication.

``group`` is a ``torch.distributed`` process group; ``None`` means "not distributed along this
axis" (no tensor parallelism, no data parallelism), and so does a group of one rank or no
initialised default group. Pass ``torch.distributed.group.WORLD`` for the whole launch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group) -> int:
    """Ranks of ``group`` (1 for ``None`` or without an initialised default group)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """``t`` reduced in place over ``group`` when that needs communication; returns ``t``."""
    if t.numel() > 0 and group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def reduce_int(value: int, group, op=dist.ReduceOp.SUM, *, device=None) -> int:
    """One integer reduced over ``group`` (``device``: the backend's, e.g. CUDA for NCCL)."""
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.int64, device=device), group, op).item())


def all_gather_rows(t: Tensor, group) -> Tensor:
    """The 1-D tensors ``t`` of every rank of ``group`` (their lengths may differ), concatenated in rank order.

    Two all-gathers: the lengths (int64), then the values padded to the longest. ``t`` itself without
    communication for a group of one rank.
    """
    n = group_size(group)
    if n == 1:
        return t
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([t.numel()], dtype=torch.int64, device=t.device), group=group)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])
