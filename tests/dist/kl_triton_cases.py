"""The Triton KL (``impl="triton"``) vs the float64 reference and the torch implementation.

One set of cases, three ways to run it:

* ``python kl_triton_cases.py`` with ``TRITON_INTERPRET=1`` (set before triton is imported):
  Triton's interpreter on CPU tensors, one process, TP=1; prints ``CASE <name> <json failures>``;
* ``torchrun --nproc_per_node=2 kl_triton_cases.py --tp`` (gloo, interpreter): every rank holds
  a vocabulary shard and compares its shard of the gradients; an all-gather on the loss path
  fails, and exactly 3 all-reduces (shard check, MAX, SUM) must happen per KL call;
* ``run_case(name, Ctx(device="cuda"))`` in-process on a GPU (compiled kernels).

Each case returns a list of failure messages (empty: passed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vigos_megatron.losses.objectives import DistillTokens, VGSLoss, VGSTokens, global_segment_counts
from vigos_megatron.objectives.vgs import VGSLossConfig
from vigos_megatron.objectives.vigos import ViGOSLossConfig, vigos_loss
from vigos_megatron.losses.vocab_parallel_kl import HiddenRows, LogitRows, kl_rows, vocab_parallel_kl
from vigos_megatron.testing.kl_reference import clipped_reference, kl_reference, kl_tolerance_ok

V = 300  # full vocabulary of the cases (interpreter blocks of 128: several blocks and a masked tail per shard)
SHAPE = (2, 4)


def _parity_module():
    spec = importlib.util.spec_from_file_location("kl_parity", Path(__file__).with_name("kl_parity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


collective_monitor = _parity_module().collective_monitor


@dataclass
class Ctx:
    rank: int = 0
    size: int = 1
    group: object = None
    device: str = "cpu"
    vocab: int = V

    @property
    def sl(self) -> slice:
        w = self.vocab // self.size
        return slice(self.rank * w, (self.rank + 1) * w)


def _grad_rel_err(got: torch.Tensor, ref: torch.Tensor, ctx: Ctx) -> float:
    """``||got - ref|| / ||ref||`` over the whole (sharded) gradient."""
    num = torch.stack([(got.double().cpu() - ref.double().cpu()).pow(2).sum(), ref.double().cpu().pow(2).sum()])
    if ctx.size > 1:
        dist.all_reduce(num, group=ctx.group)
    return float(num[0].sqrt() / num[1].sqrt()) if float(num[1]) > 0 else float(num[0].sqrt())


def _logits(seed: int, shape=SHAPE, vocab=V):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=g) * 2.0
    t = s + torch.randn(*shape, vocab, generator=g) * 0.6
    t.view(-1, vocab)[0] = s.view(-1, vocab)[0] + 1e-3 * torch.randn(vocab, generator=g)  # a tiny-KL token
    t.view(-1, vocab)[-2] = torch.randn(vocab, generator=g) * 6.0  # a large-KL token
    return s, t


def _kl_call(ctx: Ctx, calls_expected: int, fn):
    """Run ``fn()`` under the collective monitor; return (result, failures)."""
    with collective_monitor() as calls:
        out = fn()
    fails = []
    if ctx.size > 1 and calls.count("all_reduce") != calls_expected:
        fails.append(f"expected {calls_expected} all-reduces, saw {calls}")
    return out, fails


# --------------------------------------------------------------------------- cases


def case_kl(ctx: Ctx, direction: str, temperature: float, dtype: torch.dtype) -> list[str]:
    """Both directions, temperature, clip off / just above / just below one token's KL, fp32/bf16."""
    fails = []
    s_full, t_full = _logits(11, vocab=ctx.vocab)
    s_q, t_q = s_full.to(dtype), t_full.to(dtype)
    w = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(7)).double()
    j = (1, 1)
    cj = float(kl_reference(s_q, t_q, direction, temperature)[j])
    for clip in (None, cj * (1 - 1e-4), cj * (1 + 1e-4)):
        tag = f"clip={clip}"
        s_ref = s_q.double().requires_grad_()
        ref = clipped_reference(kl_reference(s_ref, t_q.double(), direction, temperature), clip)
        (ref * w).sum().backward()
        res = {}
        for impl in ("triton", "torch"):
            x = s_q[..., ctx.sl].clone().to(ctx.device).requires_grad_()
            t_loc = t_q[..., ctx.sl].clone().to(ctx.device)

            def call():
                kl = vocab_parallel_kl(x, t_loc, direction=direction, temperature=temperature, clip=clip,
                                       tp_group=ctx.group, vocab_size=ctx.vocab, impl=impl)
                (kl * w.float().to(ctx.device)).sum().backward()
                return kl

            kl, f = _kl_call(ctx, 3, call)
            fails += [f"{tag} {impl}: {m}" for m in f]
            res[impl] = (kl.detach().cpu(), x.grad.cpu())
        kl, grad = res["triton"]
        ok, err = kl_tolerance_ok(kl, ref)
        if not ok or kl.dtype != torch.float32 or kl.shape != SHAPE:
            fails.append(f"{tag}: value max err {err:.3e} vs float64, dtype {kl.dtype}, shape {tuple(kl.shape)}")
        if grad.dtype != dtype:
            fails.append(f"{tag}: grad dtype {grad.dtype} != {dtype}")
        rel = _grad_rel_err(grad, s_ref.grad[..., ctx.sl], ctx)
        tol = 1e-4 if dtype == torch.float32 else 4e-3  # bf16: the gradient is stored in bf16
        if rel > tol:
            fails.append(f"{tag}: grad rel err {rel:.3e} > {tol} vs float64")
        if clip is not None:
            clamped = bool(kl[j] == clip) and bool(grad[j].abs().max() == 0)
            if clip < cj and not clamped:
                fails.append(f"{tag}: token just above the clip not clamped")
            if clip > cj and (bool(kl[j] == clip) or bool(grad[j].abs().max() == 0)):
                fails.append(f"{tag}: token just below the clip was clamped")
        # against the torch implementation (same math, same fp32 statistics)
        dk = float((kl - res["torch"][0]).abs().max())
        if dk > 2e-6 * (1 + float(kl.abs().max())):
            fails.append(f"{tag}: value differs from impl='torch' by {dk:.3e}")
        rel_t = _grad_rel_err(grad, res["torch"][1], ctx)
        if rel_t > (1e-5 if dtype == torch.float32 else 2e-3):
            fails.append(f"{tag}: grad differs from impl='torch' by rel {rel_t:.3e}")
    return fails


