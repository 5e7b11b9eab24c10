"""The frozen teacher: the replica of the initial student, or a checkpoint of its own (``model.teacher``).

* :func:`build_teacher_replica`: built by the student's
  :class:`~vigos_megatron.models.builder.QwenVLBuilder` (same TP/PP layout, so each rank holds the same
  shard of every tensor as its student, vision tower included on the first stage); its parameters are
  copied from the student's *current local shards* (call it before the first optimizer step).
* :func:`load_teacher`: a separate checkpoint (HF or Megatron), of the student's size or another, built
  by its own builder with the student's TP and pipeline stages (its layers split per stage by
  :func:`vigos_megatron.config.teacher.stage_layers`); its vision tower is its own.

Either way it is frozen: ``requires_grad=False`` on every parameter, ``eval()`` mode, never wrapped in
DDP and never handed to an optimizer, so it has no gradient buffer and no optimizer state (in the model
dtype: bf16 on GPU, no fp32 copy). Run it under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vigos_megatron.models.builder import QwenVLBuilder, param_bytes, param_count


@dataclass
class FrozenTeacher:
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
            f"frozen teacher: {self.local_param_count:,} params, {self.local_param_bytes / 2**20:.3f} MiB on this rank, "
            f"{total / 2**20:.3f} MiB over the model-parallel group"
        )


def freeze_(chunks: list) -> None:
    for m in chunks:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
            p.grad = None


def build_teacher_replica(builder: QwenVLBuilder, student_chunks: list) -> FrozenTeacher:
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
    return _frozen(teacher)


def load_teacher(hf_dir, weights, *, pipeline_layers: list[int], tensor_model_parallel_size: int,
                 pipeline_model_parallel_size: int, dtype: torch.dtype, transformer_impl: str) -> FrozenTeacher:
    """A teacher of its own: the model described by ``hf_dir`` (its ``config.json``) with ``pipeline_layers``
    language-model layers per stage, loaded from ``weights`` (the HF directory itself, or a Megatron
    checkpoint directory of ``tools/convert_hf_to_megatron.py``) and frozen. Parallel state must be
    initialised with the student's TP and PP."""
    from pathlib import Path

    builder = QwenVLBuilder.from_hf(hf_dir, tensor_model_parallel_size=tensor_model_parallel_size,
                                   pipeline_model_parallel_size=pipeline_model_parallel_size, dtype=dtype,
                                   transformer_impl=transformer_impl, pipeline_layers=pipeline_layers)
    chunks = builder.build(init_weights=False)
    if Path(weights).resolve() == Path(hf_dir).resolve():
        builder.load_hf_weights(chunks, hf_dir)
    else:
        from vigos_megatron.convert.megatron_checkpoint import load_model_checkpoint, resolve_checkpoint

        load_model_checkpoint(chunks, resolve_checkpoint(weights))
    return _frozen(chunks)


def _frozen(chunks: list) -> FrozenTeacher:
    freeze_(chunks)
    return FrozenTeacher(chunks=chunks, local_param_bytes=param_bytes(chunks), local_param_count=param_count(chunks))


def _unwrap(m):
    """Strip DDP / Float16Module wrappers (megatron's ``unwrap_model``)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(m)
