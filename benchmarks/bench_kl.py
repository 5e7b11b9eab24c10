"""Benchmark: chunked vocab-parallel KL vs the naive path (all-gather + log_softmax + KL).

Prints a table of forward+backward time and peak memory per process. Each
measurement runs in fresh processes (``torch.distributed.run``, gloo; one process
per tensor-parallel rank) so that peak-RSS readings do not mix. Peak memory is
the high-water mark of the process's resident set above what it held once its
inputs existed (``/proc/self/clear_refs`` reset), so it counts the loss's
temporaries and the returned gradient, not the inputs.

    .venv/bin/python benchmarks/bench_kl.py                 # the issue's table
    .venv/bin/python benchmarks/bench_kl.py --tokens 256 --vocab 32768 --long-tokens 0   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _naive_kl(student, teacher, tp_group, temperature=1.0):
    """All-gather the vocabulary, full log-softmax, forward KL (what the project avoids)."""
    import torch

    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        student = gather_from_tensor_model_parallel_region(student, group=tp_group)
        teacher = gather_from_tensor_model_parallel_region(teacher, group=tp_group)
    ls = torch.log_softmax(student.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from vigos_megatron import platform

    platform.activate()
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD if tp > 1 else None
    torch.set_num_threads(max(1, args.threads // tp))
    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl

    dtype = getattr(torch, args.dtype)
    v_local = args.vocab // tp
    g = torch.Generator().manual_seed(rank)
    s = torch.randn(args.tokens, v_local, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    t = torch.randn(args.tokens, v_local, generator=g, dtype=torch.float32).to(dtype)
    times = []
    peak = 0
    for _ in range(args.reps):
        s.grad = None
        dist.barrier()
        open("/proc/self/clear_refs", "w").write("5")
        base = _status("VmRSS")
        t0 = time.perf_counter()
        if args.path == "chunked":
            kl = vocab_parallel_kl(s, t, direction="forward", tp_group=group, chunk_bytes=args.chunk_bytes)
        else:
            kl = _naive_kl(s, t, group)
        kl.sum().backward()
        times.append(time.perf_counter() - t0)
        peak = max(peak, _status("VmHWM") - base)
        del kl
    times.sort()
    if rank == 0:
        print("RESULT " + json.dumps({"path": args.path, "tp": tp, "tokens": args.tokens, "vocab": args.vocab,
                                       "dtype": args.dtype, "time_s": times[len(times) // 2], "peak_bytes": peak}), flush=True)
    dist.destroy_process_group()


def launch(path, tp, tokens, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}", __file__, "--worker",
           "--path", path, "--tokens", str(tokens), "--vocab", str(args.vocab), "--dtype", args.dtype,
           "--reps", str(args.reps), "--chunk-bytes", str(args.chunk_bytes), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, args.threads // tp)),
               MALLOC_MMAP_THRESHOLD_="131072")  # freed chunks go back to the OS, so RSS is meaningful
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{path} tp={tp} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="chunked", choices=["chunked", "naive"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--long-tokens", type=int, default=8192, help="chunked-only run at TP=1 (0 skips)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-bytes", type=int, default=64 << 20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for tp in args.tp:
        naive = launch("naive", tp, args.tokens, args)
        chunked = launch("chunked", tp, args.tokens, args)
        rows.append((chunked, naive))
    long = launch("chunked", 1, args.long_tokens, argparse.Namespace(**{**vars(args), "reps": 1})) if args.long_tokens else None

    gib = 2**30
    print(f"\nforward+backward, {args.dtype} logits, vocab {args.vocab}, {args.threads} CPU threads total, median of {args.reps}")
    print(f"{'path':<10}{'TP':>4}{'tokens':>8}{'time s':>10}{'peak GiB/proc':>16}{'speed-up':>10}{'mem ratio':>11}")
    for chunked, naive in rows:
        for r in (naive, chunked):
            extra = ("", "") if r is naive else (f"{naive['time_s'] / r['time_s']:.2f}x", f"{naive['peak_bytes'] / max(1, r['peak_bytes']):.2f}x")
            print(f"{r['path']:<10}{r['tp']:>4}{r['tokens']:>8}{r['time_s']:>10.3f}{r['peak_bytes'] / gib:>16.3f}{extra[0]:>10}{extra[1]:>11}")
    if long:
        grad = long["tokens"] * long["vocab"] * (2 if args.dtype == "bfloat16" else 4)
        print(f"{'chunked':<10}{1:>4}{long['tokens']:>8}{long['time_s']:>10.3f}{long['peak_bytes'] / gib:>16.3f}"
              f"   (of which returned gradient {grad / gib:.3f} GiB; temporaries {(long['peak_bytes'] - grad) / gib:.3f} GiB)")


if __name__ == "__main__":
    main()
