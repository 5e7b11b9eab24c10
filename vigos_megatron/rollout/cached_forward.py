"""One pipeline stage's decoder layers over a rotated-key KV cache, through the layers' own modules.

For hidden states ``x`` ``[s, b, H]`` of cache columns ``[c0, c1)`` (``s = c1 - c0``) of cache rows
``[r0, r1)`` (``b = r1 - r0``), each layer of megatron-core's ``TransformerLayer`` (local or sdpa
spec) computes, in eval mode::

    h   = input_layernorm(x)
    q, k, v = self_attention.get_query_key_value_tensors(h)    # [s, b, Nq, D], [s, b, G, D] x2
    q, k = rope(q), rope(k)                                      # rotated once, with their positions
    K[r0:r1, :, c0:c1], V[r0:r1, :, c0:c1] = k, v                # stored rotated
    a   = softmax(scale * q . K[r0:r1, :, :c1]  masked) V[r0:r1, :, :c1]
    x   = self_attn_bda(linear_proj(a), residual=x)
    x   = mlp_bda(mlp(pre_mlp_layernorm(x)), residual=x)

with ``rope(t) = t * cos + rotate_half(t) * sin`` (megatron's unfused non-interleaved formula,
``cos = cos(freqs) * mscale``), ``freqs`` ``[s, b, 1, D]`` from the language model's own
``MultimodalRotaryEmbedding`` for the fed columns' mrope positions, ``cos``/``sin`` computed once
per forward for all layers. Attention is ``torch.nn.functional.scaled_dot_product_attention``
with the query heads of each key/value group folded into the query axis
(``[b, G, (Nq/G) * s, D]`` against ``[b, G, c1, D]``: no copy of K/V), scale ``1/sqrt(D)`` or the
configured ``softmax_scale``. ``bias`` (``[b, 1, s|1, c1]``, added to the scores: 0 or ``-inf``)
must leave every query at least one key (its own column).

The projections, norms, MLP and bias-dropout-add are the layers' modules (tensor-parallel
reductions included), so this is the layers' forward with megatron's static-inference
``_adjust_key_value_for_inference`` replaced by the rotated cache; training never runs it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vigos_megatron.rollout.kv_cache import RoundKVCache


class UnsupportedLayerError(ValueError):
    """The language model has a layer structure the cached forward does not reproduce."""


def check_layer(layer) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``layer`` is a layer the cached forward reproduces
    (``SelfAttention`` with rope, no cross attention, a dense ``MLP``, none of the listed options)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    cfg = layer.config
    problems = []
    if not isinstance(layer.self_attention, SelfAttention):
        problems.append(f"self_attention is {type(layer.self_attention).__name__}, not SelfAttention")
    if not isinstance(layer.cross_attention, IdentityOp):
        problems.append("cross attention")
    if not isinstance(layer.mlp, MLP):
        problems.append(f"mlp is {type(layer.mlp).__name__} (mixture of experts?)")
    for flag in ("fp32_residual_connection", "attention_output_gate", "rotary_interleaved", "multi_latent_attention",
                 "inference_fuse_tp_communication", "no_rope_freq", "window_size", "sequence_parallel"):
        if getattr(cfg, flag, None):
            problems.append(f"config.{flag}")
    if getattr(cfg, "rotary_percent", 1.0) != 1.0:
        problems.append(f"rotary_percent {cfg.rotary_percent}")
    if getattr(cfg, "softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type {cfg.softmax_type}")
    if problems:
        raise UnsupportedLayerError(f"layer {layer.layer_number}: the KV-cached rollout forward does not support "
                                    + ", ".join(problems))


def rotary_cos_sin(freqs: Tensor, mscale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of megatron's unfused rope: ``(cos(freqs) * mscale).to(dtype)``, same for sin."""
    return (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``t * cos + rotate_half(t) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (last dim)."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return (t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)


class CachedStageForward:
    """The decoder layers of one stage (``lm.decoder.layers``) with a :class:`RoundKVCache`."""

    def __init__(self, lm):
        self.layers = list(lm.decoder.layers)
        for layer in self.layers:
            check_layer(layer)
        cfg = lm.config
        self.config = cfg
        self.rotary = lm.rotary_pos_emb
        self.mrope_section = lm.mrope_section
        if self.layers:
            attn = self.layers[0].self_attention
            self.q_heads = attn.num_attention_heads_per_partition
            self.kv_heads = attn.num_query_groups_per_partition
            self.head_dim = attn.hidden_size_per_attention_head
            self.mscale = float(getattr(attn, "_yarn_concentration_factor", 1.0) or 1.0)
        else:
            self.q_heads = self.kv_heads = self.head_dim = 0
            self.mscale = 1.0
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else 1.0 / math.sqrt(max(1, self.head_dim))

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``[s, b, 1, D]`` for mrope ``position_ids`` ``[3, b, s]`` (the language model's rotary)."""
        freqs = self.rotary(position_ids, self.mrope_section)
        return rotary_cos_sin(freqs, self.mscale, dtype)

    def __call__(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: RoundKVCache, rows: tuple[int, int],
                 columns: tuple[int, int], bias: Tensor, *, last_column_only: bool = False) -> Tensor:
        """Hidden states ``[s, b, H]`` after this stage's layers (see the module docstring).

        ``last_column_only``: only the last column's output is wanted (``[1, b, H]``): the last
        layer still stores every column's K and V but attends, projects and runs its MLP for the
        last column only.
        """
        r0, r1 = rows
        c0, c1 = columns
        s = x.shape[0]
        per_group = self.q_heads // max(1, self.kv_heads)
        # queries of a group share the mask rows: [b, 1, per_group * s, c1]
        grouped = bias.repeat(1, 1, per_group, 1) if s > 1 and per_group > 1 else bias
        cos, sin = rope
        training, fusion = False, self.config.bias_dropout_fusion
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            attn = layer.self_attention
            h = layer.input_layernorm(x)
            q, k, v = attn.get_query_key_value_tensors(h)
            k = apply_rotary(k, cos, sin)
            kbuf, vbuf = cache.layer(i)
            kbuf[r0:r1, :, c0:c1] = k.permute(1, 2, 0, 3)
            vbuf[r0:r1, :, c0:c1] = v.permute(1, 2, 0, 3)
            if last_column_only and i == last and s > 1:
                x, q, layer_bias = x[-1:], apply_rotary(q[-1:], cos[-1:], sin[-1:]), bias[:, :, -1:]
            else:
                q, layer_bias = apply_rotary(q, cos, sin), grouped
            a = self._attend(q, kbuf[r0:r1, :, :c1], vbuf[r0:r1, :, :c1], layer_bias)
            x = layer.self_attn_bda(training, fusion)(attn.linear_proj(a), x, layer.hidden_dropout)
            x = layer.mlp_bda(training, fusion)(layer.mlp(layer.pre_mlp_layernorm(x)), x, layer.hidden_dropout)
        return x

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
        """``q`` ``[sq, b, Nq, D]`` over ``keys``/``values`` ``[b, G, sk, D]`` -> ``[sq, b, Nq * D]``."""
        sq, b, nq, d = q.shape
        g = self.kv_heads
        # [sq, b, Nq, D] -> [b, Nq, sq, D] -> [b, G, (Nq/G) * sq, D] (query heads are group-major)
        qg = q.permute(1, 2, 0, 3).reshape(b, g, (nq // g) * sq, d)
        # the mask expanded over the groups (a stride-0 view): torch's CPU flash kernel is about 3x
        # slower per decode step when it has to broadcast a size-1 head dimension itself
        mask = bias.expand(b, g, qg.shape[2], keys.shape[2])
        a = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=self.scale)
        # [b, G, (Nq/G) * sq, D] -> [b, Nq, sq, D] -> [sq, b, Nq * D]
        return a.reshape(b, nq, sq, d).permute(2, 0, 1, 3).reshape(sq, b, nq * d)
