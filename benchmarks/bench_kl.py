"""Benchmark: vocab-parallel KL (chunked torch, fused Triton) vs the naive path (log_softmax + KL).

CPU mode (default): a table of forward+backward time and peak memory per process. Each
measurement runs in fresh processes (``torch.distributed.run``, gloo; one process
per tensor-parallel rank) so that peak-RSS readings do not mix. Peak memory is
the high-water mark of the process's resident set above what it held once its
inputs existed (``/proc/self/clear_refs`` reset), so it counts the loss's
temporaries and the returned gradient, not the inputs.

    .venv/bin/python benchmarks/bench_kl.py                 # the issue's table
    .venv/bin/python benchmarks/bench_kl.py --tokens 256 --vocab 32768 --long-tokens 0   # quick

GPU mode (``--device cuda``, one process, TP=1): chunked torch (``impl="torch"``), Triton
(``impl="triton"``) and naive (fp32 log_softmax + KL) at ``--gpu-tokens`` (default 1024 and
8192) x ``--vocab`` bf16, both directions, forward+backward: median time (CUDA events), the
bandwidth reached on the bytes that must move (read both sides in forward, read both and
write the gradient in backward: ``5 x tokens x V x 2`` bytes) as a fraction of the measured
device copy bandwidth (``y.copy_(x)``, read + write), and peak extra memory
(``max_memory_allocated`` above the inputs, and of that beyond the returned gradient).
``--block-v``/``--num-warps`` override the Triton launch parameters (tuning).

    .venv/bin/python benchmarks/bench_kl.py --device cuda
    .venv/bin/python benchmarks/bench_kl.py --device cuda --gpu-tokens 8192 --paths triton --block-v 4096 2048

``--from-hidden`` runs :mod:`bench_kl_hidden` instead: the last stage's loss from hidden states
against the loss from logits, from the same inputs (its own options; ``--from-hidden --help``).

``--device cpu`` runs the same in-process table on CPU tensors (smoke test of the harness:
small shapes; the Triton path needs ``TRITON_INTERPRET=1``; no memory columns).
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


def _naive_kl(student, teacher, tp_group, temperature=1.0, direction="forward"):
    """All-gather the vocabulary, full fp32 log-softmax, KL (what the project avoids)."""
    import torch

    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        student = gather_from_tensor_model_parallel_region(student, group=tp_group)
        teacher = gather_from_tensor_model_parallel_region(teacher, group=tp_group)
    ls = torch.log_softmax(student.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher.float() / temperature, dim=-1)
    if direction == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


# --------------------------------------------------------------------------- in-process (GPU) mode


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, reps: int) -> list[float]:
    """Seconds per call of ``fn`` (CUDA events on GPU, wall clock on CPU), after one warm-up call."""
    import torch

    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """Device copy bandwidth in bytes/s: ``y.copy_(x)`` reads and writes ``nbytes`` each."""
    import torch

    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    t = _timed(lambda: y.copy_(x), device, reps)
    return 2 * nbytes / t[len(t) // 2]


def _kl_fn(path, direction, clip, config):
    """``fn(student, teacher) -> [n]`` fp32 KL of one path."""
    import torch

    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl

    if path == "naive":
        def naive(s, t):
            kl = _naive_kl(s, t, None, direction=direction)
            return torch.where(kl > clip, torch.full_like(kl, clip), kl) if clip else kl
        return naive
    if path == "triton" and config is not None:
        from vigos_megatron.losses.triton_kl import triton_kl_rows
        from vigos_megatron.losses.vocab_parallel_kl import LogitRows

        def tuned(s, t):
            rev = torch.full((s.shape[0],), direction == "reverse", dtype=torch.bool, device=s.device)
            return triton_kl_rows([LogitRows(s)], [LogitRows(t)], reverse=rev, want_a=direction == "reverse",
                                  want_b=direction == "forward", temperature=1.0, clip=clip, config=config)
        return tuned
    impl = "torch" if path == "chunked" else "triton"
    return lambda s, t: vocab_parallel_kl(s, t, direction=direction, clip=clip, impl=impl)


def measure(path, tokens, direction, args, device, config=None) -> dict:
    """Median forward+backward time and peak extra memory of one path at ``tokens x vocab``."""
    import torch

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(tokens, args.vocab, generator=g, device=device) * 2).to(dtype).requires_grad_()
    t = (s.detach().float() + torch.randn(tokens, args.vocab, generator=g, device=device)).to(dtype)
    fn = _kl_fn(path, direction, args.clip, config)

    def step():
        s.grad = None
        fn(s, t).sum().backward()

    times = _timed(step, device, args.reps)
    peak = None
    if device.type == "cuda":
        s.grad = None
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    grad_bytes = tokens * args.vocab * s.element_size()
    del s, t
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"path": path, "tokens": tokens, "direction": direction, "time_s": times[len(times) // 2],
            "peak_bytes": peak, "grad_bytes": grad_bytes, "moved_bytes": 5 * grad_bytes}


def inprocess_main(args) -> None:
    import torch

    from vigos_megatron import platform

    platform.activate()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    configs = [None]
    if args.block_v or args.num_warps:
        from vigos_megatron.losses.triton_kl import DEFAULT_CONFIG, KernelConfig

        configs = [KernelConfig(b, w, b, w) for b in (args.block_v or [DEFAULT_CONFIG.fwd_block_v])
                   for w in (args.num_warps or [DEFAULT_CONFIG.fwd_num_warps])]
    bw = copy_bandwidth(device, args.copy_bytes, max(3, args.reps))
    rows = []
    for tokens in args.gpu_tokens:
        for direction in ("forward", "reverse"):
            for path in args.paths:
                for cfg in configs if path == "triton" else [None]:
                    r = measure(path, tokens, direction, args, device, cfg)
                    r["config"] = "" if cfg is None else f"block {cfg.fwd_block_v} warps {cfg.fwd_num_warps}"
                    rows.append(r)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    gib = 2**30
    print(f"\nforward+backward on {name}, {args.dtype} logits, vocab {args.vocab}, TP=1, clip {args.clip}, "
          f"median of {args.reps}; device copy bandwidth {bw / 1e12:.2f} TB/s (y.copy_(x), read + write)")
    print(f"{'path':<9}{'tokens':>7}{'direction':>10}{'time ms':>10}{'moved GB':>10}{'TB/s':>7}{'of copy bw':>11}"
          f"{'peak extra GiB':>16}{'beyond grad GiB':>17}  config")
    for r in rows:
        rate = r["moved_bytes"] / r["time_s"]
        mem = ("n/a", "n/a") if r["peak_bytes"] is None else (
            f"{r['peak_bytes'] / gib:.3f}", f"{(r['peak_bytes'] - r['grad_bytes']) / gib:.3f}")
        print(f"{r['path']:<9}{r['tokens']:>7}{r['direction']:>10}{r['time_s'] * 1e3:>10.2f}{r['moved_bytes'] / 1e9:>10.2f}"
              f"{rate / 1e12:>7.2f}{rate / bw:>10.1%}{mem[0]:>16}{mem[1]:>17}  {r['config']}")


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


def run_worker(script, tp: int, threads: int, worker_args: list[str], what: str, env: dict | None = None,
               mmap_each: bool = True) -> dict:
    """``script --worker *worker_args`` on ``tp`` fresh gloo processes (``env``: extra environment; ``mmap_each``:
    glibc maps every allocation above 128 KiB afresh, so freed memory leaves the RSS); rank 0's ``RESULT`` line as a
    dict."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}", str(script),
           "--worker", *worker_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, threads // tp)), **(env or {}))
    if mmap_each:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{what} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")


