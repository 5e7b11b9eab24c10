"""Megatron parallel state for single-process tools (converters, meta-device planning)."""

from __future__ import annotations

import contextlib
import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_model_parallel(seed: int = 1234):
    """A one-process group (:func:`vigos_megatron.runtime.backend`: NCCL on a GPU, gloo on the CPU)
    with TP=PP=1 megatron parallel state, torn down on exit.

    If a default process group already exists (e.g. under torchrun) it is reused and left alone;
    megatron parallel state is initialised only when it is not already.
    """
    import torch
    import torch.distributed as dist

    from vigos_megatron import platform, runtime

    platform.activate()
    device = runtime.bind_device()
    from megatron.core import parallel_state, tensor_parallel

    own_pg = not dist.is_initialized()
    if own_pg:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=runtime.backend(), init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0, **kwargs
        )
    own_mp = not parallel_state.is_initialized()
    if own_mp:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield parallel_state
    finally:
        if own_mp:
            parallel_state.destroy_model_parallel()
        if own_pg:
            dist.destroy_process_group()
