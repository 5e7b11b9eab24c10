"""A torch-native fast layer spec for machines without Transformer Engine ("sdpa").

megatron-core's local layer spec (``get_gpt_layer_local_spec``) is exact but its core attention,
``DotProductAttention``, materialises the ``[b, np, sq, sk]`` scores and probabilities of every
layer and keeps them for backward. This module keeps every other local module (column/row
parallel linears, ``torch.nn.RMSNorm`` through ``WrappedTorchNorm``, the local MLP and
bias-dropout-add) and swaps only the core attention for :class:`SDPADotProductAttention`, which
calls ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / cuDNN
kernels on CUDA, torch's fused CPU kernel or math path on the CPU).

It is ordinary model configuration: :func:`get_gpt_layer_sdpa_spec` is a ``ModuleSpec`` and
:func:`sdpa_block_spec` the form Megatron-Bridge's provider takes (``provider.transformer_layer_spec``).
Parameter names, shapes, sharding and the distributed-checkpoint keys are those of the local
spec (the core attention has no parameters), so checkpoints are interchangeable.

Attention semantics (query rows ``i`` of ``sq``, key columns ``j`` of ``sk``)::

    out[i] = sum_j softmax_j(scale * q_i . k_j  masked to the visible j) v_j

* no ``attention_mask`` and a causal mask type (``causal``, ``padding_causal``,
  ``causal_bottom_right``): ``sq == sk`` -> ``is_causal=True`` (no mask tensor, flash kernels);
  ``sq == 1`` -> every key visible (decode step, as in the local spec); otherwise bottom-right
  aligned causality (query ``i`` sits at absolute position ``sk - sq + i``);
* no ``attention_mask`` and ``padding`` / ``no_mask`` / ``arbitrary``: every key visible;
* an ``attention_mask`` (bool, megatron convention ``True`` = masked out, broadcastable to
  ``[b, np, sq, sk]``) is used as the whole mask whatever the mask type, exactly as the local
  spec does. Query rows with no visible key (e.g. left-padding queries under causal+padding)
  attend to every key instead: their output is finite but meaningless (the local spec gives
  the uniform average there); rows with a visible key are unaffected and exact.
* GQA: ``enable_gqa=True`` (no copy of K/V) where the fused kernels take it (torch >= 2.5, no mask
  tensor, head dim <= 256); otherwise K/V heads are repeated as the local spec does.
* softmax scale ``1/sqrt(kv_channels)`` or the configured ``softmax_scale``
  (``apply_query_key_layer_scaling`` divides and re-multiplies by the layer number in the local
  spec, a no-op in exact arithmetic, so it is not replicated); dropout ``config.attention_dropout``
  in training only, under megatron's model-parallel RNG tracker like the local spec.

Rotary embeddings in fp32: the spec's self-attention, :class:`Fp32RopeSelfAttention`, hands
megatron's rope fp32 query and key (``get_query_key_value_tensors`` upcasts them), so the rotation
``t * cos + rotate_half(t) * sin`` runs in fp32 with unrounded ``cos``/``sin`` (megatron's unfused
rope, the one mrope takes, rounds ``cos``/``sin`` to the activations' dtype and rounds each
product and the sum); :func:`sdpa_attention` rounds query and key once to the value's dtype. In
bf16 that is one rounding of the rotated query/key, as a fused rope kernel's output; in fp32 it
changes nothing. Measured (``benchmarks/bench_precision.py``, the demo's batches without clip
flips): with megatron's bf16 rope the bf16 step's gradient norm was -2.4 to -2.7 % off fp32,
through the teacher's logits; with the fp32 rotation +0.04 to +0.9 %. The transient cost: fp32
query/key between the qkv projection and the core attention; autograd keeps the fp32 cos/sin
tables (16 instead of 8 bytes per token and head dim) and, under selective recomputation, the
checkpoint's fp32 query/key (``recipes/shapes.py``). Qwen3-VL's language model replaces the
self-attention by Bridge's ``Qwen3VLSelfAttention`` (its own rope): no fp32 rotation there.

Not supported (a clear error, as in the local spec): packed sequences (THD), attention bias,
context parallelism, sliding windows, non-vanilla softmax, qk-clip.

A vision transformer that attends within each image of a packed sequence (Qwen3-VL's, Bridge
passes THD ``packed_seq_params`` with ``cu_seqlens``) takes :class:`SegmentSDPAAttention`
through :func:`get_vit_layer_sdpa_spec`: bidirectional attention inside each segment
``[cu_seqlens[i], cu_seqlens[i+1])``, none across segments (the local spec's
``DotProductAttention`` refuses packed sequences, so the ``local`` choice uses it too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide, is_torch_min_version

#: mask types under which a missing mask means causal attention
_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)

#: torch's fused SDPA kernels take GQA heads natively (``enable_gqa``) only up to this head dim
_NATIVE_GQA_MAX_HEAD_DIM = 256


class SDPASpecError(ValueError):
    """The configuration or the call asks for something the sdpa core attention does not do."""


# --------------------------------------------------------------------------- math helpers


def bottom_right_causal_visible(sq: int, sk: int, device) -> Tensor:
    """bool ``[sq, sk]``: ``True`` where key ``j`` is visible to query ``i`` (``j <= sk - sq + i``)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


