"""Fused Triton implementation of :func:`~vigos_megatron.losses.vocab_parallel_kl.kl_rows`.

Same mathematics, communication and results as the torch (chunked) implementation in
:mod:`vigos_megatron.losses.vocab_parallel_kl` (see its docstring for the formulas), with
the logits read the least number of times:

* forward: ``kl_stats_kernel``, one program per token, ONE pass over each side's rows of
  the local shard ``[V/tp]``, computing online (running-max) per-token statistics
  ``(m_a, m_b, S_a, S_b, C_a, C_b)`` (cross terms of both directions when needed,
  temperature folded into the term coefficients). Across the tensor-parallel group the
  statistics are combined with the torch path's two all-reduces of per-token scalars:
  ``MAX`` of ``[n, 2]`` maxima, then each rank rescales its sums by ``e^{m_local - m}`` and
  ``SUM`` of ``[n, 4]``. The KL, the ``lse`` values and the hard clip follow on ``[n]``
  vectors (the clip after the cross-shard combination). Never an all-gather.
* backward: ``kl_grad_kernel``, one program per row of each logits tensor that needs a
  gradient, ONE pass that reads the selected rows of both sides and writes the gradient
  row in the logits' dtype (rows no token selects are written with zeros; a row selected by
  several tokens gets their contributions summed in order, like ``index_add_``). No
  communication. bf16 gradients are rounded to nearest-even.

Row selection (``LogitRows.index``/``coef``, several terms per side) happens inside the
kernels: rows are read in place from the caller's ``[..., V/tp]`` tensors, never gathered
into a copy. Memory beyond the inputs and the returned gradients is ``O(n)`` per-token
statistics and the ``O(rows)`` CSR of each index.

CPU: with ``TRITON_INTERPRET=1`` in the environment BEFORE this module is first imported
(Triton decides at kernel definition), the kernels run in Triton's interpreter on CPU
tensors; otherwise this implementation needs CUDA tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from vigos_megatron.losses import _triton_kl_kernels as K
from vigos_megatron.losses.kl_common import LogitRows, finish_forward, meta_for, reduce_shard_stats, saved_for_backward

#: True when the kernels were defined under Triton's interpreter (CPU tensors allowed).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Most terms per side the kernels take (VGS uses 3 on the target side).
MAX_TERMS = 4


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters (``block_v`` entries of ``V/tp`` per step, a power of 2; capped at
    ``next_power_of_2(V/tp)``). The GPU defaults are not yet tuned on hardware."""

    fwd_block_v: int = 8192
    fwd_num_warps: int = 16
    bwd_block_v: int = 4096
    bwd_num_warps: int = 8


#: Under the interpreter blocks are small so that tiny test vocabularies take several
#: blocks (the online-max path and the masked tail are what the CPU tests exercise).
DEFAULT_CONFIG = KernelConfig(128, 1, 128, 1) if INTERPRETED else KernelConfig()


def unsupported_reason(n_student_terms: int, n_teacher_terms: int, device: torch.device) -> str | None:
    """Why the Triton kernels cannot take this call (``None`` when they can)."""
    if max(n_student_terms, n_teacher_terms) > MAX_TERMS:
        return f"at most {MAX_TERMS} LogitRows terms per side (got {n_student_terms} student, {n_teacher_terms} teacher)"
    if device.type != "cuda" and not INTERPRETED:
        return (
            f"tensors on {device.type}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
            "before vigos_megatron.losses.triton_kl is imported (CPU interpreter)"
        )
    return None


# --------------------------------------------------------------------------- helpers


def _kernel_rows(x: Tensor) -> Tensor:
    """``[rows, V]`` view of ``[..., V]`` logits with unit last stride (a copy only if needed)."""
    r = x.reshape(-1, x.shape[-1])
    return r if r.stride(-1) == 1 else r.contiguous()


def _side_slots(rows: Sequence[Tensor], indices: Sequence[Tensor], scales: Sequence[float]) -> list:
    """The 16 kernel arguments of one side: 4 x (logits, index, row stride, coef); slot 0 fills the rest."""
    k = len(rows)
    p = [rows[i if i < k else 0] for i in range(MAX_TERMS)]
    ix = [indices[i if i < k else 0] for i in range(MAX_TERMS)]
    st = [r.stride(0) for r in p]
    c = [float(scales[i]) if i < k else 0.0 for i in range(MAX_TERMS)]
    return p + ix + st + c


def _block(requested: int, v: int) -> int:
    import triton

    return max(16, min(requested, triton.next_power_of_2(int(v))))


