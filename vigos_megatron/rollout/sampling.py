"""Next-token choice on vocabulary-sharded logits: the same token on every TP rank, at any layout.

The last pipeline stage holds logits ``z`` of shape ``[B, V/tp]`` per tensor-parallel rank
(rank ``r`` owns global ids ``[r*V/tp, (r+1)*V/tp)``). The full vocabulary is never gathered.

Method (``sample_next_tokens``), for each row ``b``:

1. **Greedy** (``sampling.greedy``): every rank takes its shard's maximum (first index on ties),
   the ``(value, global id)`` pairs are all-gathered over TP (``tp`` pairs per row), and the
   token is the maximum value, ties broken by the **lowest global id**.
2. **Temperature**: ``x = z / T`` in fp32.
3. **Top-k** (``k > 0``): every rank takes its shard's top ``k`` (``values, global ids``); the
   ``tp*k`` candidates are all-gathered and ordered by (value desc, id asc); the first ``k`` are
   the global top-k (exact: any global top-k token is in its own shard's top-k).
4. **Top-p** (``p < 1``): probabilities over the kept set ``q_i = exp(x_i - lse)`` with ``lse``
   the log-sum-exp over the top-k set (Hugging Face's warper order: top-p acts on the
   renormalised top-k distribution), or over the full vocabulary when ``k = 0`` (two
   all-reduces of ``[B]`` scalars: max, then sum of ``exp``). Token ``j`` in the ordered list is
   kept iff the mass strictly before it is ``< p`` (the first token is always kept), which is
   HF's ``TopPLogitsWarper`` rule. With ``k = 0`` the nucleus is searched in the per-shard top
   ``c`` candidates (``c`` = 64, multiplied by 4 until exact): the search is exact when every
   truncated shard's last candidate is strictly below the last kept value; every rank decides
   this from the same gathered data, so all ranks grow ``c`` together.
5. **Gumbel-max**: the token is ``argmax_i (x_i + g_i)`` over the kept set (lowest id on ties),
   ``g_i = -log(-log u_i)``, which samples exactly from ``softmax(x)`` restricted to the kept set.
   ``u_i`` in (0, 1) has 53 random bits from a counter-based hash (two 32-bit lanes of chained
   ``lowbias32`` mixes, computed with exact int64 arithmetic on the logits' device) of
   ``(seed, step, sample_id, position, global vocabulary id)``: the noise of a token depends
   only on those five numbers, never on the TP/PP/DP layout, the batch composition or the
   rank, so the same seeds give the same tokens at any layout (up to floating-point
   differences in the logits themselves). With ``k = 0`` and ``p = 1`` the Gumbel-max runs over
   each full shard and only the per-shard winners are gathered.

``position`` is the index of the token in its completion (0 for the first generated token).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vigos_megatron.config.sampling import SamplingConfig

_M32 = 0xFFFFFFFF
#: lane constants (arbitrary odd 32-bit words)
_LANE_SEEDS = (0x243F6A88, 0x85A308D3)
#: initial candidates per shard for the top-p search when top-k is off
TOP_P_CANDIDATES = 64


# --------------------------------------------------------------------------- counter-based noise


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` (C. Wellons) on int64 tensors holding unsigned 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Absorb a non-negative int64 value (both 32-bit halves) into the hash state."""
    h = _mix32(h ^ (v & _M32))
    return _mix32(h ^ ((v >> 32) & _M32))


