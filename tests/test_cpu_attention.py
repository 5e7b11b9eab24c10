"""The CPU decode-attention kernel (vigos_megatron/rollout/cpu_attention.c) against float64."""

import os
import shutil

import pytest
import torch

from vigos_megatron.rollout import cpu_attention
from vigos_megatron.rollout.cached_forward import decode_attention

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")


def _operands(b, groups, per_group, d, t, columns, seed=0):
    """q ``[b, G, P, D]``; K/V views ``[b, G, t, D]`` of a ``[2, b, G, columns, D]`` cache; bias
    ``[b, 1, 1, t]`` view of a ``[b, columns]`` mask with left padding (``-inf``) per row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, groups, per_group, d, generator=g)
    kv = torch.randn(2, b, groups, columns, d, generator=g)
    mask = torch.zeros(b, columns)
    for row in range(b):
        mask[row, : (row * t) // (2 * b)] = float("-inf")  # row 0 has no padding
    return q, kv[0, :, :, :t], kv[1, :, :, :t], mask[:, None, None, :t]


def _reference(q, keys, values, bias, scale):
    scores = q.double() @ keys.double().transpose(-1, -2) * scale + bias.double()
    return torch.softmax(scores, dim=-1) @ values.double()


# (b, groups, queries per group, head dim, key columns, cache columns): every scores kernel (the
# broadcast ones for 1 / 2 / 4 queries, the tile one otherwise), tiles cut by the last column,
# more than 16 tiles (staged writes), one column, head dims of 1 to 8 vectors
SHAPES = [
    (2, 2, 4, 64, 301, 310), (3, 2, 4, 64, 37, 50), (2, 1, 2, 32, 257, 300), (1, 2, 1, 16, 600, 600),
    (4, 2, 3, 16, 100, 130), (2, 2, 8, 128, 70, 80), (1, 4, 7, 128, 33, 40), (2, 1, 16, 32, 17, 17),
    (2, 2, 1, 16, 1, 3), (2, 2, 2, 16, 9, 9),
]


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64(shape, threads, monkeypatch):
    assert cpu_attention.kernel() is not None, "the C kernel did not build (see the warning)"
    monkeypatch.setattr(cpu_attention, "PARALLEL_ELEMENTS", 0)  # split over the threads at any size
    q, keys, values, bias = _operands(*shape)
    assert cpu_attention.supports(q, keys, values, bias)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = decode_attention(q, keys, values, bias, 0.3)
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(got.double(), _reference(q, keys, values, bias, 0.3), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernel_and_the_gemm_path_agree_on_the_rounding():
    """The kernel and the batched-GEMM path (what runs off the CPU and outside the kernel's shapes)
    give the same fp32 result up to summation order."""
    q, keys, values, bias = _operands(4, 2, 4, 64, 500, 512)
    fast = decode_attention(q, keys, values, bias, 0.125)
    slow = decode_attention(q.double(), keys.double(), values.double(), bias.double(), 0.125)  # no kernel: fp64
    assert not cpu_attention.supports(q.double(), keys.double(), values.double(), bias.double())
    torch.testing.assert_close(fast.double(), slow, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["head_dim_24", "17_queries", "rows_not_contiguous", "bias_broadcast", "bf16"])
def test_other_operands_take_the_gemm_path(case):
    shapes = {"head_dim_24": (2, 2, 4, 24, 40, 40), "17_queries": (2, 1, 17, 16, 40, 40)}
    shape = shapes.get(case, (2, 2, 4, 16, 40, 40))
    q, keys, values, bias = _operands(*shape)
    if case == "rows_not_contiguous":
        keys = keys.transpose(2, 3).contiguous().transpose(2, 3)
    if case == "bias_broadcast":  # one mask row for every row of the batch
        bias = bias[:1]
    if case == "bf16":
        q, keys, values, bias = (x.to(torch.bfloat16) for x in (q, keys, values, bias))
    assert not cpu_attention.supports(q, keys, values, bias)
    got = decode_attention(q, keys, values, bias, 0.25)
    tol = 2e-2 if case == "bf16" else 1e-5
    torch.testing.assert_close(got.double(), _reference(q, keys, values, bias, 0.25), rtol=tol, atol=tol)
