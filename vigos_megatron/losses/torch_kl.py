"""The chunked torch implementation of the vocabulary-parallel KL (the math, the all-reduces and
the closed-form gradients: :mod:`vigos_megatron.losses.vocab_parallel_kl`).

:func:`torch_kl_rows` is called by :func:`~vigos_megatron.losses.vocab_parallel_kl.kl_rows` with
validated terms; temporaries are a few fp32 ``[chunk, V/tp]`` tensors whatever the token count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vigos_megatron.collectives import all_reduce
from vigos_megatron.losses.kl_common import LogitRows, finish_forward, meta_for, saved_for_backward


def _rows(term_logits: Tensor) -> Tensor:
    return term_logits.reshape(-1, term_logits.shape[-1])


def _side_chunk(terms, index_list, lo: int, hi: int, inv_t: float) -> Tensor:
    """Fresh fp32 ``[hi-lo, V/tp]`` logits of one side for tokens ``lo:hi``, divided by T."""
    out = None
    for (rows, coef), idx in zip(terms, index_list):
        x = rows[lo:hi] if idx is None else rows.index_select(0, idx[lo:hi])
        scale = coef * inv_t
        if out is None:
            out = x.to(torch.float32, copy=idx is None)  # never alias the caller's tensor
            if scale != 1.0:
                out.mul_(scale)
        else:
            out.add_(x, alpha=scale)
    return out


def _chunk_len(n: int, v_local: int, chunk_bytes: int) -> int:
    return max(1, min(n, chunk_bytes // max(1, 4 * v_local)))


def _side_max(terms, index_list, lo: int, hi: int, inv_t: float) -> Tensor:
    """Per-token max of one side's scaled logits (any upper-bound shift works for stability)."""
    if len(terms) == 1 and terms[0][1] > 0:
        (rows, coef), idx = terms[0], index_list[0]
        x = rows[lo:hi] if idx is None else rows.index_select(0, idx[lo:hi])
        return x.amax(dim=-1).float() * (coef * inv_t)  # no fp32 copy of the chunk
    return _side_chunk(terms, index_list, lo, hi, inv_t).amax(dim=-1)