def row_keys(seed: int, step: int, sample_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row hash states ``[B, 2]`` (two lanes) of ``(seed, step, sample_id, position)``.

    ``sample_ids`` and ``positions``: int64 ``[B]`` (non-negative), on the logits' device.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed} step={step}")
    dev = sample_ids.device
    lanes = []
    for lane in _LANE_SEEDS:
        h = torch.full_like(sample_ids, lane, dtype=torch.int64, device=dev)
        h = _absorb(h, torch.full_like(h, seed))
        h = _absorb(h, torch.full_like(h, step))
        h = _absorb(h, sample_ids.to(torch.int64))
        h = _absorb(h, positions.to(torch.int64))
        lanes.append(h)
    return torch.stack(lanes, dim=-1)


def uniform_noise(keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """``u`` in (0, 1), float64 ``[B, n]``, for rows' ``keys`` ``[B, 2]`` and global ids ``[B, n]`` or ``[n]``."""
    ids = vocab_ids.to(torch.int64)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    w1 = _absorb(keys[:, :1], ids)
    w2 = _absorb(keys[:, 1:], ids)
    bits53 = (w1 << 21) | (w2 >> 11)  # < 2**53: exact in float64
    return (bits53.to(torch.float64) + 0.5) * (2.0**-53)


def gumbel_noise(keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)``, float64 ``[B, n]``."""
    return -torch.log(-torch.log(uniform_noise(keys, vocab_ids)))


# --------------------------------------------------------------------------- TP helpers


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather_last(t: torch.Tensor, group) -> torch.Tensor:
    """``[B, n, ...]`` per rank -> ``[B, tp*n, ...]`` (rank-major along dim 1)."""
    if _tp_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_tp_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _gather_candidates(values: torch.Tensor, ids: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank candidates ``[B, c]`` (fp32 values, int64 global ids) -> all ranks' ``[B, tp*c]``, one collective."""
    packed = torch.stack([values.to(torch.float64), ids.to(torch.float64)], dim=-1)  # ids < 2**53: exact
    g = _all_gather_last(packed, group)
    return g[..., 0], g[..., 1].to(torch.int64)


def _pick_max(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row the id with the largest score, ties broken by the lowest id. ``[B, n]`` -> int64 ``[B]``."""
    best = scores.max(dim=-1, keepdim=True).values
    big = torch.iinfo(torch.int64).max
    return torch.where(scores == best, ids, torch.full_like(ids, big)).min(dim=-1).values


def _order_desc(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (value desc, id asc)."""
    by_id = torch.argsort(ids, dim=-1, stable=True)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    by_val = torch.argsort(values, dim=-1, descending=True, stable=True)
    return values.gather(-1, by_val), ids.gather(-1, by_val)


def _full_logsumexp(x: torch.Tensor, group) -> torch.Tensor:
    """log-sum-exp over the full (sharded) vocabulary: fp32 ``[B]`` (two all-reduces of ``[B]``)."""
    m = x.max(dim=-1).values
    if _tp_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m_safe[:, None]).sum(dim=-1)
    if _tp_size(group) > 1:
        dist.all_reduce(s, group=group)
    return m_safe + torch.log(s)


# --------------------------------------------------------------------------- the sampler


def sample_next_tokens(
    logits: torch.Tensor,
    *,
    vocab_start: int,
    sampling: SamplingConfig,
    step: int,
    sample_ids: torch.Tensor,
    positions: torch.Tensor,
    tp_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Choose one token per row; collective over ``tp_group`` (every rank gets the same ids).

    Args:
        logits: ``[B, V/tp]`` this rank's vocabulary shard (any float dtype; computed in fp32).
        vocab_start: global id of this shard's first column.
        sampling: temperature / top-k / top-p / greedy / seed.
        step: training step (part of the noise key).
        sample_ids: int64 ``[B]`` global sample index of each row.
        positions: int64 ``[B]`` index of the token being chosen within its completion.
        tp_group: tensor-parallel group (``None``: one rank holds the whole vocabulary).
        vocab_size: true vocabulary size; columns with a global id ``>= vocab_size`` (padding)
            are never chosen.

    Returns int64 ``[B]`` global token ids, on ``logits.device``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V/tp], got shape {tuple(logits.shape)}")
    b, vl = logits.shape
    dev = logits.device
    x = logits.float()
    shard_ids = torch.arange(vocab_start, vocab_start + vl, device=dev)
    if vocab_size is not None and vocab_start + vl > vocab_size:
        x = x.masked_fill(shard_ids >= vocab_size, float("-inf"))

    if sampling.greedy:
        v, i = x.max(dim=-1)  # first index of the maximum
        gv, gi = _gather_candidates(v[:, None], (i + vocab_start)[:, None], tp_group)
        return _pick_max(gv, gi)

    x = x / sampling.temperature
    keys = row_keys(sampling.seed, step, sample_ids.to(dev), positions.to(dev))
    k, p = sampling.top_k, sampling.top_p

    if k == 0 and p >= 1.0:  # plain sampling: Gumbel-max over each full shard, gather the winners
        scores = x.double() + gumbel_noise(keys, shard_ids)
        v, i = scores.max(dim=-1)
        gv, gi = _gather_candidates(v[:, None], (i + vocab_start)[:, None], tp_group)
        return _pick_max(gv, gi)

    lse_full = _full_logsumexp(x, tp_group) if k == 0 else None
    c = k if k > 0 else TOP_P_CANDIDATES
    while True:
        c_eff = min(c, vl)
        v, i = torch.topk(x, c_eff, dim=-1)
        cand_v, cand_i = _gather_candidates(v, i + vocab_start, tp_group)  # [B, tp*c_eff]
        shard_floor = cand_v.view(b, -1, c_eff)[..., -1]  # [B, tp]: each shard's last candidate
        cand_v, cand_i = _order_desc(cand_v, cand_i)
        if k > 0:
            cand_v, cand_i = cand_v[:, :k], cand_i[:, :k]
        keep = torch.ones_like(cand_v, dtype=torch.bool)
        if p < 1.0:
            lse = torch.logsumexp(cand_v, dim=-1) if k > 0 else lse_full.double()
            q = torch.exp(cand_v - lse[:, None])
            mass_before = torch.cumsum(q, dim=-1) - q
            keep = mass_before < p
            keep[:, 0] = True
        if k > 0 or c_eff >= vl:
            break
        # top-k off: exact iff every truncated shard's last candidate is below the last kept value
        last_kept = torch.where(keep, cand_v, torch.full_like(cand_v, float("inf"))).min(dim=-1).values
        if bool((shard_floor < last_kept[:, None]).all()):
            break
        c *= 4
    scores = cand_v + gumbel_noise(keys, cand_i)
    scores = scores.masked_fill(~keep | ~torch.isfinite(cand_v), float("-inf"))
    return _pick_max(scores, cand_i)