def launch(path, tp, tokens, args) -> dict:
    return run_worker(__file__, tp, args.threads,
                      ["--path", path, "--tokens", str(tokens), "--vocab", str(args.vocab), "--dtype", args.dtype,
                       "--reps", str(args.reps), "--chunk-bytes", str(args.chunk_bytes), "--threads", str(args.threads)],
                      f"{path} tp={tp}")


def main() -> None:
    if "--from-hidden" in sys.argv[1:]:  # the last stage's loss from hidden states vs from logits
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_kl_hidden import main as from_hidden

        from_hidden(sys.argv[1:])
        return
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
    g = p.add_argument_group("in-process mode (GPU)")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="run the in-process table on this device")
    g.add_argument("--gpu-tokens", type=int, nargs="+", default=[1024, 8192])
    g.add_argument("--paths", nargs="+", choices=["chunked", "triton", "naive"], default=["chunked", "triton", "naive"])
    g.add_argument("--clip", type=float, default=0.05, help="hard clip (<= 0: off)")
    g.add_argument("--copy-bytes", type=int, default=2 << 30, help="size of the copy-bandwidth probe")
    g.add_argument("--block-v", type=int, nargs="+", default=None, help="Triton block sizes to sweep")
    g.add_argument("--num-warps", type=int, nargs="+", default=None, help="Triton warp counts to sweep")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device is not None:
        args.clip = args.clip if args.clip > 0 else None
        inprocess_main(args)
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
