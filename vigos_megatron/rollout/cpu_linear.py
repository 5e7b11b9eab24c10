"""Linear layers on the CPU from a small C kernel (``cpu_linear.c``), built on first use.

``y = x W^T`` (fp32) with ``W`` ``[N, K]`` packed once per generation into panels of 32 output
columns (:func:`pack`): a decode step's product of a few rows reads every weight element once at
the memory's rate (a BLAS GEMM or oneDNN with one to eight rows reads the weights at about half of
it), and larger products (a prefill) run at the core's multiply-add rate like oneDNN's.

The C source is built on first use by :mod:`cpu_kernels` (where no compiler works, :func:`kernel`
is None and :func:`pack` returns None: callers use their torch path). :func:`linear` splits the
panels over ``torch.get_num_threads()`` threads; every output element is the same fp32 sum in
``k`` order whatever the split.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vigos_megatron.rollout import cpu_kernels
from vigos_megatron.rollout.cpu_kernels import I64, PTR

SOURCE = Path(__file__).with_name("cpu_linear.c")
#: output columns per panel (``NB`` in the C source)
PANEL = 32
#: below this many multiply-adds a call runs on the calling thread (a pool hand-off costs more)
PARALLEL_MACS = 1 << 20


def _declare(lib: ctypes.CDLL) -> None:
    lib.pack_weight.argtypes = [PTR, PTR] + [I64] * 4
    lib.pack_weight.restype = None
    lib.linear.argtypes = [PTR, PTR, PTR] + [I64] * 5
    lib.linear.restype = None


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (one warning) where it cannot be built or loaded."""
    return cpu_kernels.load(SOURCE, _declare, "oneDNN or torch for the rollout's linear layers")


@dataclass(frozen=True)
class Panels:
    """A weight ``[out_features, in_features]`` packed for :func:`linear`: ``data``
    ``[ceil(out_features / 32), in_features, 32]``, ``data[j, k, c] = W[32 j + c, k]`` (zero past the
    last row of ``W``)."""

    data: Tensor
    out_features: int
    in_features: int


def pack(weight: Tensor) -> Panels | None:
    """``weight`` ``[N, K]`` packed for :func:`linear`, or None where the kernel does not apply (not an
    fp32 CPU tensor, or no kernel)."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype != torch.float32 or kernel() is None:
        return None
    w = weight.detach().contiguous()
    n, k = w.shape
    panels = -(-n // PANEL)
    data = torch.empty((panels, k, PANEL), dtype=torch.float32)
    fn = kernel().pack_weight

    def part(j0: int, j1: int) -> int:
        fn(w.data_ptr(), data.data_ptr(), n, k, j0, j1)
        return 0

    cpu_kernels.run_split(part, panels, n * k >= PARALLEL_MACS)
    return Panels(data, n, k)


def linear(x: Tensor, panels: Panels) -> Tensor:
    """``x W^T`` -> ``[..., N]`` for ``x`` ``[..., K]`` (fp32, CPU; any layout: made contiguous)."""
    n, k = panels.out_features, panels.in_features
    if x.shape[-1] != k or x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:
        raise ValueError(f"cpu_linear: x {tuple(x.shape)} {x.dtype} on {x.device} does not fit a packed "
                         f"[{n}, {k}] fp32 weight (or needs autograd)")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    fn = kernel().linear

    def part(j0: int, j1: int) -> int:
        fn(x2.data_ptr(), panels.data.data_ptr(), y.data_ptr(), m, k, n, j0, j1)
        return 0

    cpu_kernels.run_split(part, panels.data.shape[0], m * n * k >= PARALLEL_MACS)
    return y.view(*x.shape[:-1], n)