def visible_from_megatron_mask(attention_mask: Tensor) -> Tensor:
    """Megatron's bool mask (``True`` = masked out) -> SDPA's (``True`` = attends).

    Rows with no visible key are opened to every key, so that no kernel produces NaN (a NaN in a
    padding row would reach real rows through ``0 * NaN`` in the next layer's ``P @ V``).
    ``attention_mask``: bool, broadcastable to ``[b, np, sq, sk]``; returns the same shape.
    """
    visible = attention_mask.logical_not()
    return visible | visible.logical_not().all(dim=-1, keepdim=True)


def sdpa_mask_args(
    attention_mask: Optional[Tensor], mask_type: AttnMaskType, sq: int, sk: int, device
) -> tuple[Optional[Tensor], bool]:
    """``(attn_mask, is_causal)`` for ``scaled_dot_product_attention`` (semantics in the module docstring)."""
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise SDPASpecError(
                f"attention_mask: expected a bool tensor (megatron convention, True = masked out), "
                f"got dtype {attention_mask.dtype}"
            )
        if attention_mask.device != torch.device(device):
            raise SDPASpecError(
                f"attention_mask is on {attention_mask.device} but the attention inputs are on {device}"
            )
        if attention_mask.dim() != 4 or attention_mask.shape[-2:] not in ((sq, sk), (1, sk)):
            raise SDPASpecError(
                f"attention_mask: expected shape [b|1, 1|np, {sq}|1, {sk}], got {tuple(attention_mask.shape)}"
            )
        return visible_from_megatron_mask(attention_mask), False
    if mask_type in _CAUSAL_TYPES and sq > 1:
        if sq == sk:
            return None, True
        return bottom_right_causal_visible(sq, sk, device), False
    return None, False


def use_native_gqa(attn_mask: Optional[Tensor], head_dim: int) -> bool:
    """True where ``enable_gqa=True`` keeps SDPA on a fused kernel (else K/V heads are repeated)."""
    return is_torch_min_version("2.5.0a0") and attn_mask is None and head_dim <= _NATIVE_GQA_MAX_HEAD_DIM


def sdpa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    attn_mask: Optional[Tensor],
    is_causal: bool,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Scaled dot-product attention in megatron's layout.

    ``query`` ``[sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` with ``np % ng == 0``
    (any strides; same device); ``query``/``key`` may be fp32 (rotated in fp32 by
    :class:`Fp32RopeSelfAttention`) and are rounded once to ``value``'s dtype; ``attn_mask`` bool
    ``True`` = attends, broadcastable to ``[b, np, sq, sk]``. Returns ``[sq, b, np * hn]``
    (contiguous) in ``value``'s dtype.
    """
    query, key = query.to(value.dtype), key.to(value.dtype)
    sq, b, n_heads, head_dim = query.shape
    n_groups = key.size(2)
    if n_heads % n_groups != 0:
        raise SDPASpecError(f"query heads {n_heads} are not a multiple of key/value heads {n_groups}")
    q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
    k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
    v = value.permute(1, 2, 0, 3)
    kwargs = {}
    if n_heads != n_groups:
        if use_native_gqa(attn_mask, head_dim):
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(n_heads // n_groups, dim=1)
            v = v.repeat_interleave(n_heads // n_groups, dim=1)
    context = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
    )
    # [b, np, sq, hn] -> [sq, b, np * hn]
    return context.permute(2, 0, 1, 3).reshape(sq, b, n_heads * head_dim)


# --------------------------------------------------------------------------- core attention


class Fp32RopeSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` whose query and key leave the qkv projection (and the q/k
    norms) in fp32, so that its rope rotates them in fp32 (module docstring); the value keeps the
    activations' dtype. The core attention rounds query and key to it (:func:`sdpa_attention`)."""

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if len(out) < 3:  # (mixed qkv, split sizes): the fused-qkv rope path, left as it is
            return out
        return (out[0].float(), out[1].float(), *out[2:])


class SDPADotProductAttention(MegatronModule):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward
    contract, no parameters): ``forward(query [sq, b, np, hn], key/value [sk, b, ng, hn],
    attention_mask, attn_mask_type=, attention_bias=, packed_seq_params=) -> [sq, b, np*hn]``,
    heads being this tensor-parallel rank's (``np = num_attention_heads / TP``,
    ``ng = num_query_groups / TP``). Rotary embeddings (Qwen2.5-VL's mrope) are applied by
    ``SelfAttention`` before this module is called.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        _check_supported(config, layer_number)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None else softmax_scale
        )
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        self.softmax_offset = None  # read by SelfAttention's inference paths

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise SDPASpecError("packed sequences (packed_seq_params) are not supported by the sdpa spec")
        if attention_bias is not None:
            raise SDPASpecError("attention_bias is not supported by the sdpa spec")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.size(0), key.size(0)
        attn_mask, is_causal = sdpa_mask_args(attention_mask, mask_type, sq, sk, query.device)
        dropout_p = self.dropout_p if self.training else 0.0
        run = lambda: sdpa_attention(  # noqa: E731
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale, dropout_p=dropout_p
        )
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # different heads on different TP ranks: the model-parallel RNG stream, as in the local spec
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return run()
        return run()


