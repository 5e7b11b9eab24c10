"""Point-to-point and broadcast over the pipeline-parallel group for generation (gloo and NCCL).

megatron-core's ``inference/communication_utils.py`` asserts CUDA tensors; these helpers use
plain ``torch.distributed`` ``send`` / ``recv`` / ``broadcast`` with group-relative ranks, so
they work with CPU tensors on gloo and CUDA tensors on NCCL alike. The receiver allocates its
buffer from a shape every rank already knows (generation is lock-step: ``[S, B, H]`` with
``S`` the prompt length at prefill and 1 at decode, ``B`` the number of live rows), so no
shape exchange is needed. Stage ``i`` talks to stages ``i - 1`` / ``i + 1`` of the same group,
i.e. to the rank holding the same tensor-parallel shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PipelineLinks:
    """This rank's place in its pipeline-parallel group (``group`` ``None``: PP = 1)."""

    group: object
    rank: int
    size: int

    @classmethod
    def of(cls, group) -> "PipelineLinks":
        if group is None or dist.get_world_size(group) == 1:
            return cls(group=None, rank=0, size=1)
        return cls(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def send_next(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (contiguous copy if needed) to the next stage."""
        if self.is_last:
            raise RuntimeError("the last pipeline stage has no next stage")
        dist.send(tensor.contiguous(), group=self.group, group_dst=self.rank + 1)

    def recv_prev(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Receive a ``shape``/``dtype`` tensor from the previous stage into a new buffer on ``device``."""
        if self.is_first:
            raise RuntimeError("the first pipeline stage has no previous stage")
        buf = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(buf, group=self.group, group_src=self.rank - 1)
        return buf

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's ``tensor`` on every stage (in place; others pass a buffer of the same shape/dtype)."""
        if self.size == 1:
            return tensor
        dist.broadcast(tensor, group=self.group, group_src=self.size - 1)
        return tensor
