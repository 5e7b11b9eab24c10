"""Running real multi-process cases from tests, benchmarks and demos.

Launcher side: :func:`run_torchrun` starts ``python -m torch.distributed.run
--standalone --nproc_per_node=N script args...`` in a subprocess, keeping the caller's
environment (``PYTHONPATH`` included), and raises with the captured output when it fails.
By default it forces every rank onto the CPU with gloo (``VIGOS_FORCE_CPU=1``), so multi-rank
cases run the same on a CPU machine and on a machine with fewer GPUs than ranks.
Worker side: :func:`init_gloo` = :func:`vigos_megatron.startup.init_distributed` (the backend
follows the hardware and the forced-CPU setting).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vigos_megatron.runtime import FORCE_CPU_ENV


def subprocess_env(extra: dict | None = None) -> dict:
    """The caller's environment plus the repository root on ``PYTHONPATH`` (never dropped) and offline HF."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = str(Path(__file__).resolve().parents[2])
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    if extra:
        env.update(extra)
    return env


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600, env: dict | None = None,
                 force_cpu: bool = True) -> str:
    """Run ``script`` on ``nproc`` processes; return their output or raise with it.

    Each rank writes its stdout and stderr to its own files (torchrun's ``--redirects 3``), so
    lines of different ranks never interleave; the returned text is torchrun's own output, then
    rank 0's stdout and stderr, then rank 1's, and so on. ``force_cpu=False`` lets the ranks use
    GPUs (NCCL) where there are enough of them.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as logs:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--log-dir={logs}",
            "--redirects=3",
            str(script),
            *map(str, args),
        ]
        full_env = subprocess_env({FORCE_CPU_ENV: "1"} if force_cpu else None)
        if env:
            full_env.update(env)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
        out = proc.stdout + proc.stderr + rank_output(Path(logs), nproc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-20000:]}")
    return out


def rank_output(log_dir: Path, nproc: int) -> str:
    """The per-rank stdout / stderr files under torchrun's ``log_dir``, rank by rank (last attempt)."""
    parts = []
    for rank in range(nproc):
        for stream in ("stdout", "stderr"):
            files = sorted(log_dir.glob(f"*/attempt_*/{rank}/{stream}.log"))
            if files:
                parts.append(files[-1].read_text(errors="replace"))
    return "".join(parts)


def init_gloo(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234):
    """Worker-side: default group + platform adaptations + megatron parallel state (see module doc)."""
    from vigos_megatron.startup import init_distributed

    return init_distributed(tensor_model_parallel_size, pipeline_model_parallel_size, seed=seed)


def destroy():
    from vigos_megatron.startup import destroy_distributed

    destroy_distributed()
