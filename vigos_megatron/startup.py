"""The ONE start-up point of a process: the platform adaptations, this rank's device, the default
process group and megatron-core's model-parallel groups.

* :func:`init_distributed`: a rank of a launch (torchrun's ``env://`` variables: ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``, ...) with the given TP / PP sizes;
* :func:`local_model_parallel`: one process on its own (converters, the tiny demo's self-check,
  tests, benchmarks): a one-rank group on a free local port, TP = PP = 1, torn down on exit;
* :func:`destroy_distributed`: the reverse of :func:`init_distributed`.

Where tensors live and which backend ranks use is decided in :mod:`vigos_megatron.runtime`; the
library adaptations in :mod:`vigos_megatron.platform`. Neither imports this module.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tensor_model_parallel_size: int, pipeline_model_parallel_size: int, *, seed: int, timeout_minutes: int,
           init_method: str | None, world_size: int | None, rank: int | None) -> tuple[bool, bool]:
    """Adaptations, device, default group (unless one exists) and megatron groups (unless initialised).
    Returns ``(started the default group, initialised megatron's groups)``."""
    import torch.distributed as dist

    from vigos_megatron import platform, runtime

    platform.activate()
    device = runtime.bind_device()
    own_pg = not dist.is_initialized()
    if own_pg:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if init_method is not None:
            kwargs.update(init_method=init_method, world_size=world_size, rank=rank)
        dist.init_process_group(backend=runtime.backend(), timeout=timedelta(minutes=timeout_minutes), **kwargs)
    from megatron.core import parallel_state, tensor_parallel

    own_mp = not parallel_state.is_initialized()
    if own_mp:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size,
                                                 pipeline_model_parallel_size=pipeline_model_parallel_size)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return own_pg, own_mp


def init_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, *,
                     seed: int = 1234, timeout_minutes: int = 30):
    """A rank of a launch (``env://``): see the module docstring. Returns megatron's ``parallel_state``."""
    from megatron.core import parallel_state

    _start(tensor_model_parallel_size, pipeline_model_parallel_size, seed=seed, timeout_minutes=timeout_minutes,
           init_method=None, world_size=None, rank=None)
    return parallel_state


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_model_parallel(seed: int = 1234):
    """One process with TP = PP = 1 (its own one-rank group, NCCL on a GPU, gloo on the CPU), torn down
    on exit. An existing default group (e.g. under torchrun) is reused and left alone, as are
    megatron's groups when already initialised."""
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    own_pg, own_mp = _start(1, 1, seed=seed, timeout_minutes=30, init_method=f"tcp://127.0.0.1:{_free_port()}",
                            world_size=1, rank=0)
    try:
        yield parallel_state
    finally:
        import torch.distributed as dist

        if own_mp:
            parallel_state.destroy_model_parallel()
        if own_pg:
            dist.destroy_process_group()
