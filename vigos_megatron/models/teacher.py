"""The frozen teacher: a replica of the initial student, sharded exactly like it.

The teacher is built by the same :class:`~vigos_megatron.models.builder.QwenVLBuilder`
(same TP/PP layout, so each rank holds the same shard of every tensor as its student,
vision tower included on the first stage) and its parameters are copied from the
student's *current local shards* (call it before the first optimizer step, i.e. from the
initial weights). It is then frozen: ``requires_grad=False`` on every parameter, ``eval()``
mode, never wrapped in DDP and never handed to an optimizer, so it has no gradient buffer
and no optimizer state. Run it under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vigos_megatron.models.builder import param_bytes, param_count


@dataclass
class TeacherReplica:
    """Frozen model chunks (one per pipeline stage of this rank) and their memory."""

    chunks: list
    #: bytes of this rank's teacher parameters
    local_param_bytes: int
    local_param_count: int

    def total_param_bytes(self, group=None) -> int:
        """Sum of :attr:`local_param_bytes` over ``group`` (e.g. the model-parallel group)."""
        import torch.distributed as dist

        if group is None or not dist.is_initialized():
            return self.local_param_bytes
        from vigos_megatron.runtime import compute_device

        t = torch.tensor([self.local_param_bytes], dtype=torch.int64, device=compute_device())
        dist.all_reduce(t, group=group)
        return int(t.item())

    def report(self, group=None) -> str:
        total = self.total_param_bytes(group)
        return (
            f"teacher replica: {self.local_param_count:,} params, {self.local_param_bytes / 2**20:.3f} MiB on this rank, "
            f"{total / 2**20:.3f} MiB over the model-parallel group"
        )


def freeze_(chunks: list) -> None:
    for m in chunks:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
            p.grad = None


def build_teacher_replica(builder, student_chunks: list) -> TeacherReplica:
    """Build chunks with ``builder``'s layout and copy the student's local shards into them."""
    teacher = builder.build(init_weights=False)
    if len(teacher) != len(student_chunks):
        raise ValueError(f"teacher has {len(teacher)} chunks, student {len(student_chunks)}")
    with torch.no_grad():
        for t_chunk, s_chunk in zip(teacher, student_chunks):
            s_state = {k: v for k, v in _unwrap(s_chunk).state_dict(keep_vars=True).items()}
            t_state = _unwrap(t_chunk).state_dict(keep_vars=True)
            missing = sorted(set(t_state) ^ set(s_state))
            if missing:
                raise ValueError(f"teacher and student layouts differ: {missing[:10]}")
            for name, t in t_state.items():
                s = s_state[name]
                if not isinstance(t, torch.Tensor):
                    continue
                if t.shape != s.shape:
                    raise ValueError(f"teacher/student shard shape differs for {name}: {tuple(t.shape)} vs {tuple(s.shape)}")
                t.copy_(s.detach())
    freeze_(teacher)
    return TeacherReplica(chunks=teacher, local_param_bytes=param_bytes(teacher), local_param_count=param_count(teacher))


def _unwrap(m):
    """Strip DDP / Float16Module wrappers (megatron's ``unwrap_model``)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(m)
