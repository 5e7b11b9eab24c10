import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIST_DIR = Path(__file__).parent / "dist"


@pytest.fixture
def torchrun():
    """``torchrun(script_name, nproc, *args)``: run tests/dist/<script_name> on gloo processes."""
    from vigos_megatron.testing.distributed import run_torchrun

    def _run(script: str, nproc: int, *args, timeout: float = 600, env=None):
        return run_torchrun(DIST_DIR / script, nproc, *args, timeout=timeout, env=env)

    return _run


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests run only where a CUDA device is present (and the CPU is not forced)."""
    from vigos_megatron.runtime import use_cuda

    if use_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present, or VIGOS_FORCE_CPU set)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
