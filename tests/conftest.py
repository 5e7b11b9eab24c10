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


# --------------------------------------------------------------------------- fault tests (issue 19)


@pytest.fixture(scope="session")
def straight_run(tiny_demo_assets, tmp_path_factory):
    """ONE straight run of the fault tests' configuration (tests/dist/fault_common.py: the tiny demo, TP=2 on
    2 CPU processes, 4 steps, a checkpoint every step, every checkpoint kept) through the documented launch,
    shared by tests/test_faults.py and tests/test_cluster.py: ``{"run_dir", "metrics", "seconds"}``. Treat
    its directory as read-only (copy it: fault_common.copy_run)."""
    import sys
    import time

    sys.path.insert(0, str(DIST_DIR))
    import fault_common as fc

    run = tmp_path_factory.mktemp("straight") / "run"
    t0 = time.perf_counter()
    code, out = fc.run(run, "checkpoint.keep_last=0")
    assert code == 0, out[-4000:]
    return {"run_dir": run, "metrics": fc.metrics(run), "seconds": time.perf_counter() - t0}


_FAULT_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def fault_table():
    """``fault_table.append({"test", "fault", "printed", "steps lost", "equal"})``: a row of the fault table,
    printed at the end of the session and written to $VIGOS_FAULT_TABLE when set (Markdown)."""
    return _FAULT_ROWS


def _fault_table_markdown() -> str:
    head = "| test | fault | what the run printed | steps lost | metrics = straight run |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['test']} | {r['fault']} | {r['printed']} | {r['steps lost']} | {r['equal']} |\n"
                          for r in _FAULT_ROWS)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _FAULT_ROWS:
        return
    text = _fault_table_markdown()
    terminalreporter.section("fault table (issue 19)")
    terminalreporter.write(text)
    if os.environ.get("VIGOS_FAULT_TABLE"):
        Path(os.environ["VIGOS_FAULT_TABLE"]).write_text(text)
