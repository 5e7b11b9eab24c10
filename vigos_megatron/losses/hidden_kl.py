"""The vocabulary-parallel KL straight from final hidden states and output weights (no ``[n, V/tp]`` logits kept).

A term of a side is :class:`HiddenRows` ``(hidden, weight, index, coef)``: its logits are
``coef * hidden[index] @ weight.T`` with ``hidden`` ``[rows, H]`` (replicated over the tensor-parallel
group, the output layer's input) and ``weight`` ``[V/tp, H]`` (this rank's vocabulary shard of the
output layer, tied or not). Each term carries its own weight and hidden size, so a teacher of
another width scores its rows with its own ``[V/tp, H_t]`` weight.

Terms of one side that share a weight are summed BEFORE the output GEMM (logits are linear in the
hidden state): ``sum_k c_k h_k @ W.T = (sum_k c_k h_k) @ W.T``; VGS's ``q_T(.|I,x) - q_T(.|x)`` is
one GEMM on the difference of the teacher's two hidden rows.

Forward, chunk by chunk over tokens (``c`` tokens, one fp32 ``[c, V/tp]`` tensor about
``chunk_bytes``): the chunk's fp32 logits of both sides (fp32 GEMMs on fp32 copies of ``H``-rows and
of weight blocks), the per-token maxima (``MAX`` all-reduce of ``[c, 2]``), the sums
``(S_a, S_b, C_a, C_b)`` of :func:`~vigos_megatron.losses.torch_kl.chunk_sums` (``SUM`` all-reduce of
``[c, 4]``); the logits are then dropped. Two all-reduces of per-token scalars per chunk, never a
gather. The KL, ``lse`` and the clip (after the cross-shard sum) follow as in
:mod:`~vigos_megatron.losses.vocab_parallel_kl`.

Backward recomputes the logits tile by tile (vocabulary blocks of ``Vb`` rows outer, token chunks
inner, tiles ``[c, Vb]`` fp32): ``dz = g * dKL/d(side)`` (:func:`~vigos_megatron.losses.torch_kl.side_grads`),
then per weight group ``dW[block] += dz^T x`` (``x`` the group's combined fp32 hidden rows; an fp32
``[Vb, H]`` accumulator per block, written once into the weight's gradient) and
``dh_k[index] += c_k/T * dz @ W[block]`` (fp32 ``[rows, H]``). The hidden-state gradient is summed
over the tensor-parallel group at the end (one ``SUM`` all-reduce of ``[rows, H]`` per hidden tensor
that needs it: what megatron's output layer does in ``copy_to_tensor_model_parallel_region``); the
weight gradient is local to the shard. Memory beyond inputs and returned gradients: the ``[n]``
statistics, the fp32 hidden gradient and a few ``chunk_bytes`` tiles, whatever ``n`` is.

Recompute-in-backward rather than gradients formed in the forward and scaled in backward: the
latter cannot tile the vocabulary (each token chunk's gradient touches the whole ``dW``, so an fp32
``[V/tp, H]`` accumulator per call lives from forward to backward) and costs one output GEMM per
term less (``benchmarks/bench_kl.py --from-hidden`` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from vigos_megatron.collectives import all_reduce
from vigos_megatron.losses.kl_common import kl_from_stats
from vigos_megatron.losses.torch_kl import chunk_sums, side_grads


@dataclass(frozen=True)
class HiddenRows:
    """One additive term of a side of the KL: ``coef * hidden[index] @ weight.T``.

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm); leading dimensions are
            flattened to rows.
        weight: ``[V/tp, H]`` this rank's vocabulary shard of the output layer for these rows.
        index: optional ``int64 [n]`` row indices selecting the ``n`` tokens scored (``None``: all rows).
        coef: scalar multiplier of this term.
    """

    hidden: Tensor
    weight: Tensor
    index: Tensor | None = None
    coef: float = 1.0


class Group(NamedTuple):
    """Terms of one side sharing one output weight: ``weight`` and each term's ``(hidden, index, coef)``
    as slots into the Function's tensors (hiddens first, then weights)."""

    weight: int
    terms: tuple


class HiddenMeta(NamedTuple):
    """The non-tensor arguments of :class:`_HiddenKL` (``forward(ctx, meta, *hiddens, *weights)``)."""

    sides: tuple  # (groups of side a, groups of side b)
    n_hidden: int
    #: bool ``[n]``: reverse KL for this token
    reverse: Tensor
    inv_t: float
    clip: float | None
    group: object
    want_a: bool
    want_b: bool
    chunk_bytes: int


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _combined(grp: Group, hs: Sequence[Tensor], lo: int, hi: int, inv_t: float) -> Tensor:
    """fp32 ``[hi-lo, H]``: ``sum_k c_k/T * h_k[index_k[lo:hi]]`` over the group's terms."""
    out = None
    for slot, idx, coef in grp.terms:
        h = hs[slot]
        x = (h[lo:hi] if idx is None else h.index_select(0, idx[lo:hi])).to(torch.float32)
        if out is None:
            out = x * (coef * inv_t)  # a fresh tensor: never the caller's
        else:
            out.add_(x, alpha=coef * inv_t)
    return out


