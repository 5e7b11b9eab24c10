"""Every objective from hidden states equals the logits path (fp32): loss, hidden-state and weight gradients.

Run on N gloo processes (tensor-parallel group = all of them), or in-process with
``run_cases(0, 1, None)``. Each rank holds the replicated hidden states of the scored rows
``[N, H]`` and its vocabulary shard of a student and a (different) teacher output weight
``[V/tp, H]``; the logits path computes ``h @ W.T`` with autograd (its hidden gradient summed over
the group, as megatron's output layer does), the hidden path hands the loss the same tensors.
No gather on either path (the collective monitor of ``kl_parity``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from kl_parity import collective_monitor  # noqa: E402

from vigos_megatron import objectives  # noqa: E402
from vigos_megatron.losses.objectives import DistillTokens, VGSLoss, VGSTokens, global_segment_counts  # noqa: E402
from vigos_megatron.losses.scored_rows import HiddenOutput, LogitsOutput  # noqa: E402
from vigos_megatron.objectives.vgs import VGSLossConfig  # noqa: E402

V, H, N_STUDENT, N_TEACHER = 512, 24, 10, 20
#: fp32: relative error of the loss and of each gradient (norm), hidden path vs logits path
REL_TOL = 1e-5


def _inputs(size: int, rank: int):
    g = torch.Generator().manual_seed(21)
    student = torch.randn(N_STUDENT, H, generator=g)
    # teacher rows: each student row twice, perturbed (teacher row N_STUDENT + r and + r + N_STUDENT)
    hidden = torch.cat([student, student.repeat(2, 1) + torch.randn(N_TEACHER, H, generator=g) * 0.3])
    w_s = torch.randn(V, H, generator=g) * 0.4
    w_t = w_s + torch.randn(V, H, generator=g) * 0.1  # a teacher close to the student (KL ~ 0.1)
    sl = slice(rank * V // size, (rank + 1) * V // size)
    return hidden, w_s[sl].clone(), w_t[sl].clone()


def _rows(kind: str, hidden, w_s, w_t, group):
    """Leaf tensors and the row source of one path."""
    h = hidden.clone().requires_grad_()
    w = w_s.clone().requires_grad_()
    if kind == "hidden":
        return h, w, HiddenOutput(h, w, h, w_t)
    hs, ht = h[:N_STUDENT], h[N_STUDENT:].detach()
    if group is not None:  # the output layer's input: identity forward, gradient summed over TP
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        hs = copy_to_tensor_model_parallel_region(hs, group=group)
    with torch.no_grad():
        zt = ht @ w_t.t()
    return h, w, LogitsOutput(torch.cat([hs @ w.t(), zt]))


def _segmented_tokens():
    g = torch.Generator().manual_seed(3)
    n = 16
    sidx = torch.randint(0, N_STUDENT, (n,), generator=g)
    tidx = N_STUDENT + sidx + N_STUDENT * torch.randint(0, 2, (n,), generator=g)
    seg = torch.randint(0, 3, (n,), generator=g)
    return sidx, tidx, seg


def _vgs_tokens():
    pos = torch.arange(5)
    return VGSTokens(pos * 2, pos * 2 + 1, N_STUDENT + pos * 2, N_STUDENT + N_STUDENT + pos * 2 + 1)


def _losses(group):
    """``(name, loss_fn, tokens)`` of every objective (VGS both ways of the target's student row)."""
    sidx, tidx, seg = _segmented_tokens()
    out = []
    for name in ("vigos", "opsd", "opd"):
        obj = objectives.get(name)
        settings = obj.settings(temperature=1.3, clip=0.3 if name != "vigos" else 0.15)
        k = len(obj.terms)
        toks = DistillTokens(sidx, tidx, seg % k)
        fn = obj.build_loss(settings, [toks], chunk_bytes=4 * 4 * (V // 8), impl="torch", dp_group=None,
                            tp_group=group)
        out.append((name, fn, toks))
    for detach in (True, False):
        cfg = VGSLossConfig(detach_text_student_in_target=detach, adaptive_gamma=not detach, temperature=1.2,
                            lambda_lp=0.5, clip=0.3)
        out.append((f"vgs detach={detach}", VGSLoss(cfg, tp_group=group, chunk_bytes=4096), _vgs_tokens()))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor, group=None) -> float:
    num = torch.stack([(a.double() - b.double()).pow(2).sum(), b.double().pow(2).sum()])
    if group is not None:
        dist.all_reduce(num, group=group)
    return float(num[0].sqrt() / num[1].sqrt()) if num[1] > 0 else float(num[0].sqrt())


def run_cases(rank: int, size: int, group) -> list[str]:
    failures = []
    hidden, w_s, w_t = _inputs(size, rank)
    for name, fn, toks in _losses(group):
        res = {}
        for kind in ("logits", "hidden"):
            h, w, rows = _rows(kind, hidden, w_s, w_t, group)
            with collective_monitor():
                loss, n, report = fn(toks, rows)
                (loss / n).backward()
            res[kind] = (float(loss / n), h.grad, w.grad, report)
        (l0, h0, w0, r0), (l1, h1, w1, r1) = res["logits"], res["hidden"]
        errs = {"loss": abs(l1 - l0) / abs(l0), "hidden grad": _rel(h1, h0), "weight grad": _rel(w1, w0, group)}
        tag = f"tp={size} {name}"
        if not l0 > 0 or float(h0.norm()) == 0 or float(w0.norm()) == 0:
            failures.append(f"{tag}: degenerate case (loss {l0}, grads {float(h0.norm())}, {float(w0.norm())})")
        if float(h1[N_STUDENT:].abs().max()) != 0:
            failures.append(f"{tag}: teacher rows received a gradient")
        failures += [f"{tag}: {k} rel err {e:.2e}" for k, e in errs.items() if not e <= REL_TOL]
        failures += [f"{tag}: report {k} differs" for k in r0 if not torch.allclose(r0[k].double(), r1[k].double(),
                                                                                   rtol=1e-5, atol=1e-7)]
        clipped = {k: round(float(v[0] / v[1]), 2) for k, v in r0.items() if k in ("clip_fraction",)}
        print(f"{tag}: loss {l0:.4f} {clipped} " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()), flush=True)
    return failures


def main():
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    failures = run_cases(rank, size, dist.group.WORLD)
    for f in failures:
        print(f"rank {rank} FAIL {f}", flush=True)
    print(f"rank {rank}: hidden vs logits, {len(failures)} failures", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
