"""Where tensors live and how ranks talk: the ONE place that decides device and backend.

Rule of the code base: every tensor a component allocates follows the device of the model it
feeds (``model_device(model)``), and the process-group backend follows the hardware:

* CUDA present (and not forced off): one GPU per rank (``LOCAL_RANK``), NCCL, parameters on
  ``cuda:<local rank>``;
* no CUDA, or ``VIGOS_FORCE_CPU=1``: CPU tensors and gloo (the platform module's CPU mode
  adapts megatron-core's CUDA touch-points). Forcing the CPU is how multi-rank cases run on a
  machine with fewer GPUs than ranks (e.g. the TP=2 tests on a one-GPU machine).

Processes start through :mod:`vigos_megatron.startup` (``init_distributed`` for torchrun workers,
``local_model_parallel`` for one process), which asks :func:`backend` and :func:`bind_device` here.
"""

from __future__ import annotations

import os

import torch

#: set to 1/true/yes to run on CPU + gloo even where CUDA is present
FORCE_CPU_ENV = "VIGOS_FORCE_CPU"


def cpu_forced() -> bool:
    return os.environ.get(FORCE_CPU_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def use_cuda() -> bool:
    """True when this process computes on a GPU (CUDA present and not forced off)."""
    return torch.cuda.is_available() and not cpu_forced()


def backend() -> str:
    """``"nccl"`` where this process uses a GPU, ``"gloo"`` otherwise."""
    return "nccl" if use_cuda() else "gloo"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def compute_device() -> torch.device:
    """This process's device: ``cuda:<current device>`` on GPU, else ``cpu``."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bind_device() -> torch.device:
    """Select this rank's GPU (``LOCAL_RANK``) before any CUDA work; returns :func:`compute_device`."""
    if use_cuda():
        n = torch.cuda.device_count()
        lr = local_rank()
        if lr >= n:
            raise RuntimeError(
                f"LOCAL_RANK={lr} but this machine has {n} GPU(s): launch at most {n} processes per node, "
                f"or set {FORCE_CPU_ENV}=1 to run every rank on the CPU with gloo"
            )
        torch.cuda.set_device(lr)
    return compute_device()


def model_device(model) -> torch.device:
    """Device of the first parameter of ``model`` (a module or a list of model chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for m in chunks:
        for p in m.parameters():
            return p.device
    return compute_device()


def describe() -> str:
    """One line: device, backend, and whether the CPU was forced."""
    dev = compute_device()
    extra = f" ({FORCE_CPU_ENV} set)" if cpu_forced() and torch.cuda.is_available() else ""
    name = f" {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ""
    return f"device {dev}{name}, backend {backend()}{extra}"
