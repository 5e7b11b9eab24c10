"""Vocab-parallel KL and the ViGOS objective vs an independent float64 reference.

Run on N gloo processes (tensor-parallel group = all of them), or in-process with
``run_cases(0, 1, None)``. Every collective of the loss path is recorded; an
all-gather (or gather) during the loss fails the run.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from vigos_megatron.losses.objectives import DistillTokens, global_segment_counts
from vigos_megatron.objectives.vigos import ViGOSLossConfig, vigos_loss
from vigos_megatron.losses.vocab_parallel_kl import LogitRows, kl_rows, vocab_parallel_kl
from vigos_megatron.testing.kl_reference import clipped_reference, kl_reference, kl_tolerance_ok

V = 1024
SHAPE = (2, 9)
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_object", "_all_gather_base", "gather", "all_gather_coalesced")


@contextlib.contextmanager
def collective_monitor():
    """Record collectives; any gather raises immediately (test instrumentation only)."""
    calls = []
    saved = {}

    def forbid(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called on the loss path")

        return f

    def count(name, fn):
        def f(*a, **k):
            calls.append(name)
            return fn(*a, **k)

        return f

    for name in GATHERS:
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)
            setattr(dist, name, forbid(name))
    saved["all_reduce"] = dist.all_reduce
    dist.all_reduce = count("all_reduce", saved["all_reduce"])
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _logits(seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*SHAPE, V, generator=g) * 2.0
    t = s + torch.randn(*SHAPE, V, generator=g) * 0.6
    t[0, 0] = s[0, 0] + 1e-3 * torch.randn(V, generator=g)  # a tiny-KL token
    t[1, 3] = torch.randn(V, generator=g) * 6.0  # a large-KL token
    return s, t


def _allreduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def run_cases(rank: int, size: int, group) -> list[str]:
    failures: list[str] = []
    sl = slice(rank * V // size, (rank + 1) * V // size)
    w = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(7)).double()
    n_cases = 0
    for direction in ("forward", "reverse"):
        for temperature in (1.0, 1.7):
            s_full, t_full = _logits(11)
            j = (1, 1)
            for dtype in (torch.float32, torch.bfloat16):
                s_q = s_full.to(dtype)
                t_q = t_full.to(dtype)
                cj = float(kl_reference(s_q, t_q, direction, temperature)[j])
                # None: off; cj*(1-1e-4): token j just above the clip; cj*(1+1e-4): just below
                for clip in (None, cj * (1 - 1e-4), cj * (1 + 1e-4)):
                    n_cases += 1
                    s_ref = s_q.double().requires_grad_()
                    ref = clipped_reference(kl_reference(s_ref, t_q.double(), direction, temperature), clip)
                    (ref * w).sum().backward()
                    s_loc = s_q[..., sl].clone().requires_grad_()
                    with collective_monitor() as calls:
                        kl = vocab_parallel_kl(
                            s_loc, t_q[..., sl].clone(), direction=direction, temperature=temperature,
                            clip=clip, tp_group=group, vocab_size=V, chunk_bytes=4 * (V // size) * 4,
                        )
                        (kl * w.float()).sum().backward()
                    tag = f"tp={size} {direction} T={temperature} clip={clip} {dtype}"
                    if size > 1 and calls.count("all_reduce") != 3:
                        failures.append(f"{tag}: expected 3 all-reduces (shard check, max, sum), saw {calls}")
                    ok, err = kl_tolerance_ok(kl, ref)
                    if not ok or kl.dtype != torch.float32 or kl.shape != SHAPE:
                        failures.append(f"{tag}: value max err {err:.3e} dtype {kl.dtype} shape {tuple(kl.shape)}")
                    if clip is not None:
                        above = bool(kl[j] == clip) and bool(s_loc.grad[j].abs().max() == 0)
                        if clip < cj and not above:
                            failures.append(f"{tag}: token just above the clip not clamped")
                        if clip > cj and (bool(kl[j] == clip) or bool(s_loc.grad[j].abs().max() == 0)):
                            failures.append(f"{tag}: token just below the clip was clamped")
                    if s_loc.grad.dtype != dtype:
                        failures.append(f"{tag}: grad dtype {s_loc.grad.dtype}")
                    g_ref = s_ref.grad[..., sl]
                    num = _allreduce_sum(torch.stack([(s_loc.grad.double() - g_ref).pow(2).sum(), g_ref.pow(2).sum()]), group)
                    rel = float(num[0].sqrt() / num[1].sqrt())
                    # fp32: the 1e-4; bf16: the gradient is stored in bf16 (2^-9 relative rounding)
                    tol = 1e-4 if dtype == torch.float32 else 4e-3
                    if rel > tol:
                        failures.append(f"{tag}: grad rel err {rel:.3e} > {tol}")
    # empty selection (a segment with no tokens): value [0], zero gradient, no error
    s_loc = _logits(3)[0][..., sl].clone().requires_grad_()
    empty = torch.zeros(0, dtype=torch.int64)
    kl = kl_rows(LogitRows(s_loc, empty), LogitRows(s_loc.detach(), empty), reverse=False, tp_group=group)
    kl.sum().backward()
    if kl.shape != (0,) or s_loc.grad is None or bool(s_loc.grad.abs().max() != 0):
        failures.append(f"tp={size}: empty selection misbehaves")
    failures += _objective_case(rank, size, group, sl)
    if size > 1:
        failures += _bad_shards(rank, size, group)
    print(f"rank {rank}: {n_cases} KL cases + objective + edge cases, {len(failures)} failures", flush=True)
    return failures


def _objective_case(rank, size, group, sl) -> list[str]:
    """ViGOS on a stream-shaped output [S, R, V/tp] (student rows + teacher rows)."""
    g = torch.Generator().manual_seed(5)
    S, B = 6, 3  # 3 rollouts; stream rows: 3 student + 3 teachers x 3 rollouts
    R = B * 4
    full = torch.randn(S, R, V, generator=g) * 1.5
    # supervised tokens: (student row b, pos p) -> (teacher row, pos q), segment
    spec = [  # b, p, teacher_ctx, q, seg
        (0, 1, 1, 0, 0), (0, 2, 1, 1, 0), (0, 3, 2, 2, 1), (0, 4, 2, 3, 1),  # valid rollout 0
        (1, 0, 3, 4, 2), (1, 1, 3, 5, 2), (1, 2, 3, 0, 2),  # invalid rollout 1 (reference)
        (2, 2, 2, 1, 1), (2, 3, 2, 2, 1),  # valid rollout 2 with an empty description span
    ]
    sidx = torch.tensor([p * R + b for b, p, _, _, _ in spec])
    tidx = torch.tensor([q * R + c * B + b for b, _, c, q, _ in spec])
    seg = torch.tensor([x[4] for x in spec])
    counts = global_segment_counts([seg], 3)
    cfg = ViGOSLossConfig(clip=0.0)
    loss_fn = vigos_loss(cfg, counts, tp_group=group, chunk_bytes=4096)
    out = full[..., sl].clone().requires_grad_()
    with collective_monitor():
        loss, num_tokens, report = loss_fn(DistillTokens(sidx, tidx, seg), out)
        (loss / num_tokens).backward()
    # float64 reference written out per term
    ref_in = full.double().requires_grad_()
    flat = ref_in.reshape(S * R, V)
    terms = []
    lam = (cfg.lambda_perception, cfg.lambda_reasoning, cfg.lambda_reference)
    for s_id, direction in ((0, "forward"), (1, "forward"), (2, "reverse")):
        m = seg == s_id
        kl = kl_reference(flat[sidx[m]], flat.detach()[tidx[m]], direction)
        terms.append(lam[s_id] * kl.mean())
    ref = sum(terms)
    ref.backward()
    fails = []
    if abs(float(loss / num_tokens) - float(ref)) > 1e-5 * (1 + abs(float(ref))):
        fails.append(f"tp={size} objective: {float(loss / num_tokens)} vs ref {float(ref)}")
    g_ref = ref_in.grad[..., sl]
    num = _allreduce_sum(torch.stack([(out.grad.double() - g_ref).pow(2).sum(), g_ref.pow(2).sum()]), group)
    if float(num[0].sqrt() / num[1].sqrt()) > 1e-4:
        fails.append(f"tp={size} objective grad rel err {float(num[0].sqrt() / num[1].sqrt()):.3e}")
    if int(report["kl/reference"][1]) != 3 or int(num_tokens) != len(spec):
        fails.append(f"tp={size} objective report/num_tokens wrong: {report['kl/reference']}, {num_tokens}")
    return fails


def _bad_shards(rank, size, group) -> list[str]:
    """A vocabulary split unevenly across ranks must raise on every rank (no hang)."""
    width = 5 if rank == 0 else 4
    x = torch.randn(3, width)
    try:
        vocab_parallel_kl(x, x.clone(), direction="forward", tp_group=group)
    except ValueError as e:
        if "not divisible" not in str(e):
            return [f"uneven shards: unclear error {e}"]
        return []
    return ["uneven shards were accepted"]


def main():
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    failures = run_cases(rank, size, dist.group.WORLD)
    # the monitor itself must catch a naive (all-gather) implementation
    try:
        with collective_monitor():
            parts = [torch.zeros(2) for _ in range(size)]
            dist.all_gather(parts, torch.ones(2))
        failures.append("collective monitor missed an all_gather")
    except AssertionError:
        pass
    flag = torch.tensor([len(failures)])
    dist.all_reduce(flag)
    for f in failures:
        print(f"rank {rank} FAIL: {f}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if int(flag) else 0)


if __name__ == "__main__":
    main()
