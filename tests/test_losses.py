"""In-process tests of the KL kernel's input checks and of the OPSD / ViGOS / VGS objectives."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vigos_megatron import objectives
from vigos_megatron.errors import ConfigError
from vigos_megatron.losses.objectives import (
    DistillTokens,
    SegmentedDistillationLoss,
    VGSLoss,
    VGSTokens,
    check_schedule_config,
    global_segment_counts,
)
from vigos_megatron.objectives.opsd import OPSDLossConfig
from vigos_megatron.objectives.vgs import VGSLossConfig
from vigos_megatron.objectives.vigos import ViGOSLossConfig, vigos_loss
from vigos_megatron.losses.vocab_parallel_kl import LogitRows, kl_rows, vocab_parallel_kl
from vigos_megatron.testing.kl_reference import kl_reference, rel_norm_err

V = 384


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s: (s, s[:, :-1].clone()), "teacher_logits shape"),
        (lambda s: (s, s.double()), "teacher_logits: dtype"),
        (lambda s: (s, torch.empty_like(s, device="meta")), "teacher_logits: device"),
        (lambda s: (s.index_fill(0, torch.tensor([1]), float("nan")), s), "student_logits .*non-finite"),
        (lambda s: (s, s.index_fill(1, torch.tensor([3]), float("inf"))), "teacher_logits .*non-finite"),
        (lambda s: (s.long(), s.long()), "student_logits: logits must be a floating-point"),
    ],
)
def test_bad_input_names_the_argument(make, match):
    s = torch.randn(4, 6)
    a, b = make(s)
    with pytest.raises((ValueError, TypeError), match=match):
        vocab_parallel_kl(a, b, direction="forward")


def test_bad_options():
    s = torch.randn(3, 8)
    with pytest.raises(ValueError, match="direction"):
        vocab_parallel_kl(s, s, direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_kl(s, s, direction="forward", temperature=0.0)
    with pytest.raises(ValueError, match="8 vocabulary entries per rank; vocab_size=10"):
        vocab_parallel_kl(s, s, direction="forward", vocab_size=10)
    with pytest.raises(ValueError, match="selects 2 tokens, expected 3"):
        kl_rows(LogitRows(s), LogitRows(s, torch.tensor([0, 1])), reverse=True)


def test_clip_disabled_by_non_positive_value():
    s, t = torch.randn(5, V) * 3, torch.randn(5, V) * 3
    a = vocab_parallel_kl(s, t, direction="forward", clip=None)
    for c in (0.0, -1.0):
        assert torch.equal(vocab_parallel_kl(s, t, direction="forward", clip=c), a)


def test_teacher_receives_no_gradient():
    s = torch.randn(5, V, requires_grad=True)
    t = torch.randn(5, V, requires_grad=True)
    vocab_parallel_kl(s, t, direction="reverse").sum().backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.slow
def test_temporaries_bounded_by_chunk():
    """Peak memory beyond inputs and gradient stays near the chunk budget (fresh process, RSS)."""
    code = textwrap.dedent(
        """
        import torch
        from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        N, V = 2048, 32768
        s = torch.randn(N, V, dtype=torch.bfloat16).requires_grad_()
        t = torch.randn(N, V, dtype=torch.bfloat16)
        open("/proc/self/clear_refs", "w").write("5")   # reset the RSS high-water mark
        base = status("VmRSS")
        kl = vocab_parallel_kl(s, t, direction="forward", chunk_bytes=8 << 20)
        kl.sum().backward()
        print((status("VmHWM") - base) / 2**20)
        """
    )
    # glibc would otherwise keep freed 8 MiB chunks in its heap (dynamic mmap threshold)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    grad_mib = 2048 * 32768 * 2 / 2**20  # 128 MiB, the returned bf16 gradient
    # temporaries: a handful of 8 MiB fp32 chunks; a naive fp32 log-softmax of both sides is 512 MiB
    assert extra_mib < grad_mib + 12 * 8, extra_mib


# ----------------------------------------------------------------------------- objectives


def _stream(S=5, B=3, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, (1 + K) * B, V, generator=g) * 2


def _tokens(spec, R, B):
    sidx = torch.tensor([p * R + b for b, p, _, _, _ in spec], dtype=torch.int64)
    tidx = torch.tensor([q * R + B + c * B + b for b, _, c, q, _ in spec], dtype=torch.int64)
    seg = torch.tensor([x[4] for x in spec], dtype=torch.int64)
    return sidx, tidx, seg


def _vigos_reference(out, sidx, tidx, seg, cfg):
    x = out.detach().double().requires_grad_()
    flat = x.reshape(-1, V)
    lam = (cfg.lambda_perception, cfg.lambda_reasoning, cfg.lambda_reference)
    total = 0.0
    for s_id, direction in ((0, "forward"), (1, "forward"), (2, "reverse")):
        m = seg == s_id
        if m.any():
            kl = kl_reference(flat[sidx[m]], flat.detach()[tidx[m]], direction, cfg.temperature)
            if cfg.clip > 0:
                kl = torch.where(kl > cfg.clip, torch.full_like(kl, cfg.clip), kl)
            total = total + lam[s_id] * kl.mean()
    total.backward()
    return float(total), x.grad


@pytest.mark.parametrize("clip_at_median", [False, True])
@pytest.mark.parametrize("with_reference_rows", [True, False])
def test_vigos_matches_handwritten_float64(clip_at_median, with_reference_rows):
    S, B = 5, 3
    R = 4 * B
    out = _stream(S, B).requires_grad_()
    spec = [(0, 0, 0, 1, 0), (0, 1, 0, 2, 0), (0, 2, 1, 0, 1), (0, 3, 1, 1, 1), (2, 1, 1, 3, 1), (2, 2, 1, 4, 1)]
    if with_reference_rows:
        spec += [(1, p, 2, p + 0, 2) for p in range(5)]
    sidx, tidx, seg = _tokens(spec, R, B)
    clip = 0.0
    if clip_at_median:  # half the tokens above the clip, half below
        flat = out.detach().reshape(-1, V)
        rev = seg == 2
        kl_all = torch.where(rev, kl_reference(flat[sidx], flat[tidx], "reverse", 1.3), kl_reference(flat[sidx], flat[tidx], "forward", 1.3))
        clip = float(kl_all.median()) * 1.0001
    cfg = ViGOSLossConfig(temperature=1.3, clip=clip)
    fn = vigos_loss(cfg, global_segment_counts([seg], 3))
    loss, n, report = fn(DistillTokens(sidx, tidx, seg), out)
    (loss / n).backward()
    ref, ref_grad = _vigos_reference(out, sidx, tidx, seg, cfg)
    assert abs(float(loss / n) - ref) <= 1e-5 * (1 + abs(ref))
    assert rel_norm_err(out.grad, ref_grad) < 1e-4
    assert int(n) == len(spec)
    if clip:
        assert 0 < float(report["clip_fraction"][0]) < len(spec)  # both clipped and unclipped tokens
    assert float(report["kl/reference"][1]) == sum(s[4] == 2 for s in spec)  # [sum, count] per term
    assert all(v.numel() == 2 for v in report.values())  # reports hold scalars, never logits


def test_vigos_split_over_microbatches_equals_whole():
    """Two micro-batches with global counts == one micro-batch (megatron sums, divides by sum n)."""
    S, B = 5, 2
    R = 4 * B
    out1, out2 = _stream(S, B, seed=1), _stream(S, B, seed=2)
    spec1 = [(0, 0, 0, 1, 0), (1, 1, 2, 1, 2), (1, 2, 2, 3, 2)]
    spec2 = [(0, 3, 1, 0, 1), (1, 0, 0, 1, 0), (1, 1, 1, 2, 1), (0, 4, 1, 2, 1)]
    t1, t2 = _tokens(spec1, R, B), _tokens(spec2, R, B)
    counts = global_segment_counts([t1[2], t2[2]], 3)
    fn = vigos_loss(ViGOSLossConfig(clip=0.0), counts)
    l1, n1, _ = fn(DistillTokens(*t1), out1)
    l2, n2, _ = fn(DistillTokens(*t2), out2)
    split = float((l1 + l2) / (n1 + n2))
    # the same tokens as one micro-batch: concatenate the two streams along rows
    both = torch.cat([out1, out2], dim=1)
    R2 = 2 * R
    sidx = torch.cat([t1[0] // R * R2 + t1[0] % R, t2[0] // R * R2 + t2[0] % R + R])
    tidx = torch.cat([t1[1] // R * R2 + t1[1] % R, t2[1] // R * R2 + t2[1] % R + R])
    seg = torch.cat([t1[2], t2[2]])
    ref, _ = _vigos_reference(both, sidx, tidx, seg, ViGOSLossConfig(clip=0.0))
    assert abs(split - ref) < 1e-5


def test_opsd_is_token_mean_forward_kl():
    out = _stream(4, 2).requires_grad_()
    R, B = 8, 2
    spec = [(b, p, 0, p, 0) for b in range(2) for p in range(4)]
    sidx, tidx, seg = _tokens(spec, R, B)
    fn = SegmentedDistillationLoss(objectives.get("opsd").segments(OPSDLossConfig()), global_segment_counts([seg], 1))
    loss, n, _ = fn(DistillTokens(sidx, tidx, seg), out)
    flat = out.detach().reshape(-1, V)
    ref = kl_reference(flat[sidx], flat[tidx], "forward").mean()
    assert abs(float(loss / n) - float(ref)) < 1e-5


def test_schedule_config_check_and_builder():
    class C:
        calculate_per_token_loss = False

    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        check_schedule_config(C())
    vgs = objectives.get("vgs")
    fn = vgs.build_loss(VGSLossConfig(), [], chunk_bytes=4096, impl="torch", dp_group=None, tp_group=None)
    assert isinstance(fn, VGSLoss) and fn.impl == "torch"


# ----------------------------------------------------------------------------- VGS


def _vgs_layout(n=6, seed=0, teacher_equals_student=False, same_contexts=False):
    """Stream rows: 0 student(I,x), 1 student(x), 2 teacher(I,x), 3 teacher(x); S positions."""
    g = torch.Generator().manual_seed(seed)
    S, R = n, 4
    out = torch.randn(S, R, V, generator=g) * 2
    if same_contexts:
        out[:, 1] = out[:, 0]
        out[:, 3] = out[:, 2]
    if teacher_equals_student:
        out[:, 2] = out[:, 0]
        out[:, 3] = out[:, 1]
    pos = torch.arange(S)
    toks = VGSTokens(pos * R + 0, pos * R + 1, pos * R + 2, pos * R + 3)
    return out, toks


def _vgs_token_losses(f, toks, cfg, thresholds=None):
    """Float64 ``[n]``: ``l_std + gamma_t * l_vis + lambda * l_lp`` per token of one micro-batch (rows ``f``);
    ``thresholds``: the VDS quantiles ``(Q_lp, Q_low, Q_high)`` (default: the micro-batch's)."""
    T = cfg.temperature
    zsi, zsx, zti, ztx = f[toks.student_image_index], f[toks.student_text_index], f[toks.teacher_image_index].detach(), f[toks.teacher_text_index].detach()
    lsm = lambda z: torch.log_softmax(z / T, -1)  # noqa: E731
    l_std = (lsm(zsi).exp() * (lsm(zsi) - lsm(zti))).sum(-1)
    zsx_t = zsx.detach() if cfg.detach_text_student_in_target else zsx
    log_qstar = torch.log_softmax(lsm(zsx_t) + lsm(zti) - lsm(ztx), -1)
    l_vis = (lsm(zsi).exp() * (lsm(zsi) - log_qstar)).sum(-1)
    vds = (lsm(zti).exp() * (lsm(zti) - lsm(ztx))).sum(-1).detach()
    if thresholds is None:
        thresholds = [torch.quantile(vds, q) for q in (cfg.lp_quantile, cfg.adaptive_low_quantile,
                                                         cfg.adaptive_high_quantile)]
    sel = (vds > thresholds[0]).double()
    l_lp = sel * (lsm(zsx).exp() * (lsm(zsx) - lsm(ztx))).sum(-1)
    if cfg.adaptive_gamma:
        lo, hi = thresholds[1:]
        gamma = torch.where(vds > hi, cfg.gamma, torch.where(vds > lo, cfg.gamma / 2, 0.0))
    else:
        gamma = cfg.gamma
    return l_std + gamma * l_vis + cfg.lambda_lp * l_lp


def _vgs_reference(out, toks, cfg):
    x = out.detach().double().requires_grad_()
    loss = cfg.eta * _vgs_token_losses(x.reshape(-1, V), toks, cfg).mean()
    loss.backward()
    return float(loss), x.grad


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("detach", [True, False])
def test_vgs_matches_float64(adaptive, detach):
    cfg = VGSLossConfig(adaptive_gamma=adaptive, detach_text_student_in_target=detach, temperature=1.2, lambda_lp=0.5)
    out, toks = _vgs_layout(n=10)
    out.requires_grad_()
    loss, n, report = VGSLoss(cfg, chunk_bytes=4096)(toks, out)
    (loss / n).backward()
    ref, ref_grad = _vgs_reference(out, toks, cfg)
    assert abs(float(loss / n) - ref) <= 1e-5 * (1 + abs(ref))
    assert rel_norm_err(out.grad, ref_grad) < 1e-4
    assert int(report["vgs/lp_selected_fraction"][0]) == 3  # 10 tokens above the 0.7 quantile


def test_vgs_sequence_reduction_matches_a_hand_written_reference():
    """Two micro-batches of trajectories of unequal lengths, run as megatron does (losses summed, one
    division by the summed num_tokens): the per-trajectory mean, then the mean over trajectories."""
    cfg = VGSLossConfig(reduction="sequence", lambda_lp=0.5, adaptive_gamma=True)
    lengths = ([3, 7], [5, 1, 2])
    outs, toks = [], []
    for seed, ls in enumerate(lengths):
        out, t = _vgs_layout(n=sum(ls), seed=seed)
        t.trajectory = torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))
        outs.append(out.requires_grad_())
        toks.append(t)
    fn = objectives.get("vgs").build_loss(cfg, toks, chunk_bytes=4096, impl="torch", dp_group=None, tp_group=None)
    results = [fn(t, o) for t, o in zip(toks, outs)]
    total = sum(r[0] for r in results) / sum(int(r[1]) for r in results)
    total.backward()

    xs = [o.detach().double().requires_grad_() for o in outs]
    per_trajectory = []
    for x, t in zip(xs, toks):
        per_token = _vgs_token_losses(x.reshape(-1, V), t, cfg)
        per_trajectory += [chunk.mean() for chunk in per_token.split(torch.bincount(t.trajectory).tolist())]
    ref = cfg.eta * torch.stack(per_trajectory).mean()
    ref.backward()
    assert abs(float(total) - float(ref)) <= 1e-5 * abs(float(ref))
    for o, x in zip(outs, xs):
        assert rel_norm_err(o.grad, x.grad) < 1e-4
    # the token mean differs on these unequal lengths (the reduction is not a no-op)
    token_ref = cfg.eta * torch.cat([_vgs_token_losses(x.reshape(-1, V), t, cfg) for x, t in zip(xs, toks)]).mean()
    assert abs(float(token_ref) - float(ref)) > 1e-3 * abs(float(ref))
    with pytest.raises(ValueError, match="reduction 'sequence' needs global_counts"):
        VGSLoss(cfg)
    with pytest.raises(ConfigError, match="reduction: must be one of"):
        VGSLossConfig(reduction="trajectory").validate()


