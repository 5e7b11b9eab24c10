"""The platform module: each adaptation activates exactly where it is needed.

Each case runs in a fresh interpreter, because activation changes process state.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, env_extra=None, pythonpath=(), drop=()):
    """Run ``code`` in a fresh interpreter with the caller's environment (PYTHONPATH kept)."""
    import os

    from vigos_megatron.testing.distributed import subprocess_env

    env = subprocess_env(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env["PYTHONPATH"]])
    for name in drop:
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout


def test_cpu_machine_without_te_gets_both_adaptations():
    # a CPU machine, or a GPU machine with the CPU forced (VIGOS_FORCE_CPU=1): the same adaptations
    out = run_py(
        """
        import torch
        from vigos_megatron import platform, runtime
        assert not runtime.use_cuda() and runtime.backend() == "gloo"
        import importlib.util
        te_absent = importlib.util.find_spec("transformer_engine") is None
        st = platform.activate()
        assert st.cpu_mode, st
        assert st.te_standin == te_absent, st
        assert platform.activate() == st  # idempotent

        # (a) megatron-core's CUDA touch-points now work on the CPU
        from megatron.core.pipeline_parallel import schedules, p2p_communication
        from megatron.core.tensor_parallel import random as mrandom
        assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        p2p_communication.torch.cuda.synchronize()
        assert torch.cuda.current_device() == torch.device("cpu")
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("demo-rng", 123)
        with tracker.fork("demo-rng"):
            a = torch.rand(3)
        with tracker.fork("demo-rng"):
            b = torch.rand(3)
        assert not torch.equal(a, b)  # the forked state advances, like CUDA's
        from megatron.core.optimizer import clip_grads
        p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 2.0)
        clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
        assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-5)

        # (b) megatron-bridge imports; megatron-core still sees no usable TE
        import megatron.bridge  # noqa: F401
        if not st.te_standin:  # a GPU machine with a real TE: (b) does not apply
            print("ok"); raise SystemExit(0)
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.utils import is_te_min_version
        assert gpt_layer_specs.HAVE_TE is False
        assert not is_te_min_version("1.0")
        import transformer_engine.pytorch as te
        assert platform.is_te_standin(te)
        try:
            te.Linear(4, 4)
        except RuntimeError as e:
            assert "stand-in" in str(e)
        else:
            raise AssertionError("stand-in class instantiated")
        print("ok")
        """,
        env_extra={"VIGOS_FORCE_CPU": "1"},
    )
    assert out.strip().endswith("ok")


def test_nothing_patched_where_a_gpu_is_present():
    out = run_py(
        """
        import torch
        torch.cuda.is_available = lambda: True     # pretend a GPU machine
        real_current_device = torch.cuda.current_device
        from vigos_megatron import platform
        st = platform.activate()
        assert not st.cpu_mode, st
        assert torch.cuda.current_device is real_current_device
        from megatron.core.pipeline_parallel import schedules
        assert schedules.torch is torch
        from vigos_megatron import runtime
        assert runtime.backend() == "nccl"
        print("ok")
        """,
        drop=("VIGOS_FORCE_CPU",),
    )
    assert out.strip().endswith("ok")


def test_no_standin_where_te_is_installed(tmp_path):
    fake = tmp_path / "transformer_engine"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.9.0'\n")
    out = run_py(
        """
        import sys, torch
        torch.cuda.is_available = lambda: True     # a GPU machine with TE: nothing to do
        from vigos_megatron import platform
        assert not platform.needs_te_standin()
        st = platform.activate()
        assert not st.te_standin and not st.cpu_mode, st
        assert "transformer_engine" not in sys.modules or not platform.is_te_standin(sys.modules["transformer_engine"])
        print("ok")
        """,
        pythonpath=[tmp_path],
        drop=("VIGOS_FORCE_CPU",),
    )
    assert out.strip().endswith("ok")
