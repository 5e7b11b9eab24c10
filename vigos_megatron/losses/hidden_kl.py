"""The vocabulary-parallel KL straight from final hidden states and output weights (no ``[n, V/tp]`` logits kept).

A term of a side is :class:`HiddenRows` ``(hidden, weight, index, coef)``: its logits are
``coef * hidden[index] @ weight.T`` with ``hidden`` ``[rows, H]`` (replicated over the tensor-parallel
group, the output layer's input) and ``weight`` ``[V/tp, H]`` (this rank's vocabulary shard of the
output layer, tied or not). Each term carries its own weight and hidden size, so a teacher of
another width scores its rows with its own ``[V/tp, H_t]`` weight.

Both passes walk the same tiles: vocabulary blocks of ``Vb`` rows outer (``[Vb, H]`` about
``chunk_bytes`` in fp32), token chunks of ``c`` tokens inner (fp32
tiles ``[c, Vb]`` about ``chunk_bytes``). A tile's logits are fp32 either way (the products of the
model's values accumulated in fp32, never rounded to the model's dtype), formed by one of two GEMM
kinds, per weight:

* fp32 operands (an fp32 weight; a bf16 weight on the CPU, which has no bf16 GEMM with an fp32
  result): the weight block is widened once per pass and the terms sharing it are summed before the
  GEMM (logits are linear in the hidden state), ``x = sum_k c_k/T h_k``: one GEMM per group, VGS's
  ``q_T(.|I,x) - q_T(.|x)`` one GEMM on the difference of the teacher's two hidden rows;
* low-precision operands (a bf16/fp16 weight on CUDA): one GEMM per term in the model's dtype with
  an fp32 result (``torch.mm(..., out_dtype=float32)``), scaled by ``c_k/T`` and summed in fp32;
* rounded (``HiddenRows.rounded``, ``loss.logits_dtype: model``, any device): one GEMM per group in
  the model's dtype with its result rounded to that dtype, as megatron's bf16 output layer rounds its
  logits, then widened and scaled by ``1/T`` in fp32. A group of one term multiplies the model's own
  rows (with ``c/T`` after the GEMM: the logits path's ``model`` logits, the same numbers); a group of
  several sums its rows in fp32 and rounds the sum once, ``x = bf16(sum_k c_k h_k)`` (VGS's teacher
  pair: the difference of the two hidden rows, rounded at its own scale, where the logits path rounds
  each row's logits before they are subtracted).

Backward, a low-precision weight on any device: ``dz`` is rounded once to the model's dtype and its
``dW``/``dh`` GEMMs run on the model's operands, one per term
(:func:`~vigos_megatron.losses.kl_common.matmul_model_dtype`: fp32 results on CUDA, results rounded
to bf16 on the CPU), as megatron's bf16 output layer runs its backward on its rounded logits'
gradient (the logits path, ``models.output_logits``); accumulation across tiles is fp32.

Forward: each tile is reduced to online statistics per token ``(m_a, m_b, S_a, S_b, C_a, C_b)``
(running maxima; ``S = sum e^{z - m}``, ``C_a = sum e^{a - m_a} (a - b)``, ``C_b = sum e^{b - m_b} (b - a)``,
rescaled by ``e^{m - m'}`` when a maximum moves) and dropped; after the last tile the shard's ``[n, 6]``
statistics meet the other shards in two all-reduces of per-token scalars (``MAX`` of ``[n, 2]``, ``SUM``
of ``[n, 4]``: :func:`~vigos_megatron.losses.kl_common.reduce_shard_stats`), per call, never a gather.
The KL, ``lse`` and the clip (after the cross-shard sum) follow as in
:mod:`~vigos_megatron.losses.vocab_parallel_kl`.

Backward recomputes each tile's logits: ``dz = g * dKL/d(side)`` (fp32 ``[c, Vb]``), then per weight
group ``dW[block] += dz^T x`` (``x`` the group's combined fp32 rows; an fp32 ``[Vb, H]`` accumulator
per block, written once into the weight's gradient) and ``dh_k[index] += c_k/T * dz @ W[block]``
(fp32 ``[rows, H]``). The hidden-state gradient is summed over the tensor-parallel group at the end
(one ``SUM`` all-reduce of ``[rows, H]`` per hidden tensor that needs it: what megatron's output layer
does in ``copy_to_tensor_model_parallel_region``); the weight gradient is local to the shard. Memory
beyond inputs and returned gradients: the ``[n]`` statistics, the fp32 hidden gradient and a few
``chunk_bytes`` tiles, whatever ``n`` is.

A tile's reduction (its statistics; its ``dz``) runs on the Triton kernels of
:mod:`~vigos_megatron.losses.triton_kl` (``tile_stats``/``tile_grads``: one program per token row) or
on torch (:mod:`~vigos_megatron.losses.torch_kl`, the same names); the GEMMs are torch's either way.

Recompute-in-backward rather than gradients formed in the forward and scaled in backward: the
latter cannot tile the vocabulary (each token chunk's gradient touches the whole ``dW``, so an fp32
``[V/tp, H]`` accumulator per call lives from forward to backward) and costs one output GEMM per
term less (``benchmarks/bench_kl.py --from-hidden`` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from vigos_megatron.collectives import all_reduce
from vigos_megatron.losses import torch_kl
from vigos_megatron.losses.kl_common import kl_from_stats, matmul_fp32_out, matmul_model_dtype, reduce_shard_stats


@dataclass(frozen=True)
class HiddenRows:
    """One additive term of a side of the KL: ``coef * hidden[index] @ weight.T``.

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm); leading dimensions are
            flattened to rows.
        weight: ``[V/tp, H]`` this rank's vocabulary shard of the output layer for these rows.
        index: optional ``int64 [n]`` row indices selecting the ``n`` tokens scored (``None``: all rows).
        coef: scalar multiplier of this term.
        rounded: the logits rounded to the weight's dtype, as megatron's output layer returns them
            (``loss.logits_dtype: model``), instead of the fp32 accumulator (terms sharing a weight: one
            GEMM on their sum, rounded once; module doc); all terms of a call agree.
    """

    hidden: Tensor
    weight: Tensor
    index: Tensor | None = None
    coef: float = 1.0
    rounded: bool = False


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
    #: a tile's reductions: ``(tile_stats, tile_grads)`` of torch_kl or triton_kl
    tiles: "TileOps"
    #: the forward's GEMM kind (module doc): "fp32" operands, "fp32_out" (low-precision operands, fp32
    #: results) or "rounded" (low-precision operands and results)
    gemm: str


class TileOps(NamedTuple):
    """The per-tile reductions of one implementation (module doc)."""

    stats: Callable
    grads: Callable


def tile_ops(triton: bool, device: torch.device) -> TileOps:
    """The Triton kernels' tile reductions (for tensors on ``device``), or torch's."""
    if triton:
        from vigos_megatron.losses import triton_kl

        reason = triton_kl.unsupported_reason(1, 1, device)
        if reason is not None:
            raise ValueError(f"impl='triton': {reason}")
        return TileOps(triton_kl.tile_stats, triton_kl.tile_grads)
    return TileOps(torch_kl.tile_stats, torch_kl.tile_grads)


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


def _operands(grp: Group, hs: Sequence[Tensor], lo: int, hi: int, inv_t: float, wblk: Tensor, gemm: str):
    """A group's rows for tokens ``lo:hi``: the combined fp32 ``[c, H]`` (fp32 operands); for the rounded
    GEMMs of several terms, their fp32 sum rounded once to the model's dtype with the scale ``1/T``;
    else each term's rows in the model's dtype with its scale ``c_k/T`` (module doc)."""
    if wblk.dtype == torch.float32:
        return _combined(grp, hs, lo, hi, inv_t)
    if gemm == "rounded" and len(grp.terms) > 1:
        return [(_combined(grp, hs, lo, hi, 1.0).to(wblk.dtype), inv_t)]
    return _term_rows(grp, hs, lo, hi, inv_t)


def _group_logits(x, wblk: Tensor, rounded: bool) -> Tensor:
    """fp32 ``[c, Vb]`` logits of one group's operands ``x`` (:func:`_operands`)."""
    if isinstance(x, Tensor):
        return x @ wblk.t()
    out = None
    for rows, scale in x:
        z = torch.mm(rows.to(wblk.dtype), wblk.t()).float() if rounded else matmul_fp32_out(rows, wblk.t())
        out = z.mul_(scale) if out is None else out.add_(z, alpha=scale)
    return out


