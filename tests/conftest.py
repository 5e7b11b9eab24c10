import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIST_DIR = Path(__file__).parent / "dist"


@pytest.fixture(scope="session")
def tiny_demo_assets():
    """The embedded demo's model and shards (``conf/tiny_cpu.yaml``), from the asset cache: built at
    most once (``vigos_megatron.training.tiny_demo``), shared by every test and by ``make demo``."""
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig
    from vigos_megatron.training.tiny_demo import ensure_tiny_assets

    root = Path(__file__).resolve().parents[1]
    return ensure_tiny_assets(load_config(PretrainConfig, root / "conf" / "tiny_cpu.yaml", ["run_dir=unused"]))


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
