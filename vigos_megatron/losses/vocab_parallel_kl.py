"""KL divergence over a tensor-parallel (vocabulary-sharded) vocabulary.

Every rank of the tensor-parallel group holds a ``[..., V/tp]`` slice of the
logits. The per-token KL is summed over the FULL vocabulary with two
all-reduces of per-token scalars (never an all-gather of logits):

1. ``MAX`` of the per-token maxima of both distributions   (``[n, 2]``),
2. ``SUM`` of the per-token partial sums                     (``[n, 3]`` or ``[n, 4]``):
   ``S_a = sum_v exp(a_v - m_a)``, ``S_b = sum_v exp(b_v - m_b)`` and the
   cross terms ``C_b = sum_v exp(b_v - m_b) (b_v - a_v)`` and/or
   ``C_a = sum_v exp(a_v - m_a) (a_v - b_v)``.

Here ``a`` is the student side and ``b`` the teacher side, both already divided
by the temperature ``T``. With ``lse_x = m_x + log S_x``::

    forward  KL(q_b || p_a) = C_b / S_b - lse_b + lse_a
    reverse  KL(p_a || q_b) = C_a / S_a - lse_a + lse_b

which only uses ``sum_v q_v = 1`` (the structure of megatron's
``vocab_parallel_cross_entropy``), so the value is exact across shards.

Gradients (closed form, no communication in backward; ``g_t`` is the incoming
gradient of token ``t``, zero where the hard clip is active)::

    forward:  dKL/da = p_a - q_b                     dKL/db = q_b * (log q_b - log p_a - KL)
    reverse:  dKL/da = p_a * (log p_a - log q_b - KL)  dKL/db = q_b - p_a

and ``dL/dlogits = g_t / T * dKL/d(side)`` for every raw logits tensor of that
side, times the term's coefficient (sides may be sums of several logits
tensors, see :class:`LogitRows`). The probabilities are recomputed chunk by
chunk in backward from the saved per-token ``lse`` values, so the only
memory this module keeps beyond its inputs and the gradient it returns is
``O(n)`` per-token statistics plus a few fp32 ``[chunk, V/tp]`` work tensors.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from vigos_megatron.losses.impls import KL_IMPLS
from vigos_megatron.collectives import all_reduce, group_size
from vigos_megatron.losses.hidden_kl import HiddenRows, hidden_kl_rows
from vigos_megatron.losses.impls import DEFAULT_CHUNK_BYTES
from vigos_megatron.losses.kl_common import LogitRows
from vigos_megatron.losses.torch_kl import torch_kl_rows

Direction = Literal["forward", "reverse"]
Impl = Literal["auto", "torch", "triton"]

__all__ = ["DEFAULT_CHUNK_BYTES", "HiddenRows", "LogitRows", "kl_rows", "vocab_parallel_kl"]


# --------------------------------------------------------------------------- validation


def _count(name: str, t, rows: int, device) -> int:
    """Tokens a term selects (its ``index`` checked)."""
    if t.index is None:
        return rows
    if t.index.dtype != torch.int64 or t.index.dim() != 1:
        raise TypeError(f"{name}: index must be a 1-D int64 tensor")
    if t.index.device != device:
        raise ValueError(f"{name}: index device {t.index.device} != {device}")
    return t.index.numel()


def _same_count(name: str, count: int, n: int | None) -> int:
    if n is not None and count != n:
        raise ValueError(f"{name}: selects {count} tokens, expected {n} (token counts of all terms must match)")
    return count


def _check_hidden_terms(name: str, terms: Sequence[HiddenRows], ref: Tensor, n: int | None) -> int:
    """``ref``: the first student term's weight ``[V/tp, H]``."""
    for t in terms:
        if not isinstance(t, HiddenRows):
            raise TypeError(f"{name}: mixes HiddenRows and LogitRows terms")
        for what, x in (("hidden", t.hidden), ("weight", t.weight)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"{name}: {what} must be a floating-point tensor")
            if x.device != ref.device:
                raise ValueError(f"{name}: {what} device {x.device} != {ref.device} of the student weight")
        if t.weight.dim() != 2 or t.weight.shape[0] != ref.shape[0]:
            raise ValueError(f"{name}: weight {tuple(t.weight.shape)} is not [V/tp={ref.shape[0]}, H]")
        if t.hidden.dim() < 1 or t.hidden.shape[-1] != t.weight.shape[1]:
            raise ValueError(f"{name}: hidden size {tuple(t.hidden.shape)[-1:]} != {t.weight.shape[1]} of its weight")
        n = _same_count(name, _count(name, t, t.hidden.numel() // t.hidden.shape[-1], ref.device), n)
    return n


def _check_terms(name: str, terms: Sequence[LogitRows], ref: Tensor, n: int | None) -> int:
    for t in terms:
        if not isinstance(t, LogitRows):
            raise TypeError(f"{name}: mixes LogitRows and HiddenRows terms")
        if not isinstance(t.logits, Tensor) or not t.logits.is_floating_point():
            raise TypeError(f"{name}: logits must be a floating-point tensor")
        if t.logits.dim() < 1 or t.logits.shape[-1] != ref.shape[-1]:
            raise ValueError(
                f"{name}: vocabulary shard size {tuple(t.logits.shape)[-1:]} != {ref.shape[-1]} of the first student term"
            )
        if t.logits.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {t.logits.dtype} != {ref.dtype} of the student logits")
        if t.logits.device != ref.device:
            raise ValueError(f"{name}: device {t.logits.device} != {ref.device} of the student logits")
        n = _same_count(name, _count(name, t, t.logits.numel() // t.logits.shape[-1], ref.device), n)
    return n


def _check_vocab(v_local: int, vocab_size: int | None, group, device) -> None:
    tp = group_size(group)
    if vocab_size is not None:
        if vocab_size % tp != 0:
            raise ValueError(f"vocab_size={vocab_size} is not divisible by the tensor-parallel size {tp}")
        if v_local * tp != vocab_size:
            raise ValueError(
                f"logits hold {v_local} vocabulary entries per rank; vocab_size={vocab_size} over tp={tp} implies {vocab_size // tp}"
            )
    if tp > 1:
        # one 2-element all-reduce: every rank must hold the same shard width
        w = torch.tensor([v_local, -v_local], dtype=torch.float64, device=device)
        all_reduce(w, group, dist.ReduceOp.MAX)
        if int(w[0]) != v_local or int(-w[1]) != v_local:
            raise ValueError(
                f"vocabulary shards differ across the tensor-parallel group (this rank {v_local}, "
                f"max {int(w[0])}, min {int(-w[1])}): the vocabulary is not divisible by tp={tp}"
            )


def _use_triton(impl: str, device: torch.device, n_student: int, n_teacher: int) -> bool:
    """``"auto"``: Triton for CUDA tensors when importable and the call fits its kernels, else torch."""
    if impl not in KL_IMPLS:
        raise ValueError(f"impl must be one of {KL_IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    if device.type != "cuda":
        return False
    try:
        from vigos_megatron.losses.triton_kl import unsupported_reason
    except ImportError:  # no triton on this CUDA machine: the torch implementation
        return False
    return unsupported_reason(n_student, n_teacher, device) is None


# --------------------------------------------------------------------------- public API


def kl_rows(
    student: Sequence[LogitRows] | LogitRows,
    teacher: Sequence[LogitRows] | LogitRows,
    *,
    reverse: bool | Tensor,
    temperature: float = 1.0,
    clip: float | None = None,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    impl: Impl = "auto",
) -> Tensor:
    """Per-token KL between two (possibly composite, row-selected) vocab-sharded sides.

    A side is a list of :class:`LogitRows` (vocabulary-sharded logits) or of
    :class:`~vigos_megatron.losses.hidden_kl.HiddenRows` (final hidden states and the output weight
    shard scoring them, :mod:`~vigos_megatron.losses.hidden_kl`: no ``[n, V/tp]`` logits kept; ``impl``
    picks who reduces each tile); both sides of one call use the same kind.

    Args:
        student: side ``a`` (terms summed); receives gradients where its tensors require them.
        teacher: side ``b``; gradients flow only where its tensors require grad (pass
            detached teacher logits for a frozen teacher).
        reverse: ``True`` -> ``KL(p_a || q_b)``; ``False`` -> ``KL(q_b || p_a)``; or a bool
            tensor ``[n]`` choosing per token.
        temperature: both sides are divided by it (no ``T^2`` factor).
        clip: hard clamp of the cross-shard per-token sum: ``kl > clip`` gives ``clip`` and zero
            gradient. ``None`` or ``<= 0`` disables it.
        tp_group: tensor-parallel group over which the vocabulary is sharded (``None``: not sharded).
        vocab_size: optional full vocabulary size, checked against ``V/tp * tp``.
        chunk_bytes: size of one fp32 ``[chunk, V/tp]`` work tensor (from hidden states: of one fp32
            tile and one fp32 weight block); bounds the temporaries (torch implementation and hidden
            states only).
        impl: ``"torch"`` (this module, chunked), ``"triton"`` (fused kernels of
            :mod:`vigos_megatron.losses.triton_kl`: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton for CUDA tensors, torch otherwise).

    Returns:
        fp32 ``[n]`` per-token KL.
    """
    s_terms = [student] if isinstance(student, (LogitRows, HiddenRows)) else list(student)
    t_terms = [teacher] if isinstance(teacher, (LogitRows, HiddenRows)) else list(teacher)
    if not s_terms or not t_terms:
        raise ValueError("kl_rows: both sides need at least one LogitRows term")
    from_hidden = isinstance(s_terms[0], HiddenRows)
    if from_hidden:
        ref = s_terms[0].weight
        n = _check_hidden_terms("student_hidden", s_terms, ref, None)
        _check_hidden_terms("teacher_hidden", t_terms, ref, n)
    else:
        ref = s_terms[0].logits
        n = _check_terms("student_logits", s_terms, ref, None)
        _check_terms("teacher_logits", t_terms, ref, n)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_vocab(ref.shape[0] if from_hidden else ref.shape[-1], vocab_size, tp_group, ref.device)
    clip = float(clip) if clip is not None and clip > 0 else None
    if isinstance(reverse, Tensor):
        if reverse.dtype != torch.bool or reverse.shape != (n,):
            raise ValueError(f"reverse: expected a bool tensor of shape ({n},), got {reverse.dtype} {tuple(reverse.shape)}")
        rev = reverse.to(ref.device)
        # decided on the host from metadata would avoid this sync; it is one scalar per call
        want_a, want_b = bool(rev.any()), not bool(rev.all())
    else:
        rev = torch.full((n,), bool(reverse), dtype=torch.bool, device=ref.device)
        want_a, want_b = bool(reverse), not bool(reverse)
    if from_hidden:
        return hidden_kl_rows(s_terms, t_terms, reverse=rev, want_a=want_a, want_b=want_b, temperature=temperature,
                              clip=clip, tp_group=tp_group, chunk_bytes=chunk_bytes,
                              triton=_use_triton(impl, ref.device, 1, 1))
    if _use_triton(impl, ref.device, len(s_terms), len(t_terms)):
        from vigos_megatron.losses.triton_kl import triton_kl_rows

        return triton_kl_rows(
            s_terms, t_terms, reverse=rev, want_a=want_a, want_b=want_b,
            temperature=temperature, clip=clip, tp_group=tp_group,
        )
    return torch_kl_rows(s_terms, t_terms, reverse=rev, want_a=want_a, want_b=want_b, temperature=temperature,
                         clip=clip, tp_group=tp_group, chunk_bytes=chunk_bytes)


def vocab_parallel_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    direction: Direction,
    temperature: float = 1.0,
    clip: float | None = None,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    impl: Impl = "auto",
) -> Tensor:
    """Per-token KL between student and teacher, summed over the full sharded vocabulary.

    Args:
        student_logits: ``[..., V/tp]``, this rank's vocabulary shard; fp32 or bf16/fp16.
        teacher_logits: ``[..., V/tp]``, same shape, dtype and device; treated as constant.
        direction: ``"forward"`` = ``KL(q_T || p_S)``; ``"reverse"`` = ``KL(p_S || q_T)``.
        temperature: both logits are divided by it first.
        clip: hard per-token clamp on the global sum (value ``clip``, gradient 0 above it);
            ``None`` or ``<= 0`` disables it.
        tp_group: the tensor-parallel group sharding the vocabulary, or ``None``.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``, as in :func:`kl_rows`.

    Returns:
        fp32 tensor of shape ``student_logits.shape[:-1]``. Its gradient w.r.t.
        ``student_logits`` (dtype of ``student_logits``) is ``g/T * (p_S - q_T)`` (forward)
        or ``g/T * p_S * (log p_S - log q_T - KL)`` (reverse), zero on clipped tokens.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise TypeError("student_logits and teacher_logits must be tensors")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}"
        )
    out = kl_rows(
        LogitRows(student_logits),
        LogitRows(teacher_logits.detach()),
        reverse=direction == "reverse",
        temperature=temperature,
        clip=clip,
        tp_group=tp_group,
        vocab_size=vocab_size,
        chunk_bytes=chunk_bytes,
        impl=impl,
    )
    return out.view(student_logits.shape[:-1])
