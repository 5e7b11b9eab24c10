"""The CPU linear kernel (vigos_megatron/rollout/cpu_linear.c) against float64."""

import os
import shutil

import pytest
import torch

from vigos_megatron.rollout import cpu_linear

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5


# (rows, out features, in features): every row chunk of 1 to 8, chunks cut by the row count, more
# than one 128-row block, a last panel cut by N (N not a multiple of 32, N below 32), odd K
SHAPES = [(1, 64, 512), (2, 96, 17), (3, 33, 40), (5, 100, 64), (7, 31, 3), (8, 128, 256), (9, 64, 33),
          (13, 250, 96), (130, 70, 48), (300, 40, 130), (0, 64, 32)]


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64(shape, threads, monkeypatch):
    assert cpu_linear.kernel() is not None, "the C kernel did not build (see the warning)"
    monkeypatch.setattr(cpu_linear, "PARALLEL_MACS", 0)  # split over the threads at any size
    x, w = _operands(*shape)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        panels = cpu_linear.pack(w)
        got = cpu_linear.linear(x, panels)
    finally:
        torch.set_num_threads(prev)
    assert panels.data.shape == (-(-shape[1] // 32), shape[2], 32) and got.shape == (shape[0], shape[1])
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_results_do_not_depend_on_the_thread_split_or_the_row_blocks(monkeypatch):
    """Every output element is one sum in k order: the same bits on 1 or 3 threads, and a row computed
    alone equals the row computed among 300 (other row chunks and 128-row blocks)."""
    monkeypatch.setattr(cpu_linear, "PARALLEL_MACS", 0)
    x, w = _operands(300, 200, 96, seed=3)
    panels = cpu_linear.pack(w)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(cpu_linear.linear(x, panels))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(cpu_linear.linear(x[137:138], panels), outs[0][137:138])


@needs_compiler
def test_leading_dimensions_and_views_are_kept():
    """``[s, b, K]`` in, ``[s, b, N]`` out; a non-contiguous view is read correctly."""
    x, w = _operands(24, 40, 64, seed=1)
    panels = cpu_linear.pack(w)
    x3 = x.view(4, 6, 64).transpose(0, 1)  # [6, 4, 64], not contiguous
    got = cpu_linear.linear(x3, panels)
    assert got.shape == (6, 4, 40)
    torch.testing.assert_close(got, x3 @ w.T, rtol=1e-5, atol=1e-5)


def test_other_weights_and_inputs_are_refused():
    """No panels for a bf16 or non-2-D weight; an input of the wrong width or dtype is one clear error."""
    assert cpu_linear.pack(torch.randn(8, 4, dtype=torch.bfloat16)) is None
    assert cpu_linear.pack(torch.randn(2, 8, 4)) is None
    if cpu_linear.kernel() is None:
        pytest.skip("no C kernel")
    panels = cpu_linear.pack(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"does not fit a packed \[8, 4\]"):
        cpu_linear.linear(torch.randn(3, 5), panels)
    with pytest.raises(ValueError, match="float64"):
        cpu_linear.linear(torch.randn(3, 4, dtype=torch.float64), panels)


def test_a_kernel_that_cannot_be_built_is_one_warning_and_none(tmp_path, monkeypatch, caplog):
    """cpu_kernels.load: no compiler, or a source that does not compile, gives None and one warning
    naming the source and what runs instead; a built library is cached by content."""
    from vigos_megatron.rollout import cpu_kernels

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = tmp_path / "bad_kernel.c"
    bad.write_text("int f(void) { return }\n")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level("WARNING", logger="vigos_megatron.rollout.cpu_kernels"):
        assert cpu_kernels.load(bad, lambda lib: None, "the torch path") is None
    assert "bad_kernel.c: the C kernel is unavailable (no C compiler" in caplog.text and "the torch path" in caplog.text
    monkeypatch.delenv("CC")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    caplog.clear()
    with caplog.at_level("WARNING", logger="vigos_megatron.rollout.cpu_kernels"):
        assert cpu_kernels.load(bad, lambda lib: None, "the torch path") is None
    assert "failed on bad_kernel.c" in caplog.text
    good = tmp_path / "good_kernel.c"
    good.write_text("int twice(int x) { return 2 * x; }\n")
    lib = cpu_kernels.load(good, lambda lib: None, "the torch path")
    assert lib is not None and lib.twice(21) == 42
    assert cpu_kernels.build(good) == cpu_kernels.build(good)
    assert [p.name.startswith("good_kernel-") for p in (tmp_path / "cache" / "vigos_megatron").iterdir()] == [True]
