"""Triton kernels of the vocabulary-parallel KL (host side: :mod:`vigos_megatron.losses.triton_kl`).

Both sides of the KL are sums of row-selected logits terms (:class:`LogitRows`); a
side has ``N`` (1 to 4, a compile-time constant) terms, passed as four
``(P, I, S, C)`` slots: ``P`` the term's ``[rows, V]`` logits (last stride 1), ``I`` its
``int64 [n]`` row of each token, ``S`` its row stride in elements and ``C`` its
coefficient times ``1/T``. Unused slots repeat slot 0 and are never read. The value of
side ``a`` at token ``t`` and vocabulary entry ``v`` is ``sum_k C_k * P_k[I_k[t], v]`` in fp32.

Only APIs common to Triton 3.6 and 3.8 are used (``triton.jit``, ``tl.load/store`` with
masks, ``tl.max/sum/exp/where/maximum``, bitcasts, ``range`` loops with runtime bounds).
The kernels call no ``@triton.jit`` helpers: under the interpreter every such call re-patches
``triton.language`` (milliseconds each), which dominated the CPU tests' time; the
per-slot loads are therefore written out.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kl_stats_kernel(
    A0, A1, A2, A3, IA0, IA1, IA2, IA3, SA0, SA1, SA2, SA3, CA0, CA1, CA2, CA3,
    B0, B1, B2, B3, IB0, IB1, IB2, IB3, SB0, SB1, SB2, SB3, CB0, CB1, CB2, CB3,
    STATS,
    V,
    NA: tl.constexpr,
    NB: tl.constexpr,
    WANT_A: tl.constexpr,
    WANT_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token ``t``: one pass over this shard's ``V`` entries of both sides.

    Online (running-max) statistics over the local shard, written to ``STATS`` fp32 ``[n, 6]``::

        m_a = max_v a_v                    m_b = max_v b_v
        S_a = sum_v e^{a_v - m_a}          S_b = sum_v e^{b_v - m_b}
        C_a = sum_v e^{a_v - m_a} (a_v - b_v)     (0 unless WANT_A)
        C_b = sum_v e^{b_v - m_b} (b_v - a_v)     (0 unless WANT_B)

    When the running max moves from ``m`` to ``m'``, ``S`` and ``C`` are rescaled by
    ``e^{m - m'}`` (the factor ``a_v - b_v`` does not depend on the shift).
    """
    t = tl.program_id(0).to(tl.int64)
    pa0 = A0 + tl.load(IA0 + t).to(tl.int64) * SA0
    pa1 = A1 + tl.load(IA1 + t).to(tl.int64) * SA1
    pa2 = A2 + tl.load(IA2 + t).to(tl.int64) * SA2
    pa3 = A3 + tl.load(IA3 + t).to(tl.int64) * SA3
    pb0 = B0 + tl.load(IB0 + t).to(tl.int64) * SB0
    pb1 = B1 + tl.load(IB1 + t).to(tl.int64) * SB1
    pb2 = B2 + tl.load(IB2 + t).to(tl.int64) * SB2
    pb3 = B3 + tl.load(IB3 + t).to(tl.int64) * SB3
    m_a = float("-inf")
    m_b = float("-inf")
    s_a = 0.0
    s_b = 0.0
    c_a = 0.0
    c_b = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        # side values in fp32: sum_k C_k * P_k[row_k(t), offs]; 0 on masked lanes
        a = tl.load(pa0 + offs, mask=mask, other=0.0).to(tl.float32) * CA0
        if NA > 1:
            a += tl.load(pa1 + offs, mask=mask, other=0.0).to(tl.float32) * CA1
        if NA > 2:
            a += tl.load(pa2 + offs, mask=mask, other=0.0).to(tl.float32) * CA2
        if NA > 3:
            a += tl.load(pa3 + offs, mask=mask, other=0.0).to(tl.float32) * CA3
        b = tl.load(pb0 + offs, mask=mask, other=0.0).to(tl.float32) * CB0
        if NB > 1:
            b += tl.load(pb1 + offs, mask=mask, other=0.0).to(tl.float32) * CB1
        if NB > 2:
            b += tl.load(pb2 + offs, mask=mask, other=0.0).to(tl.float32) * CB2
        if NB > 3:
            b += tl.load(pb3 + offs, mask=mask, other=0.0).to(tl.float32) * CB3
        ma_new = tl.maximum(m_a, tl.max(tl.where(mask, a, float("-inf")), axis=0))
        mb_new = tl.maximum(m_b, tl.max(tl.where(mask, b, float("-inf")), axis=0))
        ea = tl.where(mask, tl.exp(a - ma_new), 0.0)
        eb = tl.where(mask, tl.exp(b - mb_new), 0.0)
        ra = tl.exp(m_a - ma_new)
        rb = tl.exp(m_b - mb_new)
        s_a = s_a * ra + tl.sum(ea, axis=0)
        s_b = s_b * rb + tl.sum(eb, axis=0)
        d = a - b  # 0 on masked lanes
        if WANT_A:
            c_a = c_a * ra + tl.sum(ea * d, axis=0)
        if WANT_B:
            c_b = c_b * rb - tl.sum(eb * d, axis=0)
        m_a = ma_new
        m_b = mb_new
    out = STATS + t * 6
    tl.store(out + 0, m_a)
    tl.store(out + 1, m_b)
    tl.store(out + 2, s_a)
    tl.store(out + 3, s_b)
    tl.store(out + 4, c_a)
    tl.store(out + 5, c_b)