def _side(groups, xs, wblk, rounded: bool) -> Tensor:
    """A side's fp32 tile ``[c, Vb]`` (already divided by T): the sum of its groups' logits."""
    out = None
    for grp, x in zip(groups, xs):
        z = _group_logits(x, wblk[grp.weight], rounded)
        out = z if out is None else out.add_(z)
    return out


def _term_rows(grp: Group, hs: Sequence[Tensor], lo: int, hi: int, inv_t: float) -> list:
    """Each term's rows for tokens ``lo:hi`` in the model's dtype, with its scale ``c_k/T``."""
    return [((hs[slot][lo:hi] if idx is None else hs[slot].index_select(0, idx[lo:hi])), coef * inv_t)
            for slot, idx, coef in grp.terms]


def _group_backward(d: Tensor, x, grp: Group, hs, lo: int, hi: int, inv_t: float, w: Tensor,
                    wblk: Tensor, acc: Tensor | None, need_dh: bool) -> Tensor | None:
    """One group's share of a tile's backward: ``acc += dz^T x`` (``acc`` fp32 ``[Vb, H]`` or None) and
    the returned ``u = dz @ W[block]`` fp32 ``[c, H]`` (``need_dh``). ``w`` is the weight's block in its
    own dtype, ``wblk`` the block the forward used; a low-precision ``w`` takes the model's operands."""
    if acc is None and not need_dh:
        return None
    if w.dtype == torch.float32:
        if acc is not None:
            acc.addmm_(d.t(), x)
        return d @ wblk if need_dh else None
    dg = d.to(w.dtype)
    if acc is not None:
        for rows, scale in _term_rows(grp, hs, lo, hi, inv_t):
            acc.add_(matmul_model_dtype(dg.t(), rows.to(w.dtype)), alpha=scale)
    return matmul_model_dtype(dg, w) if need_dh else None