def _csr(index: Tensor | None, rows: int, n: int, device) -> tuple[Tensor, Tensor]:
    """``(order, rowptr)``: tokens selecting row ``r`` are ``order[rowptr[r]:rowptr[r+1]]`` (no sync)."""
    if index is None:
        ar = torch.arange(n + 1, dtype=torch.int64, device=device)
        return ar[:n], ar
    sorted_rows, order = torch.sort(index, stable=True)
    rowptr = torch.searchsorted(sorted_rows, torch.arange(rows + 1, dtype=torch.int64, device=device))
    return order, rowptr


def _check_indices(indices: Sequence[Tensor | None], rows: Sequence[int], n_a: int) -> None:
    """Raise if an index selects a row outside its tensor (one host sync for all terms)."""
    checks = [(i, idx, r) for i, (idx, r) in enumerate(zip(indices, rows)) if idx is not None and idx.numel()]
    if not checks:
        return
    bad = torch.stack([((idx < 0) | (idx >= r)).any() for _, idx, r in checks]).cpu()
    for (i, idx, r), b in zip(checks, bad.tolist()):
        if b:
            name = "student_logits" if i < n_a else "teacher_logits"
            raise IndexError(f"{name} (term {i}): index selects rows outside [0, {r})")


# --------------------------------------------------------------------------- tiles (the KL from hidden states)


def tile_stats(a: Tensor, b: Tensor, want_a: bool, want_b: bool, config: KernelConfig | None = None) -> Tensor:
    """This tile's online statistics fp32 ``[c, 6]`` ``(m_a, m_b, S_a, S_b, C_a, C_b)`` of two fp32
    ``[c, Vb]`` tiles of the sides (already divided by T), by ``kl_stats_kernel`` (one program per
    token); the torch twin is :func:`~vigos_megatron.losses.torch_kl.tile_stats`."""
    cfg = config or DEFAULT_CONFIG
    c, v = a.shape
    stats = torch.zeros(c, 6, dtype=torch.float32, device=a.device)
    if c:
        ident = torch.arange(c, dtype=torch.int64, device=a.device)
        K.kl_stats_kernel[(c,)](*_side_slots([a], [ident], [1.0]), *_side_slots([b], [ident], [1.0]), stats, v,
                                NA=1, NB=1, WANT_A=bool(want_a), WANT_B=bool(want_b),
                                BLOCK_V=_block(cfg.fwd_block_v, v), num_warps=cfg.fwd_num_warps)
    return stats


_MODES = {"forward": 0, "reverse": 1, "mixed": 2}


def tile_grads(a: Tensor, b: Tensor, lse_a: Tensor, lse_b: Tensor, kl: Tensor, reverse: Tensor, g: Tensor, mode: str,
               need_b: bool, config: KernelConfig | None = None) -> tuple[Tensor, Tensor | None]:
    """fp32 ``(da, db)`` ``[c, Vb]``: ``g_t * dKL_t/d(side)`` on one tile (``g`` ``[c]``, 0 where clipped),
    by ``kl_grad_kernel`` (one program per token row); ``db`` only when ``need_b``. The torch twin is
    :func:`~vigos_megatron.losses.torch_kl.tile_grads`."""
    cfg = config or DEFAULT_CONFIG
    c, v = a.shape
    ident = torch.arange(c + 1, dtype=torch.int64, device=a.device)
    slots = (*_side_slots([a], [ident[:c]], [1.0]), *_side_slots([b], [ident[:c]], [1.0]))
    tok = torch.stack([lse_a, lse_b, kl, g], dim=1).contiguous()
    rev = reverse.to(torch.int8)
    out = []
    for side_a in (True, False):
        if not (side_a or need_b):
            out.append(None)
            continue
        grad = torch.empty_like(a)
        if c:
            K.kl_grad_kernel[(c,)](*slots, tok, rev, ident[:c], ident, grad, grad.stride(0), 1.0, v, NA=1, NB=1,
                                   SIDE_A=side_a, MODE=_MODES[mode], BF16_RTNE=False,
                                   BLOCK_V=_block(cfg.bwd_block_v, v), num_warps=cfg.bwd_num_warps)
        out.append(grad)
    return out[0], out[1]


# --------------------------------------------------------------------------- autograd