def case_empty(ctx: Ctx) -> list[str]:
    """A selection with no tokens: value ``[0]``, zero gradient (indexed), no error; all-rows of 0 rows."""
    fails = []
    s = _logits(3, vocab=ctx.vocab)[0][..., ctx.sl].clone().to(ctx.device).requires_grad_()
    empty = torch.zeros(0, dtype=torch.int64, device=ctx.device)
    kl = kl_rows(LogitRows(s, empty), LogitRows(s.detach(), empty), reverse=False, tp_group=ctx.group, impl="triton")
    kl.sum().backward()
    if kl.shape != (0,) or s.grad is None or s.grad.shape != s.shape or bool(s.grad.abs().max() != 0):
        fails.append("empty index selection misbehaves")
    z = torch.zeros(0, 3, ctx.vocab // ctx.size, device=ctx.device, requires_grad=True)
    kl = vocab_parallel_kl(z, z.detach(), direction="reverse", tp_group=ctx.group, impl="triton")
    kl.sum().backward()
    if kl.shape != (0, 3) or z.grad is None or z.grad.shape != z.shape:
        fails.append("empty logits tensor misbehaves")
    return fails


def case_multi_term(ctx: Ctx, detach: bool, dtype: torch.dtype) -> list[str]:
    """VGS's target side (3 terms, coefficients 1, 1, -1) read from one ``[R, S, V/tp]`` tensor,
    rows out of order, one student row selected twice (its gradient sums both tokens), optionally
    with gradients through the target side too; reverse KL, T = 1.3."""
    fails = []
    g = torch.Generator().manual_seed(21)
    R, S, T = 4, 5, 1.3
    full = (torch.randn(R, S, ctx.vocab, generator=g) * 1.5).to(dtype)
    si = torch.tensor([3, 7, 3, 0, 12, 18, 9])  # row 3 twice
    sx = torch.tensor([4, 8, 11, 1, 13, 19, 10])
    ti = torch.tensor([5, 15, 2, 6, 14, 16, 17])
    tx = torch.tensor([6, 16, 0, 5, 2, 17, 15])
    w = torch.randn(len(si), generator=g).double()
    # float64 reference: log_softmax is invariant to per-token constants, so the summed logits
    # z[sx] + z[ti] - z[tx] define the same target as the summed log-probabilities
    ref_in = full.double().requires_grad_()
    f = ref_in.reshape(-1, ctx.vocab)
    zsx = f[sx] if not detach else f[sx].detach()
    ref = kl_reference(f[si], zsx + f[ti].detach() - f[tx].detach(), "reverse", T)
    (ref * w).sum().backward()
    res = {}
    for impl in ("triton", "torch"):
        z = full[..., ctx.sl].clone().to(ctx.device).requires_grad_()
        zd = z.detach()
        d = {k: v.to(ctx.device) for k, v in dict(si=si, sx=sx, ti=ti, tx=tx).items()}
        target = [LogitRows(zd if detach else z, d["sx"]), LogitRows(zd, d["ti"]), LogitRows(zd, d["tx"], coef=-1.0)]

        def call():
            kl = kl_rows(LogitRows(z, d["si"]), target, reverse=True, temperature=T, tp_group=ctx.group, impl=impl)
            (kl * w.float().to(ctx.device)).sum().backward()
            return kl

        kl, fl = _kl_call(ctx, 3, call)
        fails += [f"{impl}: {m}" for m in fl]
        res[impl] = (kl.detach().cpu(), z.grad.cpu())
    kl, grad = res["triton"]
    ok, err = kl_tolerance_ok(kl, ref)
    if not ok:
        fails.append(f"value max err {err:.3e} vs float64")
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    rel = _grad_rel_err(grad, ref_in.grad[..., ctx.sl], ctx)
    if rel > tol:
        fails.append(f"grad rel err {rel:.3e} > {tol} vs float64")
    rel_t = _grad_rel_err(grad, res["torch"][1], ctx)
    if rel_t > (1e-5 if dtype == torch.float32 else 2e-3):
        fails.append(f"grad differs from impl='torch' by rel {rel_t:.3e}")
    untouched = torch.ones(R * S, dtype=torch.bool)
    untouched[si] = False
    if not detach:
        untouched[sx] = False
    if bool(grad.reshape(R * S, -1)[untouched].abs().max() != 0):
        fails.append("rows no token selects received a gradient")
    return fails


def case_both_sides_mixed(ctx: Ctx, dtype: torch.dtype) -> list[str]:
    """Gradients into BOTH sides (teacher logits requiring grad too) with per-token directions
    (a bool ``reverse [n]`` mixing forward and reverse tokens), T = 1.3, clip between the KLs:
    the backward kernel's teacher-side path with both cross terms (``SIDE_A=False``, ``MODE=2``)."""
    fails = []
    s_full, t_full = _logits(31, vocab=ctx.vocab)
    s_q, t_q = s_full.to(dtype), t_full.to(dtype)
    n = s_q.numel() // ctx.vocab
    rev = torch.zeros(n, dtype=torch.bool)
    rev[::2] = True  # alternate directions, including the tiny-KL first token (reverse)
    w = torch.randn(n, generator=torch.Generator().manual_seed(3)).double()
    T = 1.3
    s_ref = s_q.double().reshape(n, -1).requires_grad_()
    t_ref = t_q.double().reshape(n, -1).requires_grad_()
    raw = torch.where(rev, kl_reference(s_ref, t_ref, "reverse", T), kl_reference(s_ref, t_ref, "forward", T))
    clip = float(raw.detach().median()) * (1 + 1e-3)
    ref = clipped_reference(raw, clip)
    (ref * w).sum().backward()
    res = {}
    for impl in ("triton", "torch"):
        x = s_q.reshape(n, -1)[..., ctx.sl].clone().to(ctx.device).requires_grad_()
        y = t_q.reshape(n, -1)[..., ctx.sl].clone().to(ctx.device).requires_grad_()

        def call():
            kl = kl_rows(LogitRows(x), LogitRows(y), reverse=rev.to(ctx.device), temperature=T, clip=clip,
                         tp_group=ctx.group, impl=impl)
            (kl * w.float().to(ctx.device)).sum().backward()
            return kl

        kl, fl = _kl_call(ctx, 3, call)
        fails += [f"{impl}: {m}" for m in fl]
        res[impl] = (kl.detach().cpu(), x.grad.cpu(), y.grad.cpu())
    kl, gx, gy = res["triton"]
    ok, err = kl_tolerance_ok(kl, ref.detach())
    if not ok:
        fails.append(f"value max err {err:.3e} vs float64")
    n_clipped = int((kl == clip).sum())
    if not 0 < n_clipped < n:
        fails.append(f"clip should take some tokens but not all: {n_clipped} of {n}")
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    tol_t = 1e-5 if dtype == torch.float32 else 2e-3
    for side, got, ref_g, torch_g in (("student", gx, s_ref.grad, res["torch"][1]),
                                      ("teacher", gy, t_ref.grad, res["torch"][2])):
        if got.dtype != dtype:
            fails.append(f"{side} grad dtype {got.dtype} != {dtype}")
        rel = _grad_rel_err(got, ref_g[..., ctx.sl], ctx)
        if rel > tol:
            fails.append(f"{side} grad rel err {rel:.3e} > {tol} vs float64")
        rel_t = _grad_rel_err(got, torch_g, ctx)
        if rel_t > tol_t:
            fails.append(f"{side} grad differs from impl='torch' by rel {rel_t:.3e}")
    return fails


def case_objective_vigos(ctx: Ctx) -> list[str]:
    """ViGOS (forward KL on two segments, reverse on the third: per-token directions) on a stream
    ``[S, R, V/tp]``, clip on; triton vs torch and the float64 objective."""
    g = torch.Generator().manual_seed(5)
    S, B = 6, 3
    R = B * 4
    full = torch.randn(S, R, ctx.vocab, generator=g) * 1.5
    spec = [(0, 1, 1, 0, 0), (0, 2, 1, 1, 0), (0, 3, 2, 2, 1), (0, 4, 2, 3, 1),
            (1, 0, 3, 4, 2), (1, 1, 3, 5, 2), (1, 2, 3, 0, 2), (2, 2, 2, 1, 1), (2, 3, 2, 2, 1)]
    sidx = torch.tensor([p * R + b for b, p, _, _, _ in spec])
    tidx = torch.tensor([q * R + c * B + b for b, _, c, q, _ in spec])
    seg = torch.tensor([x[4] for x in spec])
    counts = global_segment_counts([seg], 3)
    flat64 = full.double().reshape(S * R, ctx.vocab)
    per_token = torch.cat([kl_reference(flat64[sidx[seg == s_id]], flat64[tidx[seg == s_id]], d)
                           for s_id, d in ((0, "forward"), (1, "forward"), (2, "reverse"))])
    cfg = ViGOSLossConfig(clip=float(per_token.median()) * (1 + 1e-3))  # clamps some tokens, not all
    res = {}
    for impl in ("triton", "torch"):
        loss_fn = vigos_loss(cfg, counts.to(ctx.device), tp_group=ctx.group, impl=impl)
        out = full[..., ctx.sl].clone().to(ctx.device).requires_grad_()
        toks = DistillTokens(sidx.to(ctx.device), tidx.to(ctx.device), seg.to(ctx.device))
        with collective_monitor():
            loss, num_tokens, report = loss_fn(toks, out)
            (loss / num_tokens).backward()
        res[impl] = (float(loss.detach() / num_tokens), out.grad.cpu(), float(report["clip_fraction"][0]))
    ref_in = full.double().requires_grad_()
    flat = ref_in.reshape(S * R, ctx.vocab)
    lam = (cfg.lambda_perception, cfg.lambda_reasoning, cfg.lambda_reference)
    ref = 0.0
    for s_id, direction in ((0, "forward"), (1, "forward"), (2, "reverse")):
        m = seg == s_id
        kl = clipped_reference(kl_reference(flat[sidx[m]], flat.detach()[tidx[m]], direction), cfg.clip)
        ref = ref + lam[s_id] * kl.mean()
    ref.backward()
    fails = []
    loss, grad, clipped = res["triton"]
    ref = ref.detach()
    if abs(loss - float(ref)) > 1e-5 * (1 + abs(float(ref))):
        fails.append(f"loss {loss} vs float64 {float(ref)}")
    rel = _grad_rel_err(grad, ref_in.grad[..., ctx.sl], ctx)
    if rel > 1e-4:
        fails.append(f"grad rel err {rel:.3e} vs float64")
    if abs(loss - res["torch"][0]) > 1e-6 * (1 + abs(loss)) or _grad_rel_err(grad, res["torch"][1], ctx) > 1e-5:
        fails.append(f"differs from impl='torch': {loss} vs {res['torch'][0]}")
    if not 0 < clipped < len(spec) or clipped != res["torch"][2]:
        fails.append(f"clip inactive or different from torch ({clipped} vs {res['torch'][2]} clipped tokens)")
    return fails


def case_objective_vgs(ctx: Ctx) -> list[str]:
    """VGS (multi-term target, VDS without grad, an LP subset) triton vs torch, adaptive gamma, T != 1."""
    g = torch.Generator().manual_seed(8)
    S, R = 6, 4
    full = torch.randn(S, R, ctx.vocab, generator=g) * 2
    pos = torch.arange(S)
    fails = []
    for detach in (True, False):
        cfg = VGSLossConfig(adaptive_gamma=True, detach_text_student_in_target=detach, temperature=1.2, lambda_lp=0.5)
        res = {}
        for impl in ("triton", "torch"):
            out = full[..., ctx.sl].clone().to(ctx.device).requires_grad_()
            toks = VGSTokens(*(x.to(ctx.device) for x in (pos * R, pos * R + 1, pos * R + 2, pos * R + 3)))
            with collective_monitor():
                loss, n, _ = VGSLoss(cfg, tp_group=ctx.group, impl=impl)(toks, out)
                (loss / n).backward()
            res[impl] = (float(loss.detach() / n), out.grad.cpu())
        (l_tr, g_tr), (l_to, g_to) = res["triton"], res["torch"]
        rel = _grad_rel_err(g_tr, g_to, ctx)
        if abs(l_tr - l_to) > 2e-6 * (1 + abs(l_to)) or rel > 1e-5:
            fails.append(f"detach={detach}: loss {l_tr} vs torch {l_to}, grad rel {rel:.3e}")
    return fails


def case_hidden(ctx: Ctx, dtype: torch.dtype) -> list[str]:
    """The KL from hidden states with each tile reduced by the kernels equals the torch tiles: VGS's
    three-term target (a detached student row, two teacher rows with coefficients 1, -1), per-token
    directions, T != 1, a clip inside the range, several vocabulary blocks and token chunks per shard;
    at TP=2 four all-reduces (shard check, MAX, SUM, the hidden gradient's SUM), never a gather."""
    g = torch.Generator().manual_seed(12)
    n, h = 20, 12
    hs_full = torch.randn(n, h, generator=g).to(dtype)
    ht_full = (hs_full.float().repeat(2, 1) + 0.5 * torch.randn(2 * n, h, generator=g)).to(dtype)
    ws_full = (torch.randn(ctx.vocab, h, generator=g) * 0.6).to(dtype)
    wt_full = (ws_full.float() + 0.2 * torch.randn(ctx.vocab, h, generator=g)).to(dtype)
    rev = torch.arange(n, device=ctx.device) % 3 != 0
    i1 = torch.arange(n, device=ctx.device)
    i2 = i1 + n
    res, fails = {}, []
    for impl in ("triton", "torch"):
        hs = hs_full.clone().to(ctx.device).requires_grad_()
        ws = ws_full[ctx.sl].clone().to(ctx.device).requires_grad_()
        ht, wt = ht_full.to(ctx.device), wt_full[ctx.sl].clone().to(ctx.device)

        def call():
            target = [HiddenRows(hs.detach(), ws.detach()), HiddenRows(ht, wt, i1), HiddenRows(ht, wt, i2, coef=-1.0)]
            kl = kl_rows(HiddenRows(hs, ws), target, reverse=rev, temperature=1.3, clip=0.9, tp_group=ctx.group,
                         vocab_size=ctx.vocab, chunk_bytes=2048, impl=impl)
            (kl * torch.linspace(0.5, 2.0, n, device=ctx.device)).sum().backward()
            return kl

        kl, f = _kl_call(ctx, 4, call)
        fails += [f"{impl}: {m}" for m in f]
        res[impl] = (kl.detach().cpu(), hs.grad.cpu(), ws.grad.cpu())
    (k_tr, gh_tr, gw_tr), (k_to, gh_to, gw_to) = res["triton"], res["torch"]
    if not 0 < int((k_to == 0.9).sum()) < n:
        fails.append(f"the clip at 0.9 should cut some tokens, not all: {k_to.tolist()}")
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: gradients are returned in bf16
    if (k_tr - k_to).abs().max() > 1e-5 * (1 + k_to.abs().max()):
        fails.append(f"KL differs from the torch tiles: {(k_tr - k_to).abs().max():.3e}")
    for name, a, b in (("hidden grad", gh_tr, gh_to), ("weight grad", gw_tr, gw_to)):
        rel = _grad_rel_err(a, b, ctx)
        if rel > tol or a.dtype != dtype:
            fails.append(f"{name}: rel err {rel:.3e} > {tol} vs the torch tiles (dtype {a.dtype})")
    return fails


def case_layouts(ctx: Ctx) -> list[str]:
    """A non-contiguous ``[S, R, V/tp]`` view (megatron's sequence-first output transposed) and a
    strided vocabulary slice give the torch implementation's values and gradients."""
    fails = []
    g = torch.Generator().manual_seed(13)
    base = torch.randn(5, 3, ctx.vocab, generator=g)
    tb = torch.randn(5, 3, 2 * ctx.vocab, generator=g)
    res = {}
    for impl in ("triton", "torch"):
        x = base[..., ctx.sl].clone().to(ctx.device).requires_grad_()
        t = tb.to(ctx.device)[..., ::2][..., ctx.sl]  # vocabulary stride 2
        kl = vocab_parallel_kl(x.transpose(0, 1), t.transpose(0, 1), direction="forward",
                               temperature=0.8, tp_group=ctx.group, impl=impl)
        kl.sum().backward()
        res[impl] = (kl.detach().cpu(), x.grad.cpu())
    if float((res["triton"][0] - res["torch"][0]).abs().max()) > 1e-5 or _grad_rel_err(res["triton"][1], res["torch"][1], ctx) > 1e-5:
        fails.append("transposed [S, R, V] view differs from impl='torch'")
    return fails


def case_dispatch(ctx: Ctx) -> list[str]:
    """``auto`` takes torch for CPU tensors, ``triton`` the kernels; bad values raise clearly."""
    import vigos_megatron.losses.triton_kl as tk

    fails = []
    calls = []
    orig = tk.triton_kl_rows
    tk.triton_kl_rows = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        x = torch.randn(3, ctx.vocab // ctx.size, device=ctx.device)
        vocab_parallel_kl(x, x + 1e-2, direction="forward", tp_group=ctx.group, impl="auto")
        if x.device.type == "cpu" and calls:
            fails.append("impl='auto' took the Triton kernels for CPU tensors")
        if x.device.type == "cuda" and not calls:
            fails.append("impl='auto' did not take the Triton kernels for CUDA tensors")
        n = len(calls)
        vocab_parallel_kl(x, x + 1e-2, direction="forward", tp_group=ctx.group, impl="triton")
        if len(calls) != n + 1:
            fails.append("impl='triton' did not run the Triton kernels")
    finally:
        tk.triton_kl_rows = orig
    for bad, exc, match in (
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(impl="triton", teacher=[LogitRows(x)] * 5), ValueError, "at most 4 LogitRows terms"),
    ):
        teacher = bad.pop("teacher", LogitRows(x))
        try:
            kl_rows(LogitRows(x), teacher, reverse=False, tp_group=ctx.group, **bad)
            fails.append(f"{bad}: no error")
        except exc as e:
            if match not in str(e):
                fails.append(f"{bad}: unclear error {e}")
    # more terms than the kernels take: auto quietly uses torch
    kl_rows(LogitRows(x), [LogitRows(x)] * 5, reverse=False, tp_group=ctx.group, impl="auto")
    return fails


def case_errors(ctx: Ctx) -> list[str]:
    fails = []
    x = torch.randn(4, ctx.vocab // ctx.size, device=ctx.device)
    bad = x.clone()
    bad[1, 3] = float("nan")
    try:
        vocab_parallel_kl(bad, x, direction="forward", tp_group=ctx.group, impl="triton")
        fails.append("nan in the student logits accepted")
    except ValueError as e:
        if "student_logits" not in str(e):
            fails.append(f"non-finite: unclear error {e}")
    try:
        kl_rows(LogitRows(x, torch.tensor([0, 4], device=ctx.device)), LogitRows(x, torch.tensor([1, 2], device=ctx.device)),
                reverse=True, tp_group=ctx.group, impl="triton")
        fails.append("out-of-range index accepted")
    except IndexError as e:
        if "student_logits" not in str(e) or "[0, 4)" not in str(e):
            fails.append(f"out-of-range index: unclear error {e}")
    return fails


def _kl_cases():
    out = {}
    for direction in ("forward", "reverse"):
        for temperature in (1.0, 1.7):
            for dtype in (torch.float32, torch.bfloat16):
                name = f"kl-{direction}-T{temperature}-{str(dtype).split('.')[-1]}"
                out[name] = (lambda ctx, d=direction, t=temperature, dt=dtype: case_kl(ctx, d, t, dt))
    return out


CASES = {
    **_kl_cases(),
    "empty": case_empty,
    **{f"multi_term-detach{d}-{str(dt).split('.')[-1]}": (lambda ctx, d=d, dt=dt: case_multi_term(ctx, d, dt))
       for d in (True, False) for dt in (torch.float32, torch.bfloat16)},
    **{f"both_sides_mixed-{str(dt).split('.')[-1]}": (lambda ctx, dt=dt: case_both_sides_mixed(ctx, dt))
       for dt in (torch.float32, torch.bfloat16)},
    "objective_vigos": case_objective_vigos,
    "objective_vgs": case_objective_vgs,
    **{f"hidden-{str(dt).split('.')[-1]}": (lambda ctx, dt=dt: case_hidden(ctx, dt)) for dt in (torch.float32, torch.bfloat16)},
    "layouts": case_layouts,
    "dispatch": case_dispatch,
    "errors": case_errors,
}


def tp_case_names() -> list[str]:
    """The cases the TP=2 run repeats: the sharded ones (T = 1 and layout/error handling stay at TP=1)."""
    return [n for n in CASES if n not in ("dispatch", "layouts", "errors") and "-T1.0-" not in n]


def run_case(name: str, ctx: Ctx) -> list[str]:
    try:
        return CASES[name](ctx)
    except Exception as e:  # a crash is a failure of this case, reported with its type
        import traceback

        return [f"raised {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"]


def main() -> None:
    if "--tp" in sys.argv:
        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        ctx = Ctx(rank, size, dist.group.WORLD)
        names = tp_case_names() if size > 1 else list(CASES)
    else:
        ctx = Ctx()
        names = list(CASES)
    n_fail = 0
    for name in names:
        fails = run_case(name, ctx)
        n_fail += bool(fails)
        print(f"CASE {name} rank={ctx.rank} {json.dumps(fails)}", flush=True)
    if ctx.size > 1:
        flag = torch.tensor([n_fail])
        dist.all_reduce(flag)
        n_fail = int(flag)
        dist.destroy_process_group()
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