def _token_maxima(sides, inv_t, n, chunk, group) -> Tensor:
    """``[n, 2]`` global per-token maxima (``MAX`` all-reduce #1)."""
    m = torch.empty(n, 2, dtype=torch.float32, device=sides[0][0][0][0].device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        for j, (terms, idx) in enumerate(sides):
            m[lo:hi, j] = _side_max(terms, idx, lo, hi, inv_t)
    return all_reduce(m, group, dist.ReduceOp.MAX)


def chunk_sums(a: Tensor, b: Tensor, m: Tensor, want_a: bool, want_b: bool) -> Tensor:
    """This shard's ``[c, 4]`` ``(S_a, S_b, C_a, C_b)`` of one chunk's fp32 sides ``a``, ``b`` ``[c, V/tp]``
    (consumed) against the global maxima ``m`` ``[c, 2]``.

    With ``a' = a - m_a``, ``b' = b - m_b`` and ``dm = m_a - m_b`` (all in place):
    ``C_a = sum e^{a'} (a' - b') + dm * S_a`` and ``C_b = -sum e^{b'} (a' - b') - dm * S_b``.
    """
    s = torch.zeros(a.shape[0], 4, dtype=torch.float32, device=a.device)
    a = a.sub_(m[:, 0:1])
    b = b.sub_(m[:, 1:2])
    ea = torch.exp(a)
    eb = torch.exp(b)
    s[:, 0] = ea.sum(-1)
    s[:, 1] = eb.sum(-1)
    d = a.sub_(b)
    dm = m[:, 0] - m[:, 1]
    if want_a:
        s[:, 2] = (ea.mul_(d)).sum(-1) + dm * s[:, 0]
    if want_b:
        s[:, 3] = -(eb.mul_(d)).sum(-1) - dm * s[:, 1]
    return s


def _token_sums(sides, inv_t, n, chunk, m, want_a, want_b, group) -> Tensor:
    """``[n, 4]`` global ``(S_a, S_b, C_a, C_b)`` (``SUM`` all-reduce #2; :func:`chunk_sums`)."""
    s = torch.zeros(n, 4, dtype=torch.float32, device=m.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        a = _side_chunk(*sides[0], lo, hi, inv_t)
        b = _side_chunk(*sides[1], lo, hi, inv_t)
        s[lo:hi] = chunk_sums(a, b, m[lo:hi], want_a, want_b)
        del a, b
    return all_reduce(s, group, dist.ReduceOp.SUM)


def side_grads(a, b, lse_a, lse_b, kl, reverse, g, mode: str, need_b: bool):
    """Gradients w.r.t. the two sides' (temperature-scaled) logits for one chunk.

    ``a``/``b`` are consumed (overwritten). ``g`` is ``[c, 1]`` (incoming gradient / T).
    ``mode`` is ``"forward"``, ``"reverse"`` or ``"mixed"`` (per-token ``reverse``);
    the single-direction modes work in place on 4 chunk-sized tensors (3 for the reverse KL's side
    ``a`` alone)::

        reverse: da = p_a (la - lb - kl),  db = q_b - p_a
        forward: da = p_a - q_b,           db = q_b (lb - la - kl)
    """
    la = a.sub_(lse_a[:, None])  # log p_a
    lb = b.sub_(lse_b[:, None])  # log q_b
    pa = torch.exp(la)
    qb = torch.exp(lb) if (mode != "reverse" or need_b) else None  # reverse, side a only: not needed
    d = la.sub_(lb)  # la - lb
    k = kl[:, None]
    if mode == "reverse":
        da = (d - k if need_b else d.sub_(k)).mul_(pa).mul_(g)
        db = qb.sub_(pa).mul_(g) if need_b else None
    elif mode == "forward":
        db = d.neg_().sub_(k).mul_(qb).mul_(g) if need_b else None
        da = pa.sub_(qb).mul_(g)
    else:
        r = reverse[:, None]
        da = torch.where(r, pa * (d - k), pa - qb).mul_(g)
        db = torch.where(r, qb - pa, qb * (d.neg_() - k)).mul_(g) if need_b else None
    return da, db


def tile_stats(a: Tensor, b: Tensor, want_a: bool, want_b: bool) -> Tensor:
    """This tile's online statistics fp32 ``[c, 6]`` ``(m_a, m_b, S_a, S_b, C_a, C_b)`` of two fp32
    ``[c, Vb]`` tiles of the sides (consumed), against the tile's own maxima::

        S_a = sum_v e^{a_v - m_a}     C_a = sum_v e^{a_v - m_a} (a_v - b_v)
        S_b = sum_v e^{b_v - m_b}     C_b = sum_v e^{b_v - m_b} (b_v - a_v)

    (``C`` only where wanted, else 0); :func:`merge_stats` folds tiles into running statistics.
    """
    out = torch.zeros(a.shape[0], 6, dtype=torch.float32, device=a.device)
    if a.shape[0] == 0:
        return out
    m_a = a.amax(-1, keepdim=True)
    m_b = b.amax(-1, keepdim=True)
    d = a - b if (want_a or want_b) else None
    ea = a.sub_(m_a).exp_()
    eb = b.sub_(m_b).exp_()
    out[:, 0] = m_a[:, 0]
    out[:, 1] = m_b[:, 0]
    out[:, 2] = ea.sum(-1)
    out[:, 3] = eb.sum(-1)
    if want_a:
        out[:, 4] = ea.mul_(d).sum(-1)
    if want_b:
        out[:, 5] = -eb.mul_(d).sum(-1)
    return out


def merge_stats(run: Tensor, tile: Tensor) -> None:
    """Fold a tile's statistics ``[c, 6]`` into the running ones ``run`` (in place; ``m = -inf``,
    sums 0 before the first tile): ``m' = max(m, m_t)``, each sum ``x e^{m - m'} + x_t e^{m_t - m'}``."""
    m = torch.maximum(run[:, :2], tile[:, :2])
    run[:, 2:] = run[:, 2:] * torch.exp(run[:, :2] - m).repeat(1, 2) + tile[:, 2:] * torch.exp(tile[:, :2] - m).repeat(1, 2)
    run[:, :2] = m


def tile_grads(a: Tensor, b: Tensor, lse_a: Tensor, lse_b: Tensor, kl: Tensor, reverse: Tensor, g: Tensor, mode: str,
               need_b: bool) -> tuple[Tensor, Tensor | None]:
    """fp32 ``(da, db)`` ``[c, Vb]`` of one tile (``a``/``b`` consumed; ``g`` ``[c]``): :func:`side_grads`."""
    return side_grads(a, b, lse_a, lse_b, kl, reverse, g[:, None], mode, need_b)


# --------------------------------------------------------------------------- autograd


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL between two vocabulary-sharded sides; see the module docstring.

    ``forward(ctx, meta, *flat)``: :class:`~vigos_megatron.losses.kl_common.KLMeta` (``extra``: the
    token chunk length), ``flat = (logits_0, index_0, ...)`` (``index_i`` may be ``None``).
    Returns fp32 ``[n]`` (clipped where ``kl > clip``).
    Backward returns, for each logits tensor that needs it, a gradient of its own
    dtype and shape: the rows it contributed receive ``coef * g/T * dKL/dside``.
    """

    @staticmethod
    def forward(ctx, meta, *flat):
        n_a, coefs, reverse, inv_t, clip, group, want_a, want_b, chunk = meta
        logits = flat[0::2]
        indices = flat[1::2]
        rows = [_rows(x) for x in logits]
        terms = list(zip(rows, coefs))
        sides = ((terms[:n_a], indices[:n_a]), (terms[n_a:], indices[n_a:]))
        n = reverse.numel()
        m = _token_maxima(sides, inv_t, n, chunk, group)
        s = _token_sums(sides, inv_t, n, chunk, m, want_a, want_b, group)
        return finish_forward(ctx, meta, m, s, indices, logits)

    @staticmethod
    def backward(ctx, grad_out):
        n_a, coefs, reverse, inv_t, clip, group, want_a, want_b, chunk = ctx.meta
        kl, lse_a, lse_b, clipped, indices, logits, needs = saved_for_backward(ctx)
        k = len(logits)
        rows = [_rows(x) for x in logits]
        terms = list(zip(rows, coefs))
        sides = ((terms[:n_a], indices[:n_a]), (terms[n_a:], indices[n_a:]))
        need_b = any(needs[n_a:])
        mode = "mixed" if (want_a and want_b) else ("reverse" if want_a else "forward")
        grads = [
            (torch.zeros_like(r) if indices[i] is not None else torch.empty_like(r)) if needs[i] else None
            for i, r in enumerate(rows)
        ]
        g = torch.where(clipped, torch.zeros_like(grad_out), grad_out.float()) * inv_t
        n = kl.numel()
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            a = _side_chunk(*sides[0], lo, hi, inv_t)
            b = _side_chunk(*sides[1], lo, hi, inv_t)
            da, db = side_grads(
                a, b, lse_a[lo:hi], lse_b[lo:hi], kl[lo:hi], reverse[lo:hi], g[lo:hi, None], mode, need_b
            )
            for i in range(k):
                if grads[i] is None:
                    continue
                side_grad = da if i < n_a else db
                val = side_grad * coefs[i] if coefs[i] != 1.0 else side_grad
                if indices[i] is None:
                    grads[i][lo:hi] = val
                else:
                    grads[i].index_add_(0, indices[i][lo:hi], val.to(grads[i].dtype))
            del a, b, da, db
        out = [None]
        for i in range(k):
            out.append(None if grads[i] is None else grads[i].view(ctx.shapes[i]))
            out.append(None)
        return tuple(out)


def torch_kl_rows(s_terms: list[LogitRows], t_terms: list[LogitRows], *, reverse: Tensor, want_a: bool, want_b: bool,
                  temperature: float, clip: float | None, tp_group, chunk_bytes: int) -> Tensor:
    """fp32 ``[n]`` per-token KL of validated terms (``reverse``: bool ``[n]`` on the logits' device)."""
    chunk = _chunk_len(reverse.numel(), s_terms[0].logits.shape[-1], chunk_bytes)
    meta, flat = meta_for(s_terms, t_terms, reverse=reverse, temperature=temperature, clip=clip, group=tp_group,
                          want_a=want_a, want_b=want_b, extra=chunk)
    return _VocabParallelKL.apply(meta, *flat)
