"""Benchmark: the KL from hidden states vs the KL from logits on the last stage (``bench_kl.py --from-hidden``).

Both paths start from the same inputs on each tensor-parallel rank: the student's hidden states
``[n, H]`` (trainable), two teacher rows per token ``[2, n, H]`` (frozen), the student's and the
teacher's output-weight shards ``[V/tp, H]`` (the student's trainable). The loss per token is one
reverse KL whose target sums both teacher rows (VGS's target shape: ``z_t1 - z_t2``), summed over
tokens; forward+backward, the output-weight gradient counted in every path:

* ``logits``: the output layer as megatron applies it (``h @ W.T`` in the input dtype, the student's
  hidden gradient summed over TP), ``[n, V/tp]`` logits of the three rows kept, the chunked KL;
* ``logits-fp32``: the product's logits path (``loss.from_hidden: false``, ``loss.logits_dtype:
  float32``): the output layer's fp32 accumulator, unrounded (``models.output_logits``), for the
  three rows; the same precision as ``hidden``;
* ``hidden``: :mod:`vigos_megatron.losses.hidden_kl` (recompute in backward, the product path), fp32
  logits (``loss.logits_dtype: float32``): ``logits-fp32``'s precision;
* ``hidden-model``: the same with ``loss.logits_dtype: model`` (``HiddenRows.rounded``: bf16 GEMMs,
  results rounded to bf16): ``logits``'s precision;
* ``hidden-fwd``: the alternative measured against it: the gradients formed in the forward
  (same chunks and statistics), kept until backward and scaled there by the incoming gradient.
  It cannot tile the vocabulary, so it holds an fp32 ``[V/tp, H]`` weight-gradient accumulator.

Each case is a fresh ``torch.distributed.run`` (gloo) so peak-RSS readings do not mix; peak memory
is the process's resident high-water mark above what it held once its inputs existed
(``malloc_trim``, then ``/proc/self/clear_refs``), rank 0's. By default glibc's allocator keeps its defaults
(freed tiles are reused, as a training process reuses them: the time does not count a page fault per tile,
the peak includes the heap's fragmentation); ``--malloc mmap`` maps every allocation afresh, so the peak is
the live bytes (measure time and memory in two runs).

    .venv/bin/python benchmarks/bench_kl.py --from-hidden                       # the issue's table (long)
    .venv/bin/python benchmarks/bench_kl.py --from-hidden --hidden 256 --tokens 1024 4096
    .venv/bin/python benchmarks/bench_kl.py --from-hidden --tp 1 --paths logits hidden-model logits-fp32 hidden --clock cpu
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_kl import _status, run_worker  # noqa: E402

from vigos_megatron.losses.impls import DEFAULT_CHUNK_BYTES  # noqa: E402

PATHS = ("logits", "logits-fp32", "hidden", "hidden-model", "hidden-fwd")
#: the logits path of the same logits precision as each path from hidden states
PEER = {"hidden": "logits-fp32", "hidden-model": "logits", "hidden-fwd": "logits-fp32"}


def _side_logits(groups, xs, weights, block: int):
    """A side's fp32 logits ``[c, V/tp]``, each weight widened to fp32 ``block`` rows at a time."""
    import torch

    v = weights[0].shape[0]
    out = torch.zeros(xs[0].shape[0], v)
    for grp, x in zip(groups, xs):
        for b0 in range(0, v, block):
            out[:, b0:b0 + block] += x @ weights[grp.weight][b0:b0 + block].float().t()
    return out