@triton.jit
def kl_grad_kernel(
    A0, A1, A2, A3, IA0, IA1, IA2, IA3, SA0, SA1, SA2, SA3, CA0, CA1, CA2, CA3,
    B0, B1, B2, B3, IB0, IB1, IB2, IB3, SB0, SB1, SB2, SB3, CB0, CB1, CB2, CB3,
    TOK,
    REV,
    ORDER,
    ROWPTR,
    OUT,
    OUT_STRIDE,
    COEF,
    V,
    NA: tl.constexpr,
    NB: tl.constexpr,
    SIDE_A: tl.constexpr,
    MODE: tl.constexpr,
    BF16_RTNE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row ``r`` of ONE term's gradient ``OUT`` ``[rows, V]`` (that term's dtype).

    The tokens whose selected row is ``r`` are ``ORDER[ROWPTR[r]:ROWPTR[r+1]]`` (CSR of the
    term's index). None: the row is written with zeros; one: the row is written once;
    several: each further token adds its contribution to the stored row (in order, by this
    program alone: deterministic, rounded to ``OUT``'s dtype per token like ``index_add_``).
    ``TOK`` fp32 ``[n, 4]`` holds per token ``(lse_a, lse_b, kl, g)`` with ``g`` the incoming
    gradient times ``1/T`` (0 where clipped); ``REV`` int8 ``[n]`` the per-token direction
    (read only when ``MODE == 2``). With ``la = a - lse_a``, ``lb = b - lse_b``,
    ``p_a = e^{la}``, ``q_b = e^{lb}``::

        MODE 0 (forward KL(q_b||p_a)):  d/da = p_a - q_b              d/db = q_b (lb - la - kl)
        MODE 1 (reverse KL(p_a||q_b)):  d/da = p_a (la - lb - kl)     d/db = q_b - p_a
        MODE 2: per token, as REV says

    ``OUT[r] = COEF * sum_t g_t * d/d(side)`` where ``SIDE_A`` picks the side of the term.
    ``BF16_RTNE``: round fp32 to bfloat16 to nearest-even with integer operations (the
    conversion of the GPU; Triton's interpreter truncates in ``.to(tl.bfloat16)``).
    """
    r = tl.program_id(0).to(tl.int64)
    k0 = tl.load(ROWPTR + r)
    k1 = tl.load(ROWPTR + r + 1)
    out = OUT + r * OUT_STRIDE
    if k1 == k0:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            tl.store(out + offs, tl.zeros([BLOCK_V], dtype=OUT.dtype.element_ty), mask=offs < V)
    for k in range(k0, k1):
        t = tl.load(ORDER + k).to(tl.int64)
        pa0 = A0 + tl.load(IA0 + t).to(tl.int64) * SA0
        pa1 = A1 + tl.load(IA1 + t).to(tl.int64) * SA1
        pa2 = A2 + tl.load(IA2 + t).to(tl.int64) * SA2
        pa3 = A3 + tl.load(IA3 + t).to(tl.int64) * SA3
        pb0 = B0 + tl.load(IB0 + t).to(tl.int64) * SB0
        pb1 = B1 + tl.load(IB1 + t).to(tl.int64) * SB1
        pb2 = B2 + tl.load(IB2 + t).to(tl.int64) * SB2
        pb3 = B3 + tl.load(IB3 + t).to(tl.int64) * SB3
        lse_a = tl.load(TOK + t * 4 + 0)
        lse_b = tl.load(TOK + t * 4 + 1)
        kl = tl.load(TOK + t * 4 + 2)
        g = tl.load(TOK + t * 4 + 3) * COEF
        rev = tl.load(REV + t) != 0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            a = tl.load(pa0 + offs, mask=mask, other=0.0).to(tl.float32) * CA0
            if NA > 1:
                a += tl.load(pa1 + offs, mask=mask, other=0.0).to(tl.float32) * CA1
            if NA > 2:
                a += tl.load(pa2 + offs, mask=mask, other=0.0).to(tl.float32) * CA2
            if NA > 3:
                a += tl.load(pa3 + offs, mask=mask, other=0.0).to(tl.float32) * CA3
            b = tl.load(pb0 + offs, mask=mask, other=0.0).to(tl.float32) * CB0
            if NB > 1:
                b += tl.load(pb1 + offs, mask=mask, other=0.0).to(tl.float32) * CB1
            if NB > 2:
                b += tl.load(pb2 + offs, mask=mask, other=0.0).to(tl.float32) * CB2
            if NB > 3:
                b += tl.load(pb3 + offs, mask=mask, other=0.0).to(tl.float32) * CB3
            la = a - lse_a
            lb = b - lse_b
            pa = tl.exp(la)
            qb = tl.exp(lb)
            if SIDE_A:
                if MODE == 0:
                    d = pa - qb
                elif MODE == 1:
                    d = pa * (la - lb - kl)
                else:
                    d = tl.where(rev, pa * (la - lb - kl), pa - qb)
            else:
                if MODE == 0:
                    d = qb * (lb - la - kl)
                elif MODE == 1:
                    d = qb - pa
                else:
                    d = tl.where(rev, qb - pa, qb * (lb - la - kl))
            val = g * d
            if k > k0:  # a further token selecting the same row
                val += tl.load(out + offs, mask=mask, other=0.0).to(tl.float32)
            if BF16_RTNE:
                bits = val.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                tl.store(out + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
            else:
                tl.store(out + offs, val.to(OUT.dtype.element_ty), mask=mask)
