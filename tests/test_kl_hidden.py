"""The KL from hidden states (vigos_megatron.losses.hidden_kl) against the logits path.

* fast: every objective (ViGOS, OPSD, opd, VGS with the target's student row detached or not) from
  hidden states equals the logits path in fp32 at TP=1: loss, hidden-state and output-weight
  gradients within 1e-5 relative, the reports alike, teacher rows without gradient;
* fast: the tiling (vocabulary blocks x token chunks, online statistics) does not change the result; bf16 inputs give the fp32 result of their values; bad input names the argument;
* slow: the same at TP=2 (gloo), no gather (tests/dist/kl_hidden_parity.py).
"""

import re
import sys
from pathlib import Path

import pytest
import torch

from vigos_megatron.losses.vocab_parallel_kl import HiddenRows, LogitRows, kl_rows

DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

import kl_hidden_parity  # noqa: E402


def test_every_objective_from_hidden_equals_logits_tp1():
    assert kl_hidden_parity.run_cases(0, 1, None) == []


@pytest.mark.slow
def test_every_objective_from_hidden_equals_logits_tp2(torchrun):
    out = torchrun("kl_hidden_parity.py", 2)
    assert len(re.findall(r"hidden vs logits, 0 failures", out)) == 2


def _case(seed=0, n=9, h=16, v=300, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    wt = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    ht = torch.randn(n, h, generator=g).to(dtype)
    return hs, ws, ht, wt


def _run(hs, ws, ht, wt, chunk_bytes, reverse):
    h = hs.clone().requires_grad_()
    w = ws.clone().requires_grad_()
    idx = torch.arange(h.shape[0] - 1, -1, -1)
    kl = kl_rows(HiddenRows(h, w), [HiddenRows(ht, wt, idx), HiddenRows(ht, wt, coef=-0.5)], reverse=reverse,
                 temperature=1.4, chunk_bytes=chunk_bytes)
    (kl * torch.linspace(0.5, 2, kl.numel())).sum().backward()
    return kl.detach(), h.grad, w.grad


@pytest.mark.parametrize("reverse", [True, False, torch.tensor([True, False] * 18)], ids=["rev", "fwd", "mixed"])
def test_tiles_do_not_change_the_result(reverse):
    inputs = _case(n=36)
    whole = _run(*inputs, chunk_bytes=1 << 24, reverse=reverse)  # one tile
    tiled = _run(*inputs, chunk_bytes=4096, reverse=reverse)  # 64-row weight blocks x 16-token chunks: 5 x 3 tiles
    for a, b in zip(whole, tiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_give_the_fp32_result_of_their_values():
    """Each tile's logits are formed in fp32 from the bf16 values: the KL equals the fp32 path's on the
    same (bf16-representable) numbers. The backward runs on bf16 operands (``dz`` rounded once, as the
    logits path's bf16 output layer): gradients in bf16 within bf16's rounding of the fp32 ones."""
    bf = _case(dtype=torch.bfloat16)
    kl_b, gh_b, gw_b = _run(*bf, chunk_bytes=4096, reverse=True)
    kl_f, gh_f, gw_f = _run(*(x.float() for x in bf), chunk_bytes=4096, reverse=True)
    assert gh_b.dtype == gw_b.dtype == torch.bfloat16
    assert torch.allclose(kl_b, kl_f, rtol=1e-6, atol=1e-7)
    for got, ref in ((gh_b, gh_f), (gw_b, gw_f)):
        assert float((got.float() - ref).norm() / ref.norm()) < 1e-2  # measured 2.0e-3 / 2.5e-3


def test_low_precision_gemms_give_the_same_kl():
    """The GEMM kind of bf16 weights on CUDA (per-term GEMMs on bf16 operands with fp32 results, ``dz``
    rounded once to bf16 for the backward GEMMs), run on the CPU where its products are widened: the
    same KL as the fp32-operand kind, gradients within bf16's rounding of ``dz``."""
    from vigos_megatron.losses.hidden_kl import hidden_kl_rows

    hs, ws, ht, wt = _case(n=36, dtype=torch.bfloat16)
    rev = torch.arange(36) % 2 == 0
    out = {}
    for lp in (False, True):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        target = [HiddenRows(h.detach(), w.detach()), HiddenRows(ht, wt), HiddenRows(ht.flip(0), wt, coef=-1.0)]
        kl = hidden_kl_rows([HiddenRows(h, w)], target, reverse=rev, want_a=True, want_b=True, temperature=1.4,
                            clip=None, tp_group=None, chunk_bytes=4096, low_precision_gemms=lp)
        (kl * torch.linspace(0.5, 2, 36)).sum().backward()
        out[lp] = (kl.detach(), h.grad.float(), w.grad.float())
    (k0, gh0, gw0), (k1, gh1, gw1) = out[False], out[True]
    assert torch.allclose(k0, k1, rtol=1e-5, atol=1e-6)
    for a, b in ((gh0, gh1), (gw0, gw1)):
        assert ((a - b).norm() / b.norm()) < 1e-2


def test_rounded_logits_are_the_bf16_output_layers():
    """``loss.logits_dtype: model`` from hidden states (``HiddenRows.rounded``): a term alone with its weight
    has the bf16 output layer's logits (bf16 GEMM, result rounded), the numbers the logits path reads in that
    setting; terms sharing a weight are one bf16 GEMM on their fp32 sum rounded once. The KL equals the logits
    path fed those logits; gradients within bf16's rounding (both backward passes run on bf16 operands). The
    logits path's own ``model`` logits (each teacher row rounded, then subtracted) differ by bf16 noise."""
    hs, ws, ht, wt = _case(n=36, dtype=torch.bfloat16)
    idx = torch.arange(35, -1, -1)
    out = {}
    for path in ("hidden", "logits", "rows"):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        if path == "hidden":
            kl = kl_rows(HiddenRows(h, w, rounded=True), [HiddenRows(ht, wt, idx, rounded=True),
                                                          HiddenRows(ht, wt, coef=-0.5, rounded=True)],
                         reverse=True, temperature=1.4, chunk_bytes=4096)
        elif path == "logits":
            x = (ht[idx].float() - 0.5 * ht.float()).to(torch.bfloat16)
            kl = kl_rows(LogitRows(h @ w.t()), LogitRows(x @ wt.t()), reverse=True, temperature=1.4, impl="torch")
        else:
            zt = ht @ wt.t()
            kl = kl_rows(LogitRows(h @ w.t()), [LogitRows(zt, idx), LogitRows(zt, coef=-0.5)], reverse=True,
                         temperature=1.4, impl="torch")
        (kl * torch.linspace(0.5, 2, 36)).sum().backward()
        out[path] = (kl.detach(), h.grad.float(), w.grad.float())
    (k_h, gh_h, gw_h), (k_l, gh_l, gw_l), (k_r, _, _) = out["hidden"], out["logits"], out["rows"]
    assert torch.allclose(k_h, k_l, rtol=1e-5, atol=1e-6)
    for a, b in ((gh_h, gh_l), (gw_h, gw_l)):
        assert float((a - b).norm() / b.norm()) < 1e-2
    assert not torch.equal(k_h, k_r)  # the two roundings are different numbers
    assert torch.allclose(k_h, k_r, rtol=5e-2)
    with pytest.raises(ValueError, match="rounded: the terms of one KL call disagree"):
        kl_rows(HiddenRows(hs, ws, rounded=True), HiddenRows(ht, wt), reverse=True)


def test_bad_input_names_the_argument():
    hs, ws, ht, wt = _case()
    with pytest.raises(ValueError, match="teacher_hidden: hidden size"):
        kl_rows(HiddenRows(hs, ws), HiddenRows(ht[:, :8], wt), reverse=True)
    with pytest.raises(ValueError, match=r"teacher_hidden: weight \(299, 16\) is not \[V/tp=300"):
        kl_rows(HiddenRows(hs, ws), HiddenRows(ht, wt[:-1]), reverse=True)
    with pytest.raises(TypeError, match="mixes"):
        kl_rows(HiddenRows(hs, ws), LogitRows(ht @ wt.t()), reverse=True)
    with pytest.raises(ValueError, match="non-finite"):
        kl_rows(HiddenRows(hs.index_fill(0, torch.tensor([2]), float("nan")), ws), HiddenRows(ht, wt), reverse=True)


def test_config_takes_triton_from_hidden():
    """``impl: triton`` with ``from_hidden``: the kernels reduce each tile (tests/test_kl_triton.py runs them)."""
    from vigos_megatron.config.loss import LossConfig

    LossConfig(impl="triton", from_hidden=False).validate()
    LossConfig(impl="triton").validate()
