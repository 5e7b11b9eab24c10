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
per forward for all layers. Attention over several columns is :func:`prefill_attention`
(``torch.nn.functional.scaled_dot_product_attention`` in query chunks, each against the cache
columns up to its last query: no copy of K/V); one column (a decode step) is
:func:`decode_attention` (a C kernel on the CPU, two batched GEMMs elsewhere); scale ``1/sqrt(D)`` or the configured
``softmax_scale``. ``bias`` (``[b, 1, s|1, c1]``, added to the scores: 0 or ``-inf``) must leave
every query at least one key (its own column) and, over several columns, mask every key after
its query (causal).

The norms, projections, MLP and bias-dropout-add are the layers' modules and parameters, so
this is the layers' forward with megatron's static-inference ``_adjust_key_value_for_inference``
replaced by the rotated cache; training never runs it. Megatron's tensor-parallel linears are
called through :class:`EvalLinear` / :class:`EvalMLP`, which compute exactly what their eval-mode
forward computes (``y = x W^T``, ``+ b`` after the TP all-reduce of a row-parallel output; the
MLP's unfused activation) without their per-call dispatch, and call the module itself in any
other configuration (sequence parallelism, fused activations, Transformer Engine...).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vigos_megatron.rollout import cpu_attention, cpu_linear
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
    """``(cos, sin_signed)`` of megatron's unfused rope: ``cos = (cos(freqs) * mscale).to(dtype)``,
    ``sin`` the same of ``sin(freqs)``, ``sin_signed = [-sin_1, sin_2]`` (its halves, last dim) for
    :func:`apply_rotary`."""
    sin = (torch.sin(freqs) * mscale).to(dtype)
    s1, s2 = torch.chunk(sin, 2, dim=-1)
    return (torch.cos(freqs) * mscale).to(dtype), torch.cat((-s1, s2), dim=-1)


def apply_rotary(t: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """``t * cos + rotate_half(t) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (last dim),
    computed as ``t * cos + [x2, x1] * sin_signed`` (:func:`rotary_cos_sin`; the same rounding:
    ``(-x2) * s1 == x2 * (-s1)``)."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return (t * cos) + (torch.cat((x2, x1), dim=-1) * sin_signed)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """One query position per row: ``softmax(scale * q K^T + bias) V`` -> ``[b, G, P, D]``.

    ``q`` ``[b, G, P, D]`` (the ``P`` query heads of each key/value group), ``keys``/``values``
    ``[b, G, T, D]`` (views of the cache; ``b`` and ``G`` must merge into one stride), ``bias``
    ``[b, 1, 1, T]`` (0 or ``-inf``). fp32 on the CPU: :mod:`cpu_attention`'s kernel where it
    applies. Otherwise two batched GEMMs over the ``b * G`` groups, the scores as ``K q^T``
    (``[T, D] x [D, P]``: the cache is the tall operand), then transposed to ``[P, T]`` (small)
    for the softmax and ``P V``.
    """
    if cpu_attention.supports(q, keys, values, bias):
        return cpu_attention.decode_attention(q, keys, values, bias, scale)
    b, g, p, d = q.shape
    t = keys.shape[2]
    scores = torch.bmm(keys.reshape(b * g, t, d), q.reshape(b * g, p, d).transpose(1, 2))  # [bG, T, P]
    # bias + scale * scores^T in one pass (the [P, T] layout written there): exactly scores * scale + bias
    scores = torch.add(bias, scores.transpose(1, 2).view(b, g, p, t), alpha=scale)
    probs = torch.softmax(scores.view(b * g, p, t), dim=-1)
    return torch.bmm(probs, values.reshape(b * g, t, d)).view(b, g, p, d)


def prefill_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float,
                      chunk: int | None = None) -> Tensor:
    """Causal attention of ``sq`` query columns, the last ``sq`` of the ``T`` key columns -> ``[sq, b, Nq * D]``.

    ``q`` ``[sq, b, Nq, D]``; ``keys``/``values`` ``[b, G, T, D]`` (views of the cache); ``bias``
    ``[b, 1, sq, T]`` (0 or ``-inf``), ``-inf`` wherever a key lies after its query (query ``i`` is
    key column ``T - sq + i``). Queries go in chunks of ``chunk`` columns (default 64 on the CPU,
    all of them elsewhere), chunk ``[a, e)`` against keys ``[0, T - sq + e)`` only (the keys after
    it are masked anyway): torch's SDPA with the query heads of each key/value group folded into
    the query axis (``[b, G, (Nq/G) * (e - a), D]`` against ``[b, G, T - sq + e, D]``: no copy of
    K/V): on the CPU the keys that the mask hides are not read.
    """
    sq, b, nq, d = q.shape
    g, t = keys.shape[1], keys.shape[2]
    per_group = nq // g
    chunk = chunk or (64 if q.device.type == "cpu" else sq)
    out = torch.empty((sq, b, nq, d), dtype=q.dtype, device=q.device)
    for a in range(0, sq, chunk):
        e = min(sq, a + chunk)
        n, end = e - a, t - sq + e
        # [n, b, Nq, D] -> [b, Nq, n, D] -> [b, G, (Nq/G) * n, D] (query heads are group-major)
        qg = q[a:e].permute(1, 2, 0, 3).reshape(b, g, per_group * n, d)
        # queries of a group share the mask rows, expanded over the groups (a stride-0 view): torch's
        # CPU flash kernel is slower when it has to broadcast a size-1 head dimension itself
        mask = bias[:, :, a:e, :end]
        mask = (mask.repeat(1, 1, per_group, 1) if per_group > 1 else mask).expand(b, g, per_group * n, end)
        o = torch.nn.functional.scaled_dot_product_attention(qg, keys[:, :, :end], values[:, :, :end],
                                                             attn_mask=mask, scale=scale)
        out[a:e] = o.view(b, nq, n, d).permute(2, 0, 1, 3)  # [b, Nq, n, D] -> [n, b, Nq, D]
    return out.view(sq, b, nq * d)


def onednn_packed(weight: Tensor) -> Tensor | None:
    """``weight`` ``[N, K]`` reordered for oneDNN's linear (``x W^T`` through
    ``torch.ops.mkldnn._linear_pointwise``), or ``None`` where that path does not apply (not an
    fp32 CPU tensor, or a torch without oneDNN). It rounds differently from ``torch.matmul`` (fp32,
    another summation order)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available()
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class EvalLinear:
    """megatron's ``ColumnParallelLinear`` (no output gather) or ``RowParallelLinear`` (parallel
    input) in eval mode: ``(x W^T + b, None)``, or ``(x W^T, b)`` with ``skip_bias_add``; a
    row-parallel product is all-reduced over its TP group before the bias. Anything else: the module.

    :meth:`pack` (on the CPU, fp32) computes ``x W^T`` from a packed copy of ``W`` until :meth:`unpack`:
    :mod:`cpu_linear`'s panels, or oneDNN's layout (:func:`onednn_packed`) where that kernel cannot be
    built; the copy is taken when packing, so pack again after the weights change."""

    #: packed copy of the weight while packed (None: torch.matmul on the module's weight)
    packed: cpu_linear.Panels | Tensor | None = None

    def __init__(self, module):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        self.module = module
        common = (not module.sequence_parallel and not getattr(module, "explicit_expert_comm", False)
                  and getattr(module, "gtp_remat_size", 1) == 1)
        self.row = type(module) is RowParallelLinear
        if self.row:
            self.plain = common and module.input_is_parallel
            group = module.tp_group
            self.group = group if group is not None and group.size() > 1 else None
        else:
            self.plain = (common and type(module) is ColumnParallelLinear and not module.gather_output
                          and not module.config.defer_embedding_wgrad_compute)
            self.group = None

    def pack(self) -> Tensor | None:
        """Switch to a packed product where one applies; returns the packed tensor (None: none)."""
        if not self.plain:
            self.packed = None
            return None
        w = self.module.weight
        self.packed = cpu_linear.pack(w)
        if self.packed is not None:
            return self.packed.data
        self.packed = onednn_packed(w)
        return self.packed

    def unpack(self) -> None:
        self.packed = None

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        mod = self.module
        if not self.plain:
            return mod(x)
        if isinstance(self.packed, cpu_linear.Panels):
            y = cpu_linear.linear(x, self.packed)
        elif self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = torch.matmul(x, mod.weight.t())
        if self.group is not None:
            y = y.contiguous()
            torch.distributed.all_reduce(y, group=self.group)
        bias = mod.bias
        if mod.skip_bias_add:
            return y, bias
        return (y + bias if bias is not None else y), None


class EvalMLP:
    """megatron's dense ``MLP`` in eval mode with the unfused activation:
    ``fc2(act(fc1(x) + b1))``, ``act`` the gated ``f(x_glu) * (x_linear + offset)`` or ``f``."""

    def __init__(self, mlp):
        from megatron.core.transformer.mlp import MLP

        cfg = mlp.config
        self.mlp, self.config = mlp, cfg
        self.fc1, self.fc2 = EvalLinear(mlp.linear_fc1), EvalLinear(mlp.linear_fc2)
        self.plain = (type(mlp) is MLP and not cfg.use_te_activation_func and not cfg.bias_activation_fusion
                      and mlp.activation_func is cfg.activation_func and self.fc1.plain and self.fc2.plain)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.plain:
            return self.mlp(x)
        cfg = self.config
        h, bias = self.fc1(x)
        if bias is not None:
            h = h + bias
        if cfg.gated_linear_unit:
            g, lin = torch.chunk(h, 2, dim=-1)
            if (val := cfg.activation_func_clamp_value) is not None:
                g, lin = g.clamp(min=None, max=val), lin.clamp(min=-val, max=val)
            h = cfg.activation_func(g) * (lin + cfg.glu_linear_offset if cfg.glu_linear_offset else lin)
        else:
            h = cfg.activation_func(h)
        return self.fc2(h)


class EvalQKV:
    """``SelfAttention.get_query_key_value_tensors`` in eval mode: ``[s, b, G, (Nq/G + 2) D]`` split
    into ``[s, b, Nq, D]``, ``[s, b, G, D]`` x2 (then the q/k norms); other cases: the method."""

    def __init__(self, attn):
        self.attn = attn
        self.linear = EvalLinear(attn.linear_qkv)
        cfg = attn.config
        self.plain = self.linear.plain and cfg.num_query_groups >= attn.world_size and not cfg.test_mode
        self.groups = attn.num_query_groups_per_partition
        self.per_group = attn.num_attention_heads_per_partition // self.groups
        self.d = attn.hidden_size_per_attention_head

    def __call__(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        if not self.plain:  # the sdpa spec's self-attention gives fp32 query/key (its rope's): the cache's dtype
            q, k, v = attn.get_query_key_value_tensors(h)
            return q.to(v.dtype), k.to(v.dtype), v
        mixed, _ = self.linear(h)
        s, b, d = mixed.shape[0], mixed.shape[1], self.d
        mixed = mixed.view(s, b, self.groups, (self.per_group + 2) * d)
        q, k, v = torch.split(mixed, [self.per_group * d, d, d], dim=3)
        q = q.reshape(s, b, -1, d)
        if attn.q_layernorm is not None:
            q = attn.q_layernorm(q)
        if attn.k_layernorm is not None:
            k = attn.k_layernorm(k)
        return q, k, v


def _add_deepstack(x: Tensor, mask: Tensor, feats: Tensor) -> Tensor:
    """``x`` ``[s', b, H]`` plus ``feats`` at ``mask`` ``[b, s]`` (row-major); ``s' = 1``: the last column only."""
    if x.shape[0] != mask.shape[1]:
        index = torch.cumsum(mask.flatten(), 0).view_as(mask) - 1
        keep = mask[:, -x.shape[0]:]
        feats, mask = feats[index[:, -x.shape[0]:][keep]], keep
    xt = x.transpose(0, 1).clone()  # [b, s, H]
    xt[mask] = xt[mask] + feats.to(xt.dtype)
    return xt.transpose(0, 1)


class CachedStageForward:
    """The decoder layers of one stage (``lm.decoder.layers``) with a :class:`RoundKVCache`."""

    def __init__(self, lm):
        self.layers = list(lm.decoder.layers)
        for layer in self.layers:
            check_layer(layer)
        fusion = lm.config.bias_dropout_fusion
        #: per layer: (qkv, linear_proj, mlp, attention bda, mlp bda)
        self.parts = [(EvalQKV(layer.self_attention), EvalLinear(layer.self_attention.linear_proj),
                       EvalMLP(layer.mlp), layer.self_attn_bda(False, fusion), layer.mlp_bda(False, fusion))
                      for layer in self.layers]
        #: the last stage's output layer as a direct linear (``[.., V/tp]`` logits, no gather); None
        #: before the last stage, for tied embeddings and any non-plain layer (then the module)
        output = (EvalLinear(lm.output_layer) if lm.post_process and not lm.share_embeddings_and_output_weights
                  else None)
        self.output = output if output is not None and output.plain else None
        #: every direct linear of the stage (packed during a generation on the CPU: :meth:`EvalLinear.pack`)
        self.linears = [lin for qkv, proj, mlp, _, _ in self.parts for lin in (qkv.linear, proj, mlp.fc1, mlp.fc2)]
        if self.output is not None:
            self.linears.append(self.output)
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
        """``(cos, sin_signed)`` ``[s, b, 1, D]`` (:func:`rotary_cos_sin`) for mrope ``position_ids``
        ``[3, b, s]`` (the language model's rotary)."""
        freqs = self.rotary(position_ids, self.mrope_section)
        return rotary_cos_sin(freqs, self.mscale, dtype)

    def __call__(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: RoundKVCache, rows: tuple[int, int],
                 columns: tuple[int, int] | Tensor, bias: Tensor, *, last_column_only: bool = False,
                 deepstack: tuple[Tensor, list] | None = None) -> Tensor:
        """Hidden states ``[s, b, H]`` after this stage's layers (see the module docstring).

        ``columns``: ``(c0, c1)``; or, for one column on static shapes (a CUDA graph's body), an
        int64 ``[1]`` tensor on the cache's device holding that column: K and V are written there
        (``index_copy_``) and every cache column is attended (``bias`` ``[b, 1, 1, T]`` hides
        those not written yet).

        ``last_column_only``: only the last column's output is wanted (``[1, b, H]``): the last
        layer still stores every column's K and V but attends, projects and runs its MLP for the
        last column only. ``deepstack`` (first stage, Qwen3-VL prefill): ``(mask [b, s], feats)``;
        ``feats[i]`` ``[mask.sum(), H]`` is added to layer ``i``'s output at the masked positions
        (row-major order), as Bridge's ``Qwen3VLTransformerBlock`` does.
        """
        r0, r1 = rows
        static = isinstance(columns, Tensor)
        c0, c1 = (0, cache.kv.shape[4]) if static else columns
        s = x.shape[0]
        cos, sin = rope
        last = len(self.layers) - 1
        for i, (layer, (qkv, proj, mlp, attn_bda, mlp_bda)) in enumerate(zip(self.layers, self.parts)):
            h = layer.input_layernorm(x)
            q, k, v = qkv(h)
            k = apply_rotary(k, cos, sin)
            kbuf, vbuf = cache.layer(i)
            if static:
                kbuf[r0:r1].index_copy_(2, columns, k.permute(1, 2, 0, 3).to(kbuf.dtype))
                vbuf[r0:r1].index_copy_(2, columns, v.permute(1, 2, 0, 3).to(vbuf.dtype))
            else:
                kbuf[r0:r1, :, c0:c1] = k.permute(1, 2, 0, 3)
                vbuf[r0:r1, :, c0:c1] = v.permute(1, 2, 0, 3)
            if last_column_only and i == last and s > 1:
                x, q, layer_bias = x[-1:], apply_rotary(q[-1:], cos[-1:], sin[-1:]), bias[:, :, -1:]
            else:
                q, layer_bias = apply_rotary(q, cos, sin), bias
            a = self._attend(q, kbuf[r0:r1, :, :c1], vbuf[r0:r1, :, :c1], layer_bias)
            x = attn_bda(proj(a), x, layer.hidden_dropout)
            x = mlp_bda(mlp(layer.pre_mlp_layernorm(x)), x, layer.hidden_dropout)
            if deepstack is not None and i < len(deepstack[1]):
                x = _add_deepstack(x, deepstack[0], deepstack[1][i])
        return x

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
        """``q`` ``[sq, b, Nq, D]`` over ``keys``/``values`` ``[b, G, sk, D]`` -> ``[sq, b, Nq * D]``."""
        sq, b, nq, d = q.shape
        g = self.kv_heads
        if sq == 1:  # a decode step (or the prefill's last column)
            a = decode_attention(q.reshape(b, g, nq // g, d), keys, values, bias, self.scale)
            return a.view(1, b, nq * d)
        return prefill_attention(q, keys, values, bias, self.scale)
