"""Build, load and run the rollout engine's C kernels for the CPU (``cpu_attention.c``, ``cpu_linear.c``).

A kernel's C source (next to this module) is compiled with the system's C compiler (``$CC``, else
``cc``; GCC: the sources use its vector extensions) at ``-O3 -march=native`` into
``$XDG_CACHE_HOME/vigos_megatron`` (default ``~/.cache``), named by the hash of the source, the
compiler's version and the CPU's flags (one file per machine type on a shared home), written
atomically (concurrent processes may build it at once). Where no compiler works, :func:`load`
returns ``None`` after one warning and callers use their torch path. ``ctypes`` releases the GIL
during a call, so :func:`run_split` runs parts of one call on ``torch.get_num_threads()`` threads.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
I64, PTR, F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


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


def build(source: Path) -> Path:
    """The shared library for ``source``, this compiler and this CPU (built if absent); raises on failure."""
    found = _compiler()
    if found is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'} not found or not working)")
    cc, version = found
    src = source.read_bytes()
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {(res.stderr or res.stdout).strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(source: Path, declare: Callable[[ctypes.CDLL], None], fallback: str) -> ctypes.CDLL | None:
    """``source``'s library with its functions' signatures set by ``declare``, or None after one
    warning (``fallback``: what runs instead) where it cannot be built or loaded. Callers cache it."""
    try:
        lib = ctypes.CDLL(str(build(source)))
        declare(lib)
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        log.warning("%s: the C kernel is unavailable (%s); using %s", source.name, exc, fallback)
        return None
    return lib


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Threads for :func:`run_split`; one pool per process (``pid``: a forked child has none of its
    parent's threads)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpu-kernel")


def run_split(part: Callable[[int, int], int], items: int, parallel: bool) -> list[int]:
    """``part(i0, i1)`` over ``[0, items)`` cut into ``n = min(torch.get_num_threads(), items)``
    contiguous pieces run on ``n`` threads (one piece on the calling thread unless ``parallel``);
    the pieces' return codes."""
    n = max(1, min(torch.get_num_threads(), items)) if parallel else 1
    cuts = [items * k // n for k in range(n + 1)]
    if n == 1:
        return [part(0, items)]
    futures = [_pool(n, os.getpid()).submit(part, cuts[k], cuts[k + 1]) for k in range(n)]
    return [f.result() for f in futures]