def _hand_quantile(values, q):
    """The linear-interpolation quantile of a list of floats, by hand (sorted, ``q (n - 1)``)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    return v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def test_vgs_global_quantile_scope_matches_a_hand_written_reference():
    """``quantile_scope: global``: two micro-batches of this rank and the VDS of another data-parallel rank's
    tokens (hand-made values, as its teacher pass would report them); the thresholds are the quantiles over all
    of them, the loss of the two micro-batches (summed, divided once by their tokens, as megatron does) equals
    the hand-written reference with those thresholds, and differs from the micro-batch scope."""
    from dataclasses import replace

    from vigos_megatron.losses.vds_quantiles import TeacherVDSPass, global_vds_quantiles, quantile_levels

    cfg = VGSLossConfig(quantile_scope="global", adaptive_gamma=True, lambda_lp=0.5)
    layouts = [_vgs_layout(n=n, seed=seed) for seed, n in ((0, 6), (1, 9))]
    # above all of this rank's VDS (2.4 to 5.1); 20 values: no quantile level falls on one value
    other_rank = torch.tensor([6.0, 7.5, 9.0, 12.0, 30.0])
    vgs = objectives.get("vgs")
    teacher_pass = vgs.teacher_pass(cfg, chunk_bytes=4096, impl="torch", tp_group=None)
    reports = [teacher_pass(t, o)[2] for o, t in layouts] + [{"vds": other_rank}]
    assert vgs.teacher_pass(replace(cfg, quantile_scope="micro_batch"), chunk_bytes=4096, impl="torch",
                            tp_group=None) is None and isinstance(teacher_pass, TeacherVDSPass)
    fn = vgs.build_loss(cfg, [t for _, t in layouts], chunk_bytes=4096, impl="torch", dp_group=None, tp_group=None,
                        teacher_reports=reports)

    xs = [o.detach().double().requires_grad_() for o, _ in layouts]
    lsm = lambda z: torch.log_softmax(z, -1)  # noqa: E731
    vds = []
    for x, (_, t) in zip(xs, layouts):
        f = x.detach().reshape(-1, V)
        zti, ztx = f[t.teacher_image_index], f[t.teacher_text_index]
        vds += (lsm(zti).exp() * (lsm(zti) - lsm(ztx))).sum(-1).tolist()
    hand = [_hand_quantile(vds + other_rank.tolist(), q) for q in quantile_levels(cfg)]
    assert torch.allclose(fn.thresholds.double(), torch.tensor(hand, dtype=torch.float64), rtol=1e-6, atol=1e-7)

    outs = [o.requires_grad_() for o, _ in layouts]
    results = [fn(t, o) for o, (_, t) in zip(outs, layouts)]
    total = sum(r[0] for r in results) / sum(int(r[1]) for r in results)
    total.backward()
    ref = cfg.eta * torch.cat([_vgs_token_losses(x.reshape(-1, V), t, cfg, thresholds=hand)
                               for x, (_, t) in zip(xs, layouts)]).mean()
    ref.backward()
    assert abs(float(total) - float(ref)) <= 1e-5 * abs(float(ref))
    for o, x in zip(outs, xs):
        assert rel_norm_err(o.grad, x.grad) < 1e-4
    # the other rank's larger VDS raise the thresholds: fewer of this rank's tokens are selected than per micro-batch
    selected = sum(int(r[2]["vgs/lp_selected_fraction"][0]) for r in results)
    micro = vgs.build_loss(replace(cfg, quantile_scope="micro_batch"), [t for _, t in layouts], chunk_bytes=4096,
                           impl="torch", dp_group=None, tp_group=None)
    micro_results = [micro(t, o.detach()) for o, (_, t) in zip(outs, layouts)]
    assert selected == sum(v > hand[0] for v in vds) < sum(int(r[2]["vgs/lp_selected_fraction"][0])
                                                             for r in micro_results)
    micro_total = sum(float(r[0]) for r in micro_results) / sum(int(r[1]) for r in micro_results)
    assert abs(micro_total - float(ref)) > 1e-3 * abs(float(ref))
    with pytest.raises(ValueError, match="quantile_scope 'global' needs the reports of its teacher pass"):
        vgs.build_loss(cfg, [], chunk_bytes=4096, impl="torch", dp_group=None, tp_group=None)
    with pytest.raises(ConfigError, match="quantile_scope: must be one of"):
        VGSLossConfig(quantile_scope="batch").validate()


def test_vgs_zero_when_teacher_is_student_and_contexts_equal():
    out, toks = _vgs_layout(teacher_equals_student=True, same_contexts=True)
    out.requires_grad_()
    for detach in (True, False):
        out.grad = None
        loss, n, _ = VGSLoss(VGSLossConfig(detach_text_student_in_target=detach))(toks, out)
        loss.backward()
        assert abs(float(loss)) < 1e-5
        assert float(out.grad.abs().max()) < 1e-6


def test_vgs_nonzero_when_teacher_differs():
    out, toks = _vgs_layout(teacher_equals_student=False)
    out.requires_grad_()
    loss, _, _ = VGSLoss(VGSLossConfig())(toks, out)
    loss.backward()
    assert float(loss) > 1e-2 and float(out.grad.abs().max()) > 1e-4
