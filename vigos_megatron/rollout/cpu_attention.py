"""Decode attention on the CPU from a small C kernel (``cpu_attention.c``), built on first use.

One decode step attends ``P`` query heads of each key/value group to ``T`` cached columns::

    s = scale * q K^T + bias        ([b*G, P, T])
    a = softmax(s) V                ([b*G, P, D])

With ``P`` of 1 to 16 query heads per group (Qwen's 2 to 8), a BLAS batched GEMM has one small
dimension and reads the cache well below the copy bandwidth; the kernel loads every key and value
row once and keeps the ``P`` products of a tile in registers. fp32 only, head dim a multiple of 16
up to 256.

The C source is compiled with the system's C compiler (``$CC``, else ``cc``) at ``-O3
-march=native`` into ``$XDG_CACHE_HOME/vigos_megatron`` (default ``~/.cache``), named by the hash
of the source, the compiler's version and the CPU's flags (one file per machine type on a shared
home), written atomically (concurrent processes may build it at once). Where no compiler works,
:func:`kernel` returns ``None`` after one warning and callers use their torch path. ``ctypes``
releases the GIL during a call, so :func:`decode_attention` splits the groups over
``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> tuple[str, str] | None:
    """``(path, version line)`` of ``$CC`` or ``cc``; None without one."""
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, out.splitlines()[0] if out else cc


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vigos_megatron"


def _build() -> Path:
    """The shared library for this source, compiler and CPU (built if absent); raises on failure."""
    found = _compiler()
    if found is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'} not found or not working)")
    cc, version = found
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"cpu_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {(res.stderr or res.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (one warning) where it cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU decode attention: the C kernel is unavailable (%s); using torch's batched GEMMs", exc)
        return None
    lib.decode_attention.argtypes = [_PTR] * 6 + [_I64] * 8 + [_F32]
    lib.decode_attention.restype = ctypes.c_int
    return lib


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Threads for :func:`decode_attention`; one pool per process (``pid``: a forked child has none of
    its parent's threads)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpu-attention")


def supports(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> bool:
    """Whether :func:`decode_attention` takes these operands (see there) and the kernel is built."""
    if q.dim() != 4:
        return False
    b, g, p, d = q.shape
    t = keys.shape[2] if keys.dim() == 4 else -1
    ok = (q.device.type == "cpu" and q.dtype == keys.dtype == values.dtype == bias.dtype == torch.float32
          and not (q.requires_grad or keys.requires_grad or values.requires_grad)  # no autograd through ctypes
          and 1 <= p <= 16 and d % 16 == 0 and 16 <= d <= 256 and q.is_contiguous()
          and tuple(keys.shape) == tuple(values.shape) == (b, g, t, d) and tuple(bias.shape) == (b, 1, 1, t)
          and all(x.stride(3) == 1 and x.stride(2) == d and x.stride(0) == g * x.stride(1) for x in (keys, values))
          and keys.stride(1) == values.stride(1) and bias.stride(-1) == 1)
    return ok and kernel() is not None


#: below this many key elements a call runs on the calling thread (a pool hand-off costs more)
PARALLEL_ELEMENTS = 1 << 18


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q K^T + bias) V`` -> ``[b, G, P, D]`` (fp32, CPU; :func:`supports`).

    ``q`` ``[b, G, P, D]`` contiguous; ``keys``/``values`` ``[b, G, T, D]`` with contiguous rows of
    ``D`` and ``b``, ``G`` merging into one stride (views of the cache); ``bias`` ``[b, 1, 1, T]``
    (0 or ``-inf``, last dim contiguous). The ``b * G`` groups are split over
    ``torch.get_num_threads()`` threads, each with a ``[P, T]`` scores workspace.
    """
    b, g, p, d = q.shape
    t = keys.shape[2]
    groups = b * g
    n = min(torch.get_num_threads(), groups) if groups * t * d >= PARALLEL_ELEMENTS else 1
    cuts = [groups * k // n for k in range(n + 1)]
    work = torch.empty((n, p, t), dtype=torch.float32)
    out = torch.empty((b, g, p, d), dtype=torch.float32)
    fn = kernel().decode_attention

    def part(k: int) -> int:
        return fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), bias.data_ptr(), work[k].data_ptr(),
                  out.data_ptr(), cuts[k], cuts[k + 1], g, p, t, d, keys.stride(1), bias.stride(0), scale)

    codes = [part(0)] if n == 1 else [f.result() for f in [_pool(n, os.getpid()).submit(part, k) for k in range(n)]]
    if any(codes):
        raise ValueError(f"cpu_attention: operands outside the kernel's shapes (P={p}, D={d})")
    return out
