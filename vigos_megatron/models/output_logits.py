"""The output layer's logits for the loss, unrounded: fp32 ``[N, V/tp]`` from bf16 weights.

The output layer multiplies the final-norm hidden states ``h`` ``[N, H]`` by this rank's
vocabulary shard of the output weight ``W`` ``[V/tp, H]``. In a bf16 model megatron's
``ColumnParallelLinear`` accumulates the products in fp32 and rounds the result to bf16: a logit of
magnitude 16 moves by up to 2^-5 (bf16 keeps 8 significant bits). The distillation gradient is
``p_S - q_T`` of two nearly equal distributions (self-distillation: KL ~1e-2 per token), and
independent rounding of the student's and the teacher's logits is then a sizeable part of that
difference (``benchmarks/bench_precision.py`` measures it). :func:`fp32_output_logits` computes the
same product without the final rounding: the inputs are the model's own bf16 ``h`` and ``W``, the
output is the fp32 accumulator (``torch.mm(..., out_dtype=float32)`` on CUDA; on the CPU the bf16
operands are widened first, exact, then multiplied in fp32).

Backward (``g`` = the loss's fp32 gradient w.r.t. the logits) runs in the model's dtype, as
megatron's bf16 output layer does with its bf16 logits' gradient: ``g`` is rounded once (a relative
error of 2^-9 per entry, no cancellation: ``p_S - q_T`` was formed in fp32), then
``dh = g W`` (all-reduced over the tensor-parallel group, as ``ColumnParallelLinear`` does)
and ``dW = g^T h``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vigos_megatron.losses.kl_common import matmul_fp32_out


class _OutputLinearFP32(torch.autograd.Function):
    """``logits = h W^T`` in fp32 (module docstring); ``h`` ``[N, H]``, ``W`` ``[V/tp, H]``, same dtype."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(h, weight)
        return matmul_fp32_out(h, weight.t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        g = grad.to(weight.dtype)
        dh = g @ weight if ctx.needs_input_grad[0] else None
        dw = g.t() @ h if ctx.needs_input_grad[1] else None
        return dh, dw


def fp32_output_logits(hidden: Tensor, output_layer, weight: Tensor | None = None) -> Tensor:
    """fp32 ``[N, V/tp]`` logits of the vocabulary-parallel ``output_layer`` (megatron's
    ``ColumnParallelLinear``, no bias, no sequence parallelism) at the hidden states ``hidden`` ``[N, H]``.

    ``weight``: the tied embedding weight when the output layer shares it (GPTModel passes it),
    else the layer's own. The gradient reaching ``hidden`` is all-reduced over the layer's
    tensor-parallel group (each rank holds one vocabulary shard), as in ``ColumnParallelLinear``.
    """
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    if getattr(output_layer, "bias", None) is not None or getattr(output_layer, "sequence_parallel", False):
        raise ValueError("fp32_output_logits: the output layer has a bias or runs sequence-parallel (not supported)")
    w = output_layer.weight if weight is None else weight
    h = copy_to_tensor_model_parallel_region(hidden, group=output_layer.tp_group)
    return _OutputLinearFP32.apply(h, w)
