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

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Direction = Literal["forward", "reverse"]
Impl = Literal["auto", "torch", "triton"]
IMPLS = ("auto", "torch", "triton")

#: Default bytes of ONE fp32 work tensor ``[chunk, V/tp]``; about 6 are alive at once.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


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


# --------------------------------------------------------------------------- helpers


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if t.numel() > 0 and _group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


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
    return _all_reduce(m, dist.ReduceOp.MAX, group)


def _token_sums(sides, inv_t, n, chunk, m, want_a, want_b, group) -> Tensor:
    """``[n, 4]`` global ``(S_a, S_b, C_a, C_b)`` (``SUM`` all-reduce #2).

    With ``a' = a - m_a``, ``b' = b - m_b`` and ``dm = m_a - m_b`` (all in place):
    ``C_a = sum e^{a'} (a' - b') + dm * S_a`` and ``C_b = -sum e^{b'} (a' - b') - dm * S_b``.
    """
    s = torch.zeros(n, 4, dtype=torch.float32, device=m.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        a = _side_chunk(*sides[0], lo, hi, inv_t).sub_(m[lo:hi, 0:1])
        b = _side_chunk(*sides[1], lo, hi, inv_t).sub_(m[lo:hi, 1:2])
        ea = torch.exp(a)
        eb = torch.exp(b)
        s[lo:hi, 0] = ea.sum(-1)
        s[lo:hi, 1] = eb.sum(-1)
        d = a.sub_(b)
        dm = m[lo:hi, 0] - m[lo:hi, 1]
        if want_a:
            s[lo:hi, 2] = (ea.mul_(d)).sum(-1) + dm * s[lo:hi, 0]
        if want_b:
            s[lo:hi, 3] = -(eb.mul_(d)).sum(-1) - dm * s[lo:hi, 1]
        del a, b, ea, eb, d
    return _all_reduce(s, dist.ReduceOp.SUM, group)


def _kl_from_stats(m: Tensor, s: Tensor, reverse: Tensor):
    """Per-token ``(kl, lse_a, lse_b)`` from the reduced statistics."""
    lse_a = m[:, 0] + torch.log(s[:, 0])
    lse_b = m[:, 1] + torch.log(s[:, 1])
    kl_rev = s[:, 2] / s[:, 0] - lse_a + lse_b
    kl_fwd = s[:, 3] / s[:, 1] - lse_b + lse_a
    return torch.where(reverse, kl_rev, kl_fwd), lse_a, lse_b


def _side_grads(a, b, lse_a, lse_b, kl, reverse, g, mode: str, need_b: bool):
    """Gradients w.r.t. the two sides' (temperature-scaled) logits for one chunk.

    ``a``/``b`` are consumed (overwritten). ``g`` is ``[c, 1]`` (incoming gradient / T).
    ``mode`` is ``"forward"``, ``"reverse"`` or ``"mixed"`` (per-token ``reverse``);
    the single-direction modes work in place on 4 chunk-sized tensors::

        reverse: da = p_a (la - lb - kl),  db = q_b - p_a
        forward: da = p_a - q_b,           db = q_b (lb - la - kl)
    """
    la = a.sub_(lse_a[:, None])  # log p_a
    lb = b.sub_(lse_b[:, None])  # log q_b
    pa = torch.exp(la)
    qb = torch.exp(lb)
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


# --------------------------------------------------------------------------- autograd


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL between two vocabulary-sharded sides; see the module docstring.

    ``forward(ctx, meta, *flat)`` with ``flat = (logits_0, index_0, logits_1, index_1, ...)``
    (``index_i`` may be ``None``) and ``meta = (n_a_terms, coefs, reverse, inv_t, clip,
    group, chunk, want_a, want_b)``. Returns fp32 ``[n]`` (clipped where ``kl > clip``).
    Backward returns, for each logits tensor that needs it, a gradient of its own
    dtype and shape: the rows it contributed receive ``coef * g/T * dKL/dside``.
    """

    @staticmethod
    def forward(ctx, meta, *flat):
        n_a, coefs, reverse, inv_t, clip, group, chunk, want_a, want_b = meta
        logits = flat[0::2]
        indices = flat[1::2]
        rows = [_rows(x) for x in logits]
        terms = list(zip(rows, coefs))
        sides = ((terms[:n_a], indices[:n_a]), (terms[n_a:], indices[n_a:]))
        n = reverse.numel()
        m = _token_maxima(sides, inv_t, n, chunk, group)
        s = _token_sums(sides, inv_t, n, chunk, m, want_a, want_b, group)
        kl, lse_a, lse_b = _kl_from_stats(m, s, reverse)
        if not bool(torch.isfinite(kl).all()):
            _raise_non_finite(logits, n_a)
        clipped = kl > clip if clip is not None else torch.zeros_like(reverse)
        ctx.meta = meta
        ctx.shapes = [x.shape for x in logits]
        ctx.save_for_backward(kl, lse_a, lse_b, clipped, *[i if i is not None else torch.empty(0) for i in indices], *logits)
        ctx.has_index = [i is not None for i in indices]
        out = torch.where(clipped, torch.full_like(kl, clip if clip is not None else 0.0), kl)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n_a, coefs, reverse, inv_t, clip, group, chunk, want_a, want_b = ctx.meta
        saved = ctx.saved_tensors
        kl, lse_a, lse_b, clipped = saved[:4]
        k = len(ctx.shapes)
        indices = [t if has else None for t, has in zip(saved[4 : 4 + k], ctx.has_index)]
        logits = saved[4 + k :]
        needs = [ctx.needs_input_grad[1 + 2 * i] for i in range(k)]
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
            da, db = _side_grads(
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


def _raise_non_finite(logits, n_a):
    for i, x in enumerate(logits):
        if not bool(torch.isfinite(x).all()):
            name = "student_logits" if i < n_a else "teacher_logits"
            raise ValueError(f"{name} (term {i}) contains non-finite values (inf or nan)")
    raise ValueError(
        "non-finite KL: student_logits or teacher_logits contain inf/nan on another "
        "tensor-parallel rank (or the temperature is too small for fp32)"
    )


# --------------------------------------------------------------------------- validation


def _check_terms(name: str, terms: Sequence[LogitRows], ref: Tensor, n: int | None) -> int:
    for t in terms:
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
        rows = t.logits.numel() // t.logits.shape[-1]
        if t.index is None:
            count = rows
        else:
            if t.index.dtype != torch.int64 or t.index.dim() != 1:
                raise TypeError(f"{name}: index must be a 1-D int64 tensor")
            if t.index.device != ref.device:
                raise ValueError(f"{name}: index device {t.index.device} != {ref.device}")
            count = t.index.numel()
        if n is None:
            n = count
        elif count != n:
            raise ValueError(f"{name}: selects {count} tokens, expected {n} (token counts of all terms must match)")
    return n


def _check_vocab(v_local: int, vocab_size: int | None, group, device) -> None:
    tp = _group_size(group)
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
        _all_reduce(w, dist.ReduceOp.MAX, group)
        if int(w[0]) != v_local or int(-w[1]) != v_local:
            raise ValueError(
                f"vocabulary shards differ across the tensor-parallel group (this rank {v_local}, "
                f"max {int(w[0])}, min {int(-w[1])}): the vocabulary is not divisible by tp={tp}"
            )


def _use_triton(impl: str, device: torch.device, n_student: int, n_teacher: int) -> bool:
    """``"auto"``: Triton for CUDA tensors when importable and the call fits its kernels, else torch."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
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
        chunk_bytes: size of one fp32 ``[chunk, V/tp]`` work tensor; bounds the temporaries
            (torch implementation only).
        impl: ``"torch"`` (this module, chunked), ``"triton"`` (fused kernels of
            :mod:`vigos_megatron.losses.triton_kl`: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton for CUDA tensors, torch otherwise).

    Returns:
        fp32 ``[n]`` per-token KL.
    """
    s_terms = [student] if isinstance(student, LogitRows) else list(student)
    t_terms = [teacher] if isinstance(teacher, LogitRows) else list(teacher)
    if not s_terms or not t_terms:
        raise ValueError("kl_rows: both sides need at least one LogitRows term")
    ref = s_terms[0].logits
    n = _check_terms("student_logits", s_terms, ref, None)
    _check_terms("teacher_logits", t_terms, ref, n)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_vocab(ref.shape[-1], vocab_size, tp_group, ref.device)
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
    if _use_triton(impl, ref.device, len(s_terms), len(t_terms)):
        from vigos_megatron.losses.triton_kl import triton_kl_rows

        return triton_kl_rows(
            s_terms, t_terms, reverse=rev, want_a=want_a, want_b=want_b,
            temperature=temperature, clip=clip, tp_group=tp_group,
        )
    terms = s_terms + t_terms
    chunk = _chunk_len(n, ref.shape[-1], chunk_bytes)
    meta = (len(s_terms), tuple(float(t.coef) for t in terms), rev, 1.0 / float(temperature), clip, tp_group, chunk, want_a, want_b)
    flat = []
    for t in terms:
        flat += [t.logits, t.index]
    return _VocabParallelKL.apply(meta, *flat)


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
