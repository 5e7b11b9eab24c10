"""The fused Triton KL (``impl="triton"``): interpreter on CPU, TP=2 on gloo, compiled on a GPU.

The cases live in ``tests/dist/kl_triton_cases.py`` (see its docstring): float64 reference and
the torch implementation, both directions, temperatures, clip just above/below a token's KL,
empty selections, VGS's multi-term side with coefficients and a row selected twice, ViGOS's
per-token directions, non-contiguous layouts, dispatch and errors, fp32 and bf16.
On CPU they run in a subprocess with ``TRITON_INTERPRET=1`` (it must be set before Triton
defines the kernels), each case a test here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
INTERPRETER_ENV = {"TRITON_INTERPRET": "1"}


def _cases_module():
    spec = importlib.util.spec_from_file_location("kl_triton_cases", DIST / "kl_triton_cases.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


CASES = _cases_module()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted():
    """Run every case once under Triton's interpreter (CPU, one process); ``{case: failures}``."""
    from vigos_megatron.runtime import FORCE_CPU_ENV
    from vigos_megatron.testing.distributed import subprocess_env

    env = subprocess_env({**INTERPRETER_ENV, FORCE_CPU_ENV: "1"})
    proc = subprocess.run([sys.executable, str(DIST / "kl_triton_cases.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    results = {m[1]: json.loads(m[2]) for m in re.finditer(r"^CASE (\S+) rank=0 (.*)$", proc.stdout, re.M)}
    return results, proc.stdout[-3000:] + proc.stderr[-6000:]


@needs_triton
@pytest.mark.parametrize("name", list(CASES.CASES))
def test_triton_interpreter(interpreted, name):
    results, log = interpreted
    assert name in results, f"case {name} did not report:\n{log}"
    assert results[name] == [], "\n".join(results[name])


@needs_triton
@pytest.mark.slow
def test_triton_interpreter_tp2(torchrun):
    # every rank holds a vocabulary shard; 3 all-reduces per KL call, never an all-gather
    out = torchrun("kl_triton_cases.py", 2, "--tp", env=INTERPRETER_ENV)
    n_cases = len(CASES.tp_case_names())
    passed = re.findall(r"CASE \S+ rank=\d \[\]", out)
    assert len(passed) == 2 * n_cases, out[-5000:]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="interpreter forced in this process")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl

    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        vocab_parallel_kl(x, x, direction="forward", impl="triton")
    # auto stays on the torch implementation for CPU tensors
    assert vocab_parallel_kl(x, x, direction="forward", impl="auto").shape == (3,)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="interpreter forced in this process")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_h100(dtype):
    """Ahead-of-time compilation for sm_90 with the installed Triton (no GPU needed): catches
    type errors of the compiled path, which the interpreter does not check."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # internal API of Triton 3.x
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")
    from vigos_megatron.losses import _triton_kl_kernels as K

    def signature(fn, constexprs, extra):
        sig = {}
        for n in fn.arg_names:
            if n in constexprs:
                sig[n] = "constexpr"
            elif n[0] in "AB" and n[1:].isdigit():
                sig[n] = f"*{dtype}"
            elif n[:2] in ("IA", "IB"):
                sig[n] = "*i64"
            elif n[:2] in ("SA", "SB"):
                sig[n] = "i32"
            elif n[:2] in ("CA", "CB"):
                sig[n] = "fp32"
            else:
                sig[n] = extra[n]
        return sig

    target = GPUTarget("cuda", 90, 32)
    for cons in (dict(NA=1, NB=1, WANT_A=False, WANT_B=True, BLOCK_V=8192), dict(NA=1, NB=3, WANT_A=True, WANT_B=True, BLOCK_V=8192)):
        src = ASTSource(K.kl_stats_kernel, signature(K.kl_stats_kernel, cons, {"STATS": "*fp32", "V": "i32"}), cons)
        assert triton.compile(src, target=target, options=dict(num_warps=16)).asm["ptx"]
    extra = {"TOK": "*fp32", "REV": "*i8", "ORDER": "*i64", "ROWPTR": "*i64", "OUT": f"*{dtype}", "OUT_STRIDE": "i32",
             "COEF": "fp32", "V": "i32"}
    for side_a, mode in ((True, 0), (False, 2)):
        cons = dict(NA=1, NB=3, SIDE_A=side_a, MODE=mode, BF16_RTNE=dtype == "bf16", BLOCK_V=4096)
        src = ASTSource(K.kl_grad_kernel, signature(K.kl_grad_kernel, cons, extra), cons)
        assert triton.compile(src, target=target, options=dict(num_warps=8)).asm["ptx"]


def test_loss_config_impl():
    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron import objectives
    from vigos_megatron.config.loss import LossConfig
    from vigos_megatron.losses.objectives import DistillTokens
    from vigos_megatron.losses.vocab_parallel_kl import LogitRows, kl_rows

    assert LossConfig().impl == "auto"
    for name, impl in (("vgs", "torch"), ("vigos", "triton")):
        cfg = load_config(LossConfig, None, [f"impl={impl}", f"objective={name}", "from_hidden=false"])
        tokens = [DistillTokens(*(torch.zeros(1, dtype=torch.long),) * 3)]
        fn = objectives.get(name).build_loss(getattr(cfg, name), tokens, chunk_bytes=cfg.chunk_bytes, impl=cfg.impl,
                                             dp_group=None, tp_group=None)
        assert fn.impl == impl
    with pytest.raises(ConfigError, match="impl"):
        load_config(LossConfig, None, ["impl=cuda"])
    z = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="impl"):
        kl_rows(LogitRows(z, torch.zeros(1, dtype=torch.long)), LogitRows(z, torch.zeros(1, dtype=torch.long)),
                reverse=False, impl="fast")


# --------------------------------------------------------------------------- GPU (compiled kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [300, 20000])
def test_gpu_cases(vocab):
    """The interpreter's cases with compiled kernels on CUDA; 20000 entries take several 8192-blocks."""
    fails = {}
    for name in CASES.CASES:
        f = CASES.run_case(name, CASES.Ctx(device="cuda", vocab=vocab))
        if f:
            fails[name] = f
    assert not fails, json.dumps(fails, indent=1)[:6000]


def _full_size(tokens, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    v = 151936
    s = (torch.randn(tokens, v, device="cuda", generator=g) * 2).to(dtype)
    t = (s.float() + torch.randn(tokens, v, device="cuda", generator=g)).to(dtype)
    return s, t


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gpu_full_size_matches_torch(direction, dtype):
    """1024 tokens x 151,936 (one shard of the 7B vocabulary at TP=1): triton vs the chunked torch
    path (values and gradients) and vs float64 on 32 tokens; T = 1.3, clip at the median KL."""
    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl
    from vigos_megatron.testing.kl_reference import clipped_reference, kl_reference, kl_tolerance_ok, rel_norm_err

    s, t = _full_size(1024, dtype)
    ref_kl = kl_reference(s[:32], t[:32], direction, 1.3)
    clip = float(ref_kl.median())
    res = {}
    for impl in ("triton", "torch"):
        x = s.clone().requires_grad_()
        kl = vocab_parallel_kl(x, t, direction=direction, temperature=1.3, clip=clip, impl=impl)
        kl.sum().backward()
        res[impl] = (kl.detach(), x.grad)
    kl, grad = res["triton"]
    ok, err = kl_tolerance_ok(kl[:32], clipped_reference(ref_kl, clip))
    assert ok, f"max err vs float64 {err:.3e}"
    assert float((kl - res["torch"][0]).abs().max()) <= 1e-5 * (1 + float(kl.abs().max()))
    assert grad.dtype == dtype
    assert rel_norm_err(grad, res["torch"][1]) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
def test_gpu_extra_memory_under_256mib():
    """The issue's memory goal: forward+backward at 8192 x 151,936 bf16 allocates < 256 MiB beyond
    the inputs and the returned gradient."""
    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl

    s, t = _full_size(8192, torch.bfloat16)
    x = s.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kl = vocab_parallel_kl(x, t, direction="forward", clip=0.05, impl="triton")
    kl.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.numel() * x.grad.element_size()
    assert extra < 256 * 2**20, f"{extra / 2**20:.1f} MiB"
