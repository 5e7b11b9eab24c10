"""What both KL implementations share: the row-selected side terms, the tensor-parallel reductions,
and the per-token KL from the reduced statistics (see :mod:`vigos_megatron.losses.vocab_parallel_kl`
for the math). The torch implementation (:mod:`.torch_kl`) and the Triton one (:mod:`.triton_kl`)
sit on this module; :mod:`.vocab_parallel_kl` dispatches between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from vigos_megatron.collectives import all_reduce, group_size



@dataclass(frozen=True)
class LogitRows:
    """One additive term of a side of the KL: ``coef * logits[index]``.

    Args:
        logits: ``[..., V/tp]`` vocabulary-sharded logits; leading dimensions are
            flattened to rows (a copy only if the tensor is not contiguous).
        index: optional ``int64 [n]`` row indices into the flattened leading
            dimensions, selecting the ``n`` tokens scored; ``None`` takes all rows.
        coef: scalar multiplier of this term.

    A side is a sequence of terms whose (selected) rows are summed, e.g. the VGS
    visual target ``log p_S(.|x) + log q_T(.|I,x) - log q_T(.|x)``; softmax is
    invariant to per-token constants, so summing logits equals summing log-probs.
    """

    logits: Tensor
    index: Tensor | None = None
    coef: float = 1.0


def matmul_fp32_out(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as fp32 for low-precision ``a`` ``[N, K]`` and ``b`` ``[K, M]`` (fp32 accumulation, no rounding):
    ``torch.mm(..., out_dtype=float32)`` on CUDA; on the CPU (no such kernel) the operands are widened, exact."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def matmul_model_dtype(a: Tensor, b: Tensor) -> Tensor:
    """fp32 ``a @ b`` of operands in one low-precision dtype, at that dtype's GEMM speed: the fp32
    accumulator on CUDA (:func:`matmul_fp32_out`); on the CPU, which has no such kernel, the result
    rounded to the operands' dtype, then widened (a relative error of 2^-9 per entry in bf16)."""
    if a.is_cuda:
        return matmul_fp32_out(a, b)
    return torch.mm(a, b).float()


def reduce_shard_stats(stats: Tensor, group) -> tuple[Tensor, Tensor]:
    """The global ``m`` ``[n, 2]`` and ``s`` ``[n, 4]`` from this shard's online statistics ``stats``
    fp32 ``[n, 6]`` ``(m_a, m_b, S_a, S_b, C_a, C_b)`` (``S = sum_v e^{z_v - m}``, ``C_a = sum_v
    e^{a_v - m_a} (a_v - b_v)``, ``C_b = sum_v e^{b_v - m_b} (b_v - a_v)`` over the local ``V/tp``).

    Two all-reduces of per-token scalars over ``group``: ``MAX`` of the maxima, then, each rank's sums
    rescaled by ``e^{m_local - m}`` onto the global maxima, ``SUM`` of ``[n, 4]``. Never a gather.
    """
    m_local = stats[:, 0:2]
    m = all_reduce(m_local.clone(), group, dist.ReduceOp.MAX)
    s = stats[:, 2:6]
    if group_size(group) > 1:
        s = s * torch.exp(m_local - m).repeat(1, 2)
    return m, all_reduce(s.contiguous(), group, dist.ReduceOp.SUM)


def kl_from_stats(m: Tensor, s: Tensor, reverse: Tensor):
    """Per-token ``(kl, lse_a, lse_b)`` from the reduced statistics."""
    lse_a = m[:, 0] + torch.log(s[:, 0])
    lse_b = m[:, 1] + torch.log(s[:, 1])
    kl_rev = s[:, 2] / s[:, 0] - lse_a + lse_b
    kl_fwd = s[:, 3] / s[:, 1] - lse_b + lse_a
    return torch.where(reverse, kl_rev, kl_fwd), lse_a, lse_b


def raise_non_finite(logits, n_a):
    for i, x in enumerate(logits):
        if not bool(torch.isfinite(x).all()):
            name = "student_logits" if i < n_a else "teacher_logits"
            raise ValueError(f"{name} (term {i}) contains non-finite values (inf or nan)")
    raise ValueError(
        "non-finite KL: student_logits or teacher_logits contain inf/nan on another "
        "tensor-parallel rank (or the temperature is too small for fp32)"
    )


class KLMeta(NamedTuple):
    """The non-tensor arguments of both KL autograd Functions (``forward(ctx, meta, *flat)`` with
    ``flat = (logits_0, index_0, logits_1, index_1, ...)``, the student's ``n_a`` terms first)."""

    n_a: int
    coefs: tuple[float, ...]
    #: bool ``[n]``: reverse KL for this token
    reverse: Tensor
    inv_t: float
    clip: float | None
    group: object
    want_a: bool
    want_b: bool
    #: the implementation's own setting (torch: the chunk length; Triton: its KernelConfig)
    extra: object


def meta_for(s_terms: Sequence[LogitRows], t_terms: Sequence[LogitRows], *, reverse: Tensor, temperature: float,
             clip: float | None, group, want_a: bool, want_b: bool, extra) -> tuple[KLMeta, list]:
    """``(meta, flat)`` for ``Function.apply(meta, *flat)``."""
    terms = list(s_terms) + list(t_terms)
    meta = KLMeta(len(s_terms), tuple(float(t.coef) for t in terms), reverse, 1.0 / float(temperature), clip, group,
                  bool(want_a), bool(want_b), extra)
    flat = []
    for t in terms:
        flat += [t.logits, t.index]
    return meta, flat


def save_for_backward(ctx, meta: KLMeta, kl: Tensor, lse_a: Tensor, lse_b: Tensor, clipped: Tensor, indices, logits) -> Tensor:
    """Keep what backward needs; returns the forward's output (``clip`` where clipped, else ``kl``)."""
    ctx.meta = meta
    ctx.shapes = [x.shape for x in logits]
    ctx.has_index = [i is not None for i in indices]
    ctx.save_for_backward(kl, lse_a, lse_b, clipped, *[i if i is not None else torch.empty(0) for i in indices], *logits)
    return torch.where(clipped, torch.full_like(kl, meta.clip if meta.clip is not None else 0.0), kl)


def saved_for_backward(ctx):
    """``(kl, lse_a, lse_b, clipped, indices, logits, needs)``; ``needs[i]``: logits ``i`` wants a gradient."""
    saved = ctx.saved_tensors
    kl, lse_a, lse_b, clipped = saved[:4]
    k = len(ctx.shapes)
    indices = [t if has else None for t, has in zip(saved[4: 4 + k], ctx.has_index)]
    logits = saved[4 + k:]
    needs = [ctx.needs_input_grad[1 + 2 * i] for i in range(k)]
    return kl, lse_a, lse_b, clipped, indices, logits, needs


def finish_forward(ctx, meta: KLMeta, m: Tensor, s: Tensor, indices, logits) -> Tensor:
    """The end of both forwards: the per-token KL from the reduced statistics (``m`` ``[n, 2]``,
    ``s`` ``[n, 4]``), a clear error on non-finite values, the clip, and the state backward needs."""
    kl, lse_a, lse_b = kl_from_stats(m, s, meta.reverse)
    if not bool(torch.isfinite(kl).all()):
        raise_non_finite(logits, meta.n_a)
    clipped = kl > meta.clip if meta.clip is not None else torch.zeros_like(meta.reverse)
    return save_for_backward(ctx, meta, kl, lse_a, lse_b, clipped, indices, logits)
