"""Decode attention on the CPU from a small C kernel (``cpu_attention.c``), built on first use.

One decode step attends ``P`` query heads of each key/value group to ``T`` cached columns::

    s = scale * q K^T + bias        ([b*G, P, T])
    a = softmax(s) V                ([b*G, P, D])

With ``P`` of 1 to 16 query heads per group (Qwen's 2 to 8), a BLAS batched GEMM has one small
dimension and reads the cache well below the copy bandwidth; the kernel loads every key and value
row once and keeps the ``P`` products of a tile in registers. fp32 only, head dim a multiple of 16
up to 256.

The C source is built on first use by :mod:`cpu_kernels` (the system's C compiler; where none
works, :func:`kernel` is None and callers use their torch path); :func:`decode_attention` splits
the groups over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from vigos_megatron.rollout import cpu_kernels
from vigos_megatron.rollout.cpu_kernels import F32, I64, PTR

SOURCE = Path(__file__).with_name("cpu_attention.c")


def _declare(lib: ctypes.CDLL) -> None:
    lib.decode_attention.argtypes = [PTR] * 6 + [I64] * 8 + [F32]
    lib.decode_attention.restype = ctypes.c_int


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (one warning) where it cannot be built or loaded."""
    return cpu_kernels.load(SOURCE, _declare, "torch's batched GEMMs for the decode attention")


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
    out = torch.empty((b, g, p, d), dtype=torch.float32)
    fn = kernel().decode_attention

    def part(i0: int, i1: int) -> int:
        work = torch.empty((p, t), dtype=torch.float32)  # this piece's scores
        return fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), bias.data_ptr(), work.data_ptr(),
                  out.data_ptr(), i0, i1, g, p, t, d, keys.stride(1), bias.stride(0), scale)

    if any(cpu_kernels.run_split(part, b * g, b * g * t * d >= PARALLEL_ELEMENTS)):
        raise ValueError(f"cpu_attention: operands outside the kernel's shapes (P={p}, D={d})")
    return out