def _logits(x: Tensor, w: Tensor, v0: int, v1: int, block: int) -> Tensor:
    """fp32 ``[c, v1-v0]`` ``x @ w[v0:v1].T``; a non-fp32 weight is converted ``block`` rows at a time."""
    if w.dtype == torch.float32:
        return x @ w[v0:v1].t()
    out = torch.empty(x.shape[0], v1 - v0, dtype=torch.float32, device=x.device)
    for b0 in range(v0, v1, block):
        b1 = min(v1, b0 + block)
        out[:, b0 - v0:b1 - v0] = x @ w[b0:b1].to(torch.float32).t()
    return out


def _side(groups, xs, ws, v0: int, v1: int, block: int) -> Tensor:
    """A side's fp32 logits ``[c, v1-v0]`` (already divided by T) from its groups' combined rows ``xs``."""
    out = None
    for grp, x in zip(groups, xs):
        z = _logits(x, ws[grp.weight], v0, v1, block)
        out = z if out is None else out.add_(z)
    return out


def _weight_block(ws: Sequence[Tensor], chunk_bytes: int) -> int:
    """Vocabulary rows per fp32 weight block (``[block, H] * 4`` bytes about ``chunk_bytes / 4``)."""
    h = max(w.shape[1] for w in ws)
    return max(1, chunk_bytes // (16 * h))


def _stats(meta: HiddenMeta, hs, ws) -> tuple[Tensor, Tensor]:
    """``m`` ``[n, 2]`` and ``s`` ``[n, 4]``: the global statistics, chunk by chunk (two all-reduces per chunk)."""
    n, v = meta.reverse.numel(), ws[0].shape[0]
    device = meta.reverse.device
    m = torch.empty(n, 2, dtype=torch.float32, device=device)
    s = torch.empty(n, 4, dtype=torch.float32, device=device)
    chunk = max(1, min(n, meta.chunk_bytes // (4 * v)))
    block = _weight_block(ws, meta.chunk_bytes)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        a, b = (_side(groups, [_combined(g, hs, lo, hi, meta.inv_t) for g in groups], ws, 0, v, block)
                for groups in meta.sides)
        mc = all_reduce(torch.stack([a.amax(-1), b.amax(-1)], dim=1), meta.group, dist.ReduceOp.MAX)
        s[lo:hi] = all_reduce(chunk_sums(a, b, mc, meta.want_a, meta.want_b), meta.group, dist.ReduceOp.SUM)
        m[lo:hi] = mc
        del a, b
    return m, s


def _scatter_hidden_grad(dh: Tensor, idx: Tensor | None, lo: int, hi: int, u: Tensor, scale: float) -> None:
    if idx is None:
        dh[lo:hi].add_(u, alpha=scale)
    else:
        dh.index_add_(0, idx[lo:hi], u, alpha=scale)


def _grads(meta: HiddenMeta, hs, ws, need_h, need_w, lse_a, lse_b, kl, g) -> tuple[list, list]:
    """fp32 hidden gradients (this shard's part) and the weight gradients, tile by tile (module doc)."""
    n, v = kl.numel(), ws[0].shape[0]
    device = kl.device
    mode = "mixed" if (meta.want_a and meta.want_b) else ("reverse" if meta.want_a else "forward")
    groups_b = meta.sides[1]
    need_b = any(need_w[grp.weight] or any(need_h[t[0]] for t in grp.terms) for grp in groups_b)
    dh = [torch.zeros(h.shape, dtype=torch.float32, device=device) if need_h[i] else None for i, h in enumerate(hs)]
    dw = [torch.empty_like(w) if need_w[j] else None for j, w in enumerate(ws)]
    vb = min(v, _weight_block(ws, meta.chunk_bytes) * 4)
    cb = max(1, min(n, meta.chunk_bytes // (4 * vb)))
    for v0 in range(0, v, vb):
        v1 = min(v, v0 + vb)
        wblk = [w[v0:v1].to(torch.float32) for w in ws]
        acc = [torch.zeros(v1 - v0, w.shape[1], dtype=torch.float32, device=device) if need_w[j] else None
               for j, w in enumerate(ws)]
        for lo in range(0, n, cb):
            hi = min(n, lo + cb)
            xs = [[_combined(grp, hs, lo, hi, meta.inv_t) for grp in groups] for groups in meta.sides]
            a, b = (_side(groups, x, wblk, 0, v1 - v0, v1 - v0) for groups, x in zip(meta.sides, xs))
            dz = side_grads(a, b, lse_a[lo:hi], lse_b[lo:hi], kl[lo:hi], meta.reverse[lo:hi], g[lo:hi, None], mode,
                            need_b)
            for groups, x, d in zip(meta.sides, xs, dz):
                if d is None:
                    continue
                for grp, xg in zip(groups, x):
                    if acc[grp.weight] is not None:
                        acc[grp.weight].addmm_(d.t(), xg)
                    terms = [t for t in grp.terms if dh[t[0]] is not None]
                    if terms:
                        u = d @ wblk[grp.weight]
                        for slot, idx, coef in terms:
                            _scatter_hidden_grad(dh[slot], idx, lo, hi, u, coef * meta.inv_t)
            del a, b, dz
        for j, a_j in enumerate(acc):
            if a_j is not None:
                dw[j][v0:v1] = a_j
    return dh, dw


class _HiddenKL(torch.autograd.Function):
    """Per-token KL from hidden states and output weights (module doc).

    ``forward(ctx, meta, *tensors)``: :class:`HiddenMeta`, ``tensors`` = the distinct hidden tensors
    ``[rows, H_i]`` then the distinct weights ``[V/tp, H_j]``. Returns fp32 ``[n]`` (``clip`` where
    clipped). Backward returns, for each tensor that needs it, a gradient of its own dtype and shape
    (hidden: summed over the tensor-parallel group; weight: this shard's).
    """

    @staticmethod
    def forward(ctx, meta: HiddenMeta, *tensors):
        hs = [_rows(h) for h in tensors[:meta.n_hidden]]
        ws = tensors[meta.n_hidden:]
        m, s = _stats(meta, hs, ws)
        kl, lse_a, lse_b = kl_from_stats(m, s, meta.reverse)
        if not bool(torch.isfinite(kl).all()):
            raise ValueError("non-finite KL: the hidden states or output weights contain inf/nan (on this or another "
                             "tensor-parallel rank), or the temperature is too small for fp32")
        clipped = kl > meta.clip if meta.clip is not None else torch.zeros_like(meta.reverse)
        ctx.meta = meta
        ctx.save_for_backward(kl, lse_a, lse_b, clipped, *tensors)
        return torch.where(clipped, torch.full_like(kl, meta.clip if meta.clip is not None else 0.0), kl)

    @staticmethod
    def backward(ctx, grad_out):
        meta = ctx.meta
        kl, lse_a, lse_b, clipped, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        hs = [_rows(h) for h in tensors[:meta.n_hidden]]
        ws = tensors[meta.n_hidden:]
        g = torch.where(clipped, torch.zeros_like(grad_out), grad_out.float())
        dh, dw = _grads(meta, hs, ws, needs[:meta.n_hidden], needs[meta.n_hidden:], lse_a, lse_b, kl, g)
        out = [None]
        for h, d in zip(tensors[:meta.n_hidden], dh):
            out.append(None if d is None else all_reduce(d, meta.group).to(h.dtype).view(h.shape))
        return tuple(out + dw)


def _slots(sides: Sequence[Sequence[HiddenRows]]) -> tuple[tuple, list, list]:
    """``(groups per side, distinct hiddens, distinct weights)``; tensors are matched by identity."""
    hiddens, weights = [], []

    def slot(pool, t):
        for i, x in enumerate(pool):
            if x is t:
                return i
        pool.append(t)
        return len(pool) - 1

    out = []
    for terms in sides:
        groups: dict[int, list] = {}
        for t in terms:
            groups.setdefault(slot(weights, t.weight), []).append((slot(hiddens, t.hidden), t.index, float(t.coef)))
        out.append(tuple(Group(w, tuple(ts)) for w, ts in groups.items()))
    return tuple(out), hiddens, weights


def hidden_kl_rows(s_terms: Sequence[HiddenRows], t_terms: Sequence[HiddenRows], *, reverse: Tensor, want_a: bool,
                   want_b: bool, temperature: float, clip: float | None, tp_group, chunk_bytes: int) -> Tensor:
    """fp32 ``[n]`` per-token KL of validated :class:`HiddenRows` terms (``reverse``: bool ``[n]``)."""
    sides, hiddens, weights = _slots((s_terms, t_terms))
    meta = HiddenMeta(sides, len(hiddens), reverse, 1.0 / float(temperature), clip, tp_group, bool(want_a),
                      bool(want_b), int(chunk_bytes))
    return _HiddenKL.apply(meta, *hiddens, *weights)