class SegmentSDPAAttention(SDPADotProductAttention):
    """Bidirectional attention within each segment of a THD-packed sequence (a vision tower's images).

    ``forward(query [t, np, hn], key/value [t, ng, hn], attention_mask=None, packed_seq_params=)``
    with ``packed_seq_params.cu_seqlens_q == cu_seqlens_kv`` int ``[m + 1]`` (segment ``i`` is rows
    ``cu[i]:cu[i+1]``) returns ``[t, np * hn]``:
    ``out[i] = sum_{j in seg(i)} softmax_j(scale * q_i . k_j) v_j``. One SDPA call per segment
    (no ``[t, t]`` mask). Without ``packed_seq_params`` the whole input is one segment
    (``[s, b, np, hn]`` in, ``[s, b, np * hn]`` out).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or attention_mask is not None:
            raise SDPASpecError("SegmentSDPAAttention takes neither attention_mask nor attention_bias")
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0:
            raise SDPASpecError("SegmentSDPAAttention: attention dropout is not supported (vision towers use 0)")
        if packed_seq_params is None:
            return sdpa_attention(query, key, value, attn_mask=None, is_causal=False, scale=self.softmax_scale,
                                  dropout_p=0.0)
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and not torch.equal(cu_q, cu_kv):
            raise SDPASpecError("SegmentSDPAAttention: query and key segments differ (cross attention is not supported)")
        bounds = cu_q.tolist()
        outs = [
            sdpa_attention(query[a:b, None], key[a:b, None], value[a:b, None], attn_mask=None, is_causal=False,
                           scale=self.softmax_scale, dropout_p=0.0)[:, 0]
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs)


def _check_supported(config: TransformerConfig, layer_number: int) -> None:
    from megatron.core.transformer.utils import is_layer_window_attention

    if config.context_parallel_size != 1:
        raise SDPASpecError(f"context_parallel_size={config.context_parallel_size}: the sdpa spec needs 1")
    if config.softmax_type != "vanilla":
        raise SDPASpecError(f"softmax_type={config.softmax_type!r}: the sdpa spec supports 'vanilla' only")
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise SDPASpecError(f"window_size={config.window_size}: sliding-window attention is not supported by the sdpa spec")
    if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
        raise SDPASpecError("qk_clip / log_max_attention_logit need the attention logits: not supported by the sdpa spec")


# --------------------------------------------------------------------------- specs


def get_gpt_layer_sdpa_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's local GPT layer spec with :class:`Fp32RopeSelfAttention` and
    :class:`SDPADotProductAttention` as core attention."""
    local = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    attn = local.submodules.self_attention
    attn = dataclasses.replace(attn, module=Fp32RopeSelfAttention,
                               submodules=dataclasses.replace(attn.submodules, core_attention=SDPADotProductAttention))
    return dataclasses.replace(local, submodules=dataclasses.replace(local.submodules, self_attention=attn))


def sdpa_block_spec(config: TransformerConfig, vp_stage: Optional[int] = None):
    """The decoder block of this pipeline stage (``TransformerBlockSubmodules``) built from
    :func:`get_gpt_layer_sdpa_spec`; for ``provider.transformer_layer_spec``.

    Exactly what ``TransformerBlock`` derives from a layer ``ModuleSpec`` (the stage's number of
    layers, megatron's default final norm), given in block form because Megatron-Bridge's
    ``GPTModelProvider.provide`` overwrites a *layer* spec's core attention with
    ``DotProductAttention`` whenever ``attention_backend`` is ``local`` - which it is here, so
    that Transformer Engine's ``NVTE_*_ATTN`` switches (set at model construction) agree with
    the local spec's in the same process.
    """
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.utils import get_pg_rank

    pg = getattr(config, "_pg_collection", None)
    pp_rank = get_pg_rank(pg.pp) if pg is not None and hasattr(pg, "pp") else None
    layer = get_gpt_layer_sdpa_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=LayerNormImpl)


def get_vit_layer_sdpa_spec() -> ModuleSpec:
    """megatron-core's local ViT layer spec with :class:`SegmentSDPAAttention` as core attention."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    local = get_vit_layer_with_local_spec()
    attn = local.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=SegmentSDPAAttention))
    return dataclasses.replace(local, submodules=dataclasses.replace(local.submodules, self_attention=attn))