class _TritonKL(torch.autograd.Function):
    """Per-token KL on the Triton kernels; interface of ``_VocabParallelKL``.

    ``forward(ctx, meta, *flat)`` with ``flat = (logits_0, index_0, logits_1, index_1, ...)``
    and ``meta`` a :class:`~vigos_megatron.losses.kl_common.KLMeta` (``extra``: the :class:`KernelConfig`).
    Returns fp32 ``[n]``; backward returns a gradient of each logits tensor's dtype and shape.
    """

    @staticmethod
    def forward(ctx, meta, *flat):
        n_a, coefs, reverse, inv_t, clip, group, want_a, want_b, cfg = meta
        logits = flat[0::2]
        indices = flat[1::2]
        n = reverse.numel()
        device = reverse.device
        rows = [_kernel_rows(x) for x in logits]
        _check_indices(indices, [r.shape[0] for r in rows], n_a)
        ident = torch.arange(n, dtype=torch.int64, device=device)
        kidx = [ident if i is None else i for i in indices]
        scales = [c * inv_t for c in coefs]
        stats = torch.zeros(n, 6, dtype=torch.float32, device=device)
        v = rows[0].shape[1]
        if n:
            K.kl_stats_kernel[(n,)](
                *_side_slots(rows[:n_a], kidx[:n_a], scales[:n_a]),
                *_side_slots(rows[n_a:], kidx[n_a:], scales[n_a:]),
                stats,
                v,
                NA=n_a,
                NB=len(rows) - n_a,
                WANT_A=bool(want_a),
                WANT_B=bool(want_b),
                BLOCK_V=_block(cfg.fwd_block_v, v),
                num_warps=cfg.fwd_num_warps,
            )
        m, s = reduce_shard_stats(stats, group)  # MAX of [n, 2], SUM of [n, 4]
        return finish_forward(ctx, meta, m, s, indices, logits)

    @staticmethod
    def backward(ctx, grad_out):
        n_a, coefs, reverse, inv_t, clip, group, want_a, want_b, cfg = ctx.meta
        kl, lse_a, lse_b, clipped, indices, logits, needs = saved_for_backward(ctx)
        k = len(logits)
        n = kl.numel()
        device = kl.device
        rows = [_kernel_rows(x) for x in logits]
        v = rows[0].shape[1]
        ident = torch.arange(n, dtype=torch.int64, device=device)
        kidx = [ident if i is None else i for i in indices]
        scales = [c * inv_t for c in coefs]
        g = torch.where(clipped, torch.zeros_like(grad_out), grad_out.float()) * inv_t
        tok = torch.stack([lse_a, lse_b, kl, g], dim=1).contiguous()
        rev = reverse.to(torch.int8)
        mode = 2 if (want_a and want_b) else (1 if want_a else 0)
        slots = (*_side_slots(rows[:n_a], kidx[:n_a], scales[:n_a]), *_side_slots(rows[n_a:], kidx[n_a:], scales[n_a:]))
        out = [None]
        for i in range(k):
            if not needs[i]:
                out += [None, None]
                continue
            grad = torch.empty(rows[i].shape, dtype=rows[i].dtype, device=device)
            if n == 0:
                grad.zero_()
            elif grad.shape[0]:
                order, rowptr = _csr(indices[i], grad.shape[0], n, device)
                K.kl_grad_kernel[(grad.shape[0],)](
                    *slots,
                    tok,
                    rev,
                    order,
                    rowptr,
                    grad,
                    grad.stride(0),
                    float(coefs[i]),
                    v,
                    NA=n_a,
                    NB=k - n_a,
                    SIDE_A=i < n_a,
                    MODE=mode,
                    BF16_RTNE=grad.dtype == torch.bfloat16,
                    BLOCK_V=_block(cfg.bwd_block_v, v),
                    num_warps=cfg.bwd_num_warps,
                )
            out += [grad.view(ctx.shapes[i]), None]
        return tuple(out)


# --------------------------------------------------------------------------- entry point


def triton_kl_rows(
    student: Sequence[LogitRows],
    teacher: Sequence[LogitRows],
    *,
    reverse: Tensor,
    want_a: bool,
    want_b: bool,
    temperature: float,
    clip: float | None,
    tp_group=None,
    config: KernelConfig | None = None,
) -> Tensor:
    """Per-token KL of ``kl_rows`` on the Triton kernels (inputs already validated by ``kl_rows``).

    Args:
        student, teacher: the sides' terms (1 to :data:`MAX_TERMS` each); ``logits`` ``[..., V/tp]``
            of one dtype and device, ``index`` ``int64 [n]`` or ``None``.
        reverse: bool ``[n]``, per token ``KL(p_a || q_b)`` (True) or ``KL(q_b || p_a)``.
        want_a, want_b: whether any token is reverse / forward (cross terms computed).
        temperature: ``> 0``; clip: ``None`` or ``> 0`` (hard clamp after the TP combination).
        tp_group: group sharding the vocabulary (``None``: not sharded).
        config: launch parameters (default :data:`DEFAULT_CONFIG`).

    Returns:
        fp32 ``[n]``.
    """
    reason = unsupported_reason(len(student), len(teacher), reverse.device)
    if reason is not None:
        raise ValueError(f"impl='triton': {reason}")
    meta, flat = meta_for(student, teacher, reverse=reverse, temperature=temperature, clip=clip, group=tp_group,
                          want_a=want_a, want_b=want_b, extra=config or DEFAULT_CONFIG)
    return _TritonKL.apply(meta, *flat)