def _tile_shape(n: int, ws: Sequence[Tensor], chunk_bytes: int) -> tuple[int, int]:
    """``(Vb, c)``: vocabulary rows per fp32 weight block ``[Vb, H]`` and tokens per fp32 tile ``[c, Vb]``,
    each about ``chunk_bytes``."""
    v, h = ws[0].shape[0], max(w.shape[1] for w in ws)
    vb = max(1, min(v, chunk_bytes // (4 * h)))
    return vb, max(1, min(n, chunk_bytes // (4 * vb)))


def _tiles(meta: HiddenMeta, hs, ws, n: int):
    """Yield ``(v0, v1, wblk, lo, hi, xs, a, b)`` over the tiles, vocabulary blocks outer (module doc);
    ``v1 == v0`` marks the end of a block (``lo = hi = n``, no tile)."""
    v = ws[0].shape[0]
    vb, c = _tile_shape(n, ws, meta.chunk_bytes)
    for v0 in range(0, v, vb):
        v1 = min(v, v0 + vb)
        wblk = [w[v0:v1].to(torch.float32) if meta.gemm == "fp32" else w[v0:v1] for w in ws]
        for lo in range(0, n, c):
            hi = min(n, lo + c)
            xs = [[_operands(g, hs, lo, hi, meta.inv_t, wblk[g.weight], meta.gemm) for g in groups]
                  for groups in meta.sides]
            a, b = (_side(groups, x, wblk, meta.gemm == "rounded") for groups, x in zip(meta.sides, xs))
            yield v0, v1, wblk, lo, hi, xs, a, b
        yield v0, v0, wblk, n, n, None, None, None


def _stats(meta: HiddenMeta, hs, ws) -> tuple[Tensor, Tensor]:
    """The global ``m`` ``[n, 2]`` and ``s`` ``[n, 4]``: this shard's online statistics over its tiles,
    then two all-reduces of per-token scalars."""
    n = meta.reverse.numel()
    run = torch.zeros(n, 6, dtype=torch.float32, device=meta.reverse.device)
    run[:, :2] = float("-inf")
    for v0, v1, _, lo, hi, _, a, b in _tiles(meta, hs, ws, n):
        if v1 > v0:
            torch_kl.merge_stats(run[lo:hi], meta.tiles.stats(a, b, meta.want_a, meta.want_b))
    return reduce_shard_stats(run, meta.group)


def _scatter_hidden_grad(dh: Tensor, idx: Tensor | None, lo: int, hi: int, u: Tensor, scale: float) -> None:
    if idx is None:
        dh[lo:hi].add_(u, alpha=scale)
    else:
        dh.index_add_(0, idx[lo:hi], u, alpha=scale)


def _grads(meta: HiddenMeta, hs, ws, need_h, need_w, lse_a, lse_b, kl, g) -> tuple[list, list]:
    """fp32 hidden gradients (this shard's part) and the weight gradients, tile by tile (module doc)."""
    n = kl.numel()
    device = kl.device
    mode = "mixed" if (meta.want_a and meta.want_b) else ("reverse" if meta.want_a else "forward")
    groups_b = meta.sides[1]
    need_b = any(need_w[grp.weight] or any(need_h[t[0]] for t in grp.terms) for grp in groups_b)
    dh = [torch.zeros(h.shape, dtype=torch.float32, device=device) if need_h[i] else None for i, h in enumerate(hs)]
    dw = [torch.empty_like(w) if need_w[j] else None for j, w in enumerate(ws)]
    acc = None
    for v0, v1, wblk, lo, hi, xs, a, b in _tiles(meta, hs, ws, n):
        if acc is None:
            acc = [torch.zeros(wb.shape, dtype=torch.float32, device=device) if need_w[j] else None
                   for j, wb in enumerate(wblk)]
        if v1 == v0:  # the block is done: its weight gradient, once
            for j, a_j in enumerate(acc):
                if a_j is not None:
                    dw[j][v0:v0 + a_j.shape[0]] = a_j
            acc = None
            continue
        dz = meta.tiles.grads(a, b, lse_a[lo:hi], lse_b[lo:hi], kl[lo:hi], meta.reverse[lo:hi], g[lo:hi], mode, need_b)
        for groups, x, d in zip(meta.sides, xs, dz):
            if d is None:
                continue
            for grp, xg in zip(groups, x):
                terms = [t for t in grp.terms if dh[t[0]] is not None]
                u = _group_backward(d, xg, grp, hs, lo, hi, meta.inv_t, ws[grp.weight][v0:v1], wblk[grp.weight],
                                    acc[grp.weight], bool(terms))
                if terms:
                    for slot, idx, coef in terms:
                        _scatter_hidden_grad(dh[slot], idx, lo, hi, u, coef * meta.inv_t)
        del a, b, dz
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
                   want_b: bool, temperature: float, clip: float | None, tp_group, chunk_bytes: int,
                   triton: bool = False, low_precision_gemms: bool | None = None) -> Tensor:
    """fp32 ``[n]`` per-token KL of validated :class:`HiddenRows` terms (``reverse``: bool ``[n]``);
    ``triton``: each tile reduced by the Triton kernels (CUDA tensors, or the CPU interpreter);
    ``low_precision_gemms``: unrounded logits from low-precision operands with fp32 results (module
    doc; ``None``: for bf16/fp16 weights on CUDA; on the CPU the same numbers come from widened
    operands, at fp32 GEMM speed); terms with ``rounded`` take the rounded GEMMs whatever the device."""
    sides, hiddens, weights = _slots((s_terms, t_terms))
    rounded = {t.rounded for t in (*s_terms, *t_terms)}
    if len(rounded) > 1:
        raise ValueError("HiddenRows.rounded: the terms of one KL call disagree (all rounded or none)")
    low_precision = all(w.dtype in (torch.bfloat16, torch.float16) for w in weights)
    if low_precision_gemms is None:
        low_precision_gemms = weights[0].is_cuda
    gemm = "fp32"
    if low_precision and rounded.pop():
        gemm = "rounded"
    elif low_precision and low_precision_gemms:
        gemm = "fp32_out"
    meta = HiddenMeta(sides, len(hiddens), reverse, 1.0 / float(temperature), clip, tp_group, bool(want_a),
                      bool(want_b), int(chunk_bytes), tile_ops(triton, reverse.device), gemm)
    return _HiddenKL.apply(meta, *hiddens, *weights)
