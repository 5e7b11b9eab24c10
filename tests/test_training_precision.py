"""The GPU configuration (bf16 parameters, fp32 main weights, the distributed optimizer, the ``sdpa``
spec, the Triton KL) on the CPU, against fp32.

* fast: :func:`~vigos_megatron.models.output_logits.fp32_output_logits` is the bf16 output layer's
  product without the final rounding (values and gradients), at TP=1; ``loss.logits_dtype`` is
  validated;
* slow (``tests/dist/precision_worker.py``, 2 gloo ranks, DP=2): one step of the GPU
  configuration (``loss.impl=triton`` under ``TRITON_INTERPRET=1``) against the fp32 step on
  identical rollouts, within the tolerances below; then the training loop in that configuration
  resumes exactly (2 steps straight = 1 step, checkpoint, a second launch of the loop, 1 step).

Tolerances, from ``benchmarks/bench_precision.py`` on the demo's assets (identical rollouts, the
first step's batch, at TP1 and in the worker at DP2; TP2 alike): with fp32 logits the bf16
``sdpa`` step (its rope in fp32, ``models/specs.py``) has whole-gradient relative error 0.027
(TP1 batches 0-3: 0.027-0.036), the language-model parameters' median 0.022 and max 0.034, the
gradient norm +0.47 % (batches 0-3: +0.04 to +0.90 %; TP2: +0.23 %), the loss +0.27 %, the terms
0.3-1.3 %, the per-token KL 1.4-1.6 % (relative L2), no clip decision changed. The bounds leave
about 1.5x the measured figures (the gradient norm: the issue's 2 %). With megatron's bf16 rope
the same step was at 0.064 / 0.066 / 0.097 and -2.6 %: the bounds catch its return. A flipped
clip decision moves one token's whole gradient in or out (14-60 % of the step's gradient in the
benchmark's batches): the step must have none. The bf16-logits ``local`` step (whole-gradient
error 0.144-0.155, one flip) fails them: that the loss reads fp32 logits is checked directly
(``logits_dtype``, and the fast test above).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: ``key: bound`` on the worker's figures (module docstring)
WHOLE_GRAD_REL = 0.05
LM_GRAD_MEDIAN_REL = 0.035
LM_GRAD_MAX_REL = 0.055
GRAD_NORM_REL = 0.02
LOSS_REL = 0.01
TERM_REL = 0.02
KL_REL = 0.03
CLIP_FLIPS = 0


# ----------------------------------------------------------------------------- fast


@pytest.fixture(scope="module")
def mp():
    from vigos_megatron.startup import local_model_parallel

    with local_model_parallel() as ps:
        yield ps


def _output_layer(h_size: int, v: int):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=h_size, num_attention_heads=4, use_cpu_initialization=True,
                            params_dtype=torch.bfloat16, bf16=True)
    layer = ColumnParallelLinear(h_size, v, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                 skip_bias_add=False, gather_output=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(v, h_size, generator=torch.Generator().manual_seed(0)).mul_(0.5))
    return layer


def test_fp32_output_logits_are_the_unrounded_bf16_product(mp):
    from vigos_megatron.models.output_logits import fp32_output_logits

    layer = _output_layer(64, 96)
    h = torch.randn(10, 64, generator=torch.Generator().manual_seed(1)).mul_(2).bfloat16().requires_grad_()
    exact = h.detach().double() @ layer.weight.detach().double().t()  # the bf16 operands' exact product
    out = fp32_output_logits(h, layer)
    rounded, _ = layer(h.detach().unsqueeze(1), runtime_gather_output=False)
    assert out.dtype == torch.float32 and out.shape == (10, 96)
    err_fp32 = float((out.double() - exact).abs().max())
    err_bf16 = float((rounded.squeeze(1).double() - exact).abs().max())
    assert err_fp32 < 1e-4 * float(exact.abs().max()), err_fp32
    assert err_bf16 > 20 * err_fp32, (err_bf16, err_fp32)  # the rounding the fp32 path skips
    # gradients: the bf16 layer's, for the same (bf16-representable) upstream gradient
    g = torch.randn(10, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    out.backward(g.float())
    dh, dw = h.grad.clone(), layer.weight.grad.clone()
    h.grad, layer.weight.grad = None, None
    h2 = h.detach().clone().requires_grad_()
    rounded, _ = layer(h2.unsqueeze(1), runtime_gather_output=False)
    rounded.squeeze(1).backward(g)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert torch.equal(dh, h2.grad) and torch.equal(dw, layer.weight.grad)


def test_logits_dtype_is_validated():
    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.train import PretrainConfig

    with pytest.raises(ConfigError, match="loss.logits_dtype: must be one of"):
        load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=/nonexistent", "loss.logits_dtype=bf16"])
    cfg = load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=/nonexistent"])
    assert cfg.loss.logits_dtype == "float32"


# ----------------------------------------------------------------------------- slow (torchrun)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.slow
def test_gpu_configuration_step_matches_fp32_and_resumes_exactly(torchrun, tiny_demo_assets, tmp_path):
    out = torchrun("precision_worker.py", 2, tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"})
    lines = [json.loads(x.split(" ", 1)[1]) for x in out.splitlines() if x.startswith("PREC ")]
    assert sorted(r["rank"] for r in lines) == [0, 1], out[-4000:]
    for r in lines:
        print(r)
        where = f"rank {r['rank']}: {r}"
        # the configuration really is the GPU one
        assert r["optimizers"] == {"fp32": "DistributedOptimizer", "bf16": "DistributedOptimizer"}, where
        assert r["param_dtypes"] == ["torch.bfloat16"] and r["main_param_dtypes"] == ["torch.float32"], where
        assert r["core_attention"] == "SDPADotProductAttention" and r["logits_dtype"] == "torch.float32", where
        assert r["tokens"] > 0 and r["terms"], where
        assert _rel(*r["loss"]) <= LOSS_REL, where
        for key, pair in r["terms"].items():
            assert _rel(*pair) <= TERM_REL, (key, where)
        assert _rel(*r["grad_norm"]) <= GRAD_NORM_REL, where
        assert r["grad_whole"] <= WHOLE_GRAD_REL, where
        assert r["grad_lm_median"] <= LM_GRAD_MEDIAN_REL and r["grad_lm_max"] <= LM_GRAD_MAX_REL, where
        assert r["kl_rel"] <= KL_REL and r["clip_flips"] <= CLIP_FLIPS, where

    # the loop in that configuration: 2 steps straight == 1 step, checkpoint, resumed step 2, bit for bit
    def metrics(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]

    resumes = [json.loads(x.split(" ", 1)[1]) for x in out.splitlines() if x.startswith("RESUME ")]
    assert [r["steps_per_launch"] for r in resumes] == [[2, 1, 1]] * 2, out[-4000:]  # the third launch resumed
    assert (tmp_path / "split" / "iter_0000001").is_dir()
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2], (a, b)
    for x, y in zip(a, b):
        for key in ("loss", "term/perception", "term/reasoning", "grad_norm", "lr", "completion_tokens"):
            if key in x:
                assert x[key] == y[key], (x["step"], key, x[key], y[key])
