"""Running real multi-process (gloo) cases from tests, benchmarks and demos.

Launcher side: :func:`run_torchrun` starts ``python -m torch.distributed.run
--standalone --nproc_per_node=N script args...`` in a subprocess and raises with
the captured output when it fails. Worker side: :func:`init_gloo` initialises the
default process group (gloo), the platform adaptations and megatron-core's
model-parallel groups.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600, env: dict | None = None) -> str:
    """Run ``script`` on ``nproc`` gloo processes; return combined stdout+stderr or raise."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-20000:]}")
    return out


def init_gloo(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234):
    """Worker-side: gloo default group + platform adaptations + megatron parallel state."""
    import torch
    import torch.distributed as dist

    from vigos_megatron import platform

    platform.activate()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return parallel_state


def destroy():
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