def _forward_grads_kl(hs, ws, ht, wt, group, chunk_bytes):
    """``hidden-fwd``: per-token reverse KL, its gradients formed chunk by chunk in the forward."""
    import torch
    import torch.distributed as dist

    from vigos_megatron.collectives import all_reduce
    from vigos_megatron.losses.hidden_kl import Group, _combined
    from vigos_megatron.losses.kl_common import kl_from_stats
    from vigos_megatron.losses.torch_kl import chunk_sums, side_grads

    class Fwd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            n, v = h.shape[0], w.shape[0]
            sides = ((Group(0, ((0, None, 1.0),)),), (Group(1, ((1, None, 1.0), (2, None, -1.0))),))
            hidden = [h, ht[0], ht[1]]
            weights = [w, wt]
            chunk = max(1, min(n, chunk_bytes // (4 * v)))
            block = max(1, chunk_bytes // (16 * w.shape[1]))
            dh = torch.zeros(h.shape, dtype=torch.float32)
            dw = torch.zeros(w.shape, dtype=torch.float32)
            kl = torch.empty(n)
            rev = torch.ones(chunk, dtype=torch.bool)
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                xs = [[_combined(g, hidden, lo, hi, 1.0) for g in side] for side in sides]
                a, b = (_side_logits(side, x, weights, block) for side, x in zip(sides, xs))
                m = all_reduce(torch.stack([a.amax(-1), b.amax(-1)], 1), group, dist.ReduceOp.MAX)
                s = all_reduce(chunk_sums(a.clone(), b.clone(), m, True, False), group, dist.ReduceOp.SUM)
                k, lse_a, lse_b = kl_from_stats(m, s, rev[: hi - lo])
                kl[lo:hi] = k
                da, _ = side_grads(a, b, lse_a, lse_b, k, rev[: hi - lo], torch.ones(hi - lo, 1), "reverse", False)
                dw.addmm_(da.t(), xs[0][0])
                for b0 in range(0, v, block):
                    dh[lo:hi].addmm_(da[:, b0:b0 + block], w[b0:b0 + block].float())
            ctx.save_for_backward(all_reduce(dh, group), dw)
            return kl

        @staticmethod
        def backward(ctx, grad):
            dh, dw = ctx.saved_tensors
            return (dh * grad[:, None]).to(hs.dtype), (dw * grad[0]).to(ws.dtype)  # uniform weight: sum()

    return Fwd.apply(hs, ws)


def _loss(path, hs, ws, ht, wt, group, chunk_bytes):
    import torch

    from vigos_megatron.losses.vocab_parallel_kl import HiddenRows, LogitRows, kl_rows

    if path in ("hidden", "hidden-model"):
        r = path == "hidden-model"
        return kl_rows(HiddenRows(hs, ws, rounded=r), [HiddenRows(ht[0], wt, rounded=r),
                                                       HiddenRows(ht[1], wt, coef=-1.0, rounded=r)],
                       reverse=True, tp_group=group, chunk_bytes=chunk_bytes)
    if path == "hidden-fwd":
        return _forward_grads_kl(hs, ws, ht, wt, group, chunk_bytes)
    if path == "logits-fp32":
        from types import SimpleNamespace

        import torch.distributed as dist

        from vigos_megatron.models.output_logits import fp32_output_logits

        def layer(w):
            return SimpleNamespace(weight=w, bias=None, sequence_parallel=False, tp_group=group or dist.group.WORLD)

        zs = fp32_output_logits(hs, layer(ws))
        with torch.no_grad():
            zt = torch.stack([fp32_output_logits(ht[0], layer(wt)), fp32_output_logits(ht[1], layer(wt))])
    else:
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        x = copy_to_tensor_model_parallel_region(hs, group=group) if group is not None else hs
        zs = x @ ws.t()
        with torch.no_grad():
            zt = ht @ wt.t()
    return kl_rows(LogitRows(zs), [LogitRows(zt[0]), LogitRows(zt[1], coef=-1.0)], reverse=True, tp_group=group,
                   chunk_bytes=chunk_bytes, impl="torch")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from vigos_megatron import platform

    platform.activate()
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD if tp > 1 else None
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab // tp
    hs = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    ht = (hs.detach().float() + 0.3 * torch.randn(2, n, h, generator=g)).to(dtype)
    ws = (torch.randn(v, h, generator=torch.Generator().manual_seed(1 + rank)) * h ** -0.5).to(dtype).requires_grad_()
    wt = (ws.detach().float() + 0.1 * h ** -0.5 * torch.randn(v, h, generator=g)).to(dtype)
    times, peak = [], 0
    for _ in range(args.reps):
        hs.grad = ws.grad = None
        dist.barrier()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the OS: the base RSS is what is live
        open("/proc/self/clear_refs", "w").write("5")
        base = _status("VmRSS")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        t0 = clock()
        kl = _loss(args.path, hs, ws, ht, wt, group, args.chunk_bytes)
        kl.sum().backward()
        times.append(clock() - t0)
        peak = max(peak, _status("VmHWM") - base)
        loss = float(kl.sum())
        del kl
    if rank == 0:
        print("RESULT " + json.dumps({"path": args.path, "tp": tp, "tokens": n, "time_s": sorted(times)[len(times) // 2],
                                       "peak_bytes": peak, "loss": loss,
                                       "grad_w_bytes": ws.grad.numel() * ws.grad.element_size(),
                                       "grad_h_bytes": hs.grad.numel() * hs.grad.element_size()}), flush=True)
    dist.destroy_process_group()


def launch(path, tp, tokens, args) -> dict:
    return run_worker(__file__, tp, args.threads,
                      ["--path", path, "--tokens", str(tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                       "--dtype", args.dtype, "--reps", str(args.reps), "--chunk-bytes", str(args.chunk_bytes),
                       "--clock", args.clock],
                      f"{path} tp={tp} tokens={tokens}",
                      # the CPU clock counts work, not OpenMP threads spinning between the many small tile ops
                      env={"OMP_WAIT_POLICY": "PASSIVE"} if args.clock == "cpu" else None,
                      mmap_each=args.malloc == "mmap")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-hidden", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="hidden", choices=PATHS)
    p.add_argument("--paths", nargs="+", default=[p for p in PATHS if p != "hidden-fwd"], choices=PATHS,
                   help="hidden-fwd: the design not chosen (an fp32 [V/tp, H] accumulator from forward to backward)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (3B-shaped: 2048)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="default: loss.chunk_bytes's")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--malloc", default="default", choices=["default", "mmap"],
                   help="mmap: glibc maps every allocation above 128 KiB afresh, so the peak RSS counts the live bytes "
                        "only (no reused heap: the time then pays a page fault per tile); default: glibc's defaults")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: rank 0's process CPU time (all its threads; OpenMP waits passive), for a machine "
                        "shared with other work")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.worker:
        args.tokens = args.tokens[0]
        worker(args)
        return
    t_start = time.perf_counter()
    rows = [launch(path, tp, n, args) for tp in args.tp for n in args.tokens for path in args.paths]
    gib = 2**30
    print(f"\nKL forward+backward from the same inputs, {args.dtype}, hidden {args.hidden}, vocab {args.vocab}, "
          f"1 student + 2 teacher rows per token, {args.threads} CPU threads total, median of {args.reps}, "
          f"{args.clock} clock, {args.malloc} malloc")
    print(f"{'path':<13}{'TP':>3}{'tokens':>7}{'time s':>9}{'x logits':>9}{'x peer':>8}{'peak GiB':>10}{'x logits':>9}"
          f"{'beyond dW GiB':>15}{'work GiB':>10}{'loss':>13}")
    by = {(r["path"], r["tp"], r["tokens"]): r for r in rows}
    for r in rows:
        base = by.get(("logits", r["tp"], r["tokens"]))
        peer = by.get((PEER.get(r["path"], ""), r["tp"], r["tokens"]))
        rel_t = f"{r['time_s'] / base['time_s']:.2f}" if base else ""
        rel_p = f"{r['time_s'] / peer['time_s']:.2f}" if peer else ""
        rel_m = f"{r['peak_bytes'] / base['peak_bytes']:.3f}" if base else ""
        print(f"{r['path']:<13}{r['tp']:>3}{r['tokens']:>7}{r['time_s']:>9.2f}{rel_t:>9}{rel_p:>8}"
              f"{r['peak_bytes'] / gib:>10.3f}{rel_m:>9}{(r['peak_bytes'] - r['grad_w_bytes']) / gib:>15.3f}"
              f"{(r['peak_bytes'] - r['grad_w_bytes'] - r['grad_h_bytes']) / gib:>10.3f}{r['loss']:>13.5e}")
    print("x peer: time over the logits path of the same logits precision (hidden: logits-fp32; hidden-model: logits); "
          "work: beyond both returned gradients (dW, dh)")
    print(f"(run time {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
