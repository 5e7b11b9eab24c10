#!/usr/bin/env python
"""Check an install on one GPU: versions, a model build, one forward+backward, one KL call.

    python tools/gpu_smoke.py            # on a GPU machine (also runs on CPU, saying so)
    python tools/gpu_smoke.py --require-gpu   # exit 1 when no CUDA device is in use

Builds the tiny random Qwen2.5-VL (written to a temporary directory, no hub), in bf16 on the GPU
(fp32 on the CPU), runs one forward+backward of an image+text batch and one vocabulary-parallel
KL forward+backward at Qwen's vocabulary size, and prints what it found in a few lines.
Exit code 0 when every check passed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


def versions() -> str:
    import torch

    from vigos_megatron.models.builder import transformer_engine_available

    cuda = torch.version.cuda or "none"
    te = "usable" if transformer_engine_available() else ("installed" if _version("transformer-engine") != "absent" else "absent")
    return (f"torch {torch.__version__} (CUDA {cuda}), megatron-core {_version('megatron-core')}, "
            f"megatron-bridge {_version('megatron-bridge')}, transformers {_version('transformers')}, "
            f"triton {_version('triton')}, Transformer Engine {te}")


def model_check(tmp: Path) -> str:
    import torch

    from vigos_megatron.models.forward import chunk_forward
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.runtime import model_device, use_cuda
    from vigos_megatron.testing.tiny_qwen import image_text_batch, write_tiny_checkpoint

    hf = write_tiny_checkpoint(tmp / "tiny")
    dtype = torch.bfloat16 if use_cuda() else torch.float32
    batch = image_text_batch(hf)
    with local_model_parallel():
        t0 = time.perf_counter()
        builder = QwenVLBuilder.from_hf(hf, dtype=dtype)
        model = builder.build_from_hf(hf)[0].train()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits = chunk_forward(model, batch)
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        if use_cuda():
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        ok = all(g is not None and bool(torch.isfinite(g).all()) for g in grads) and bool(torch.isfinite(loss))
        dev = model_device(model)
    if not ok:
        raise RuntimeError("non-finite loss or a missing gradient")
    return (f"tiny Qwen2.5-VL ({builder.transformer_impl} spec, {dtype}) on {dev}: built in {build_s:.1f}s, "
            f"forward+backward {step_s * 1e3:.0f} ms, logits {tuple(logits.shape)}, {len(grads)} gradients finite")


def kl_check() -> str:
    import torch

    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl
    from vigos_megatron.runtime import compute_device, use_cuda
    from vigos_megatron.testing.kl_reference import kl_reference

    dev = compute_device()
    dtype = torch.bfloat16 if use_cuda() else torch.float32
    g = torch.Generator().manual_seed(0)
    s = torch.randn(256, 151936, generator=g).to(dtype)
    t = torch.randn(256, 151936, generator=g).to(dtype)
    ref = kl_reference(s, t, "forward")
    x = s.to(dev).requires_grad_()
    t0 = time.perf_counter()
    kl = vocab_parallel_kl(x, t.to(dev), direction="forward", clip=None)
    kl.sum().backward()
    if use_cuda():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    err = float((kl.detach().double().cpu() - ref).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"KL differs from the float64 reference by {err:.2e}")
    return f"vocab_parallel_kl 256 x 151936 {dtype} on {dev}: forward+backward {ms:.1f} ms (first call), max |err| {err:.1e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--require-gpu", action="store_true", help="fail when no CUDA device is in use")
    args = ap.parse_args()

    from vigos_megatron import runtime
    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs()  # the platform adaptations; known library warnings not shown
    print(f"[smoke] {versions()}")
    print(f"[smoke] {runtime.describe()}")
    failures = 0
    if args.require_gpu and not runtime.use_cuda():
        print("[smoke] FAIL: no CUDA device in use (--require-gpu)")
        failures += 1
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("model", lambda: model_check(Path(tmp))), ("kl", kl_check)):
            try:
                print(f"[smoke] {name}: ok: {fn()}")
            except Exception as e:  # report every check, then fail
                print(f"[smoke] {name}: FAIL: {type(e).__name__}: {e}")
                failures += 1
    print(f"[smoke] {'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
