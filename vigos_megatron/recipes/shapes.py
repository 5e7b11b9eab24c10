"""The model shapes the memory estimate (:mod:`vigos_megatron.recipes.memory`) works on: parameter
counts and per-layer activation bytes of a Qwen VL language model and its vision tower, read from a
Hugging Face ``config.json`` (or built for the known sizes, :mod:`vigos_megatron.models.hf_configs`).

The family (``model_type``) decides the vision tower's shape: Qwen2.5-VL's HF tower
(:class:`VisionShape`, replicated on every TP rank of the first pipeline stage) or Qwen3-VL's
Megatron vision transformer (:class:`Qwen3VisionShape`, TP-sharded, with deepstack mergers); and
the language model's QK-norm (Qwen3-VL). Both expose the same methods, so the estimate does not
branch on the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vigos_megatron.errors import UserError
from vigos_megatron.models.family import vision_layout_problem

LAYER_SPECS = ("local", "sdpa", "transformer_engine")
RECOMPUTE = ("none", "selective", "full")


class LayoutError(UserError, ValueError):
    """A parallel layout that the model or the batch cannot take; the message names the option."""

    hint = "choose another layout or more GPUs"


class _PatchGeometry:
    """Patch and merge geometry shared by the vision shapes (their fields name the sizes)."""

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_token(self) -> int:
        return self.spatial_merge_size**2

    @property
    def pixel_unit(self) -> int:
        """Side in pixels of the square one LM image token covers (patch * merge)."""
        return self.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class VisionShape(_PatchGeometry):
    """Qwen2.5-VL's HF vision tower (``vision_config``): replicated on every TP rank, no deepstack."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2

    #: language-model layers that receive vision features (deepstack); none here
    deepstack_layers = 0

    def check_layout(self, tp: int, pp: int, num_layers: int) -> None:
        """Any layout: the tower is replicated and lives on the first stage."""

    def rank_params(self, tp: int) -> int:
        """Parameters on one TP rank: the whole tower (it is replicated, not split)."""
        return self.params()

    def params(self) -> int:
        """Exact parameter count: patch embedding (no bias), blocks, patch merger."""
        h, i = self.hidden_size, self.intermediate_size
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
        m = h * self.patches_per_token
        merger = h + (m * m + m) + (m * self.out_hidden_size + self.out_hidden_size)
        return self.patch_dim * h + self.depth * block + merger

    def block_bytes_per_patch(self, tp: int = 1) -> int:
        """Bytes autograd saves per patch in one block (bf16, SDPA attention)."""
        h = self.hidden_size
        return 30 * h + 8 + 8 * self.head_dim + 4 * self.num_heads + 8 * self.intermediate_size

    def stored_bytes_per_patch(self, checkpointed: bool, tp: int = 1) -> int:
        """Bytes kept for backward per patch: pixels + merger + blocks (inputs only when checkpointed)."""
        h = self.hidden_size
        ends = 2 * self.patch_dim + 12 * h + 4 + 4  # pixels, merger, int64 window index + its inverse (per merged token)
        blocks = self.depth * (2 * h if checkpointed else self.block_bytes_per_patch())
        return ends + blocks

    def forward_bytes_per_patch(self, tp: int = 1) -> int:
        """Upper bound of the live tensors per patch of a no-grad pass through one block."""
        return 12 * self.hidden_size + 8 * self.intermediate_size


@dataclass(frozen=True)
class Qwen3VisionShape(_PatchGeometry):
    """Qwen3-VL's vision transformer (``vision_config``), built as Bridge's Megatron ``Qwen3VLVisionModel``:
    TP-sharded (column-parallel QKV / fc1 / merger fc1, row-parallel proj / fc2 / merger fc2; norms,
    row-parallel biases, patch and position embeddings replicated), LayerNorm blocks with a
    tanh-GELU MLP, learned position embeddings, a patch merger and one deepstack merger per
    ``deepstack_visual_indexes`` entry (LayerNorm over the merged ``4 h`` features)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    deepstack_indexes: tuple[int, ...]
    num_position_embeddings: int = 2304
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2

    @property
    def deepstack_layers(self) -> int:
        return len(self.deepstack_indexes)

    def check_layout(self, tp: int, pp: int, num_layers: int) -> None:
        """TP divides the ViT's heads; the first stage holds the layers deepstack feeds
        (:func:`~vigos_megatron.models.family.vision_layout_problem`, which the builder applies too)."""
        problem = vision_layout_problem(tp=tp, pp=pp, num_layers=num_layers, deepstack_layers=self.deepstack_layers,
                                        vit_heads=self.num_heads)
        if problem:
            raise LayoutError(problem)

    def _merger_params(self, tp: int, postshuffle: bool) -> int:
        m, o = self.hidden_size * self.patches_per_token, self.out_hidden_size
        norm = 2 * (m if postshuffle else self.hidden_size)
        return norm + o + (m * m + m + m * o) // tp

    def rank_params(self, tp: int) -> int:
        """Parameters on one TP rank (``tp = 1``: the whole tower)."""
        h, i = self.hidden_size, self.intermediate_size
        embed = self.patch_dim * h + h + self.num_position_embeddings * h
        block = 4 * h + 2 * h + (3 * h * h + 3 * h + h * h + h * i + i + i * h) // tp
        mergers = self._merger_params(tp, False) + self.deepstack_layers * self._merger_params(tp, True)
        return embed + self.depth * block + mergers

    def params(self) -> int:
        """Exact parameter count: patch embedding (with bias), position embeddings, blocks, mergers."""
        return self.rank_params(1)

    def block_bytes_per_patch(self, tp: int = 1) -> int:
        """Bytes one Megatron ViT block saves per patch for backward (bf16, the project's per-image SDPA):
        the two LayerNorms' inputs and bf16 statistics, the QKV and fc1 inputs, the fp32 rotary cos/sin
        of q and k (``16 d``), and per TP rank the rotated q, k, the attention output, the fused QKV
        output (v lives in it), the softmax statistics, the proj input, the GELU and fc2 inputs."""
        h, i, a, d = self.hidden_size, self.intermediate_size, self.num_heads, self.head_dim
        return 8 * h + 8 + 16 * d + (14 * h + 4 * a + 4 * i) // tp

    def _merger_bytes_per_patch(self, tp: int, postshuffle: bool) -> int:
        """A merger's saved bytes per patch: LayerNorm input and bf16 statistics (per patch, or per
        merged token for a deepstack merger), fc1 input, GELU and fc2 inputs per rank."""
        h = self.hidden_size
        return 2 * h + (1 if postshuffle else 4) + 2 * h + 4 * h // tp

    def stored_bytes_per_patch(self, checkpointed: bool, tp: int = 1) -> int:
        """Bytes kept for backward per patch: the pixels (``2 * patch_dim``) and the bilinear position
        indices and weights (``40``), the merger, and the blocks with their deepstack mergers. Without
        checkpointing every block's terms and each deepstack merger's (its input is the next block's
        input, counted once); checkpointed (Megatron's full recomputation of the ViT) only each
        block's input ``2 h`` and the fp32 rotary table ``4 d``, the deepstack mergers being
        recomputed inside their block. Checked exactly against the tiny model's saved tensors."""
        ends = 2 * self.patch_dim + 40 + self._merger_bytes_per_patch(tp, False)
        if checkpointed:
            return ends + 4 * self.head_dim + self.depth * 2 * self.hidden_size
        deep = self._merger_bytes_per_patch(tp, True) - 2 * self.hidden_size
        return ends + self.depth * self.block_bytes_per_patch(tp) + self.deepstack_layers * deep

    def forward_bytes_per_patch(self, tp: int = 1) -> int:
        """Upper bound of the live tensors per patch of a no-grad pass through one block."""
        h, i = self.hidden_size, self.intermediate_size
        return 12 * h + (12 * h + 4 * i) // tp


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the estimate needs (language model + vision tower of one family)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    vision: VisionShape | Qwen3VisionShape
    #: RMSNorm over each query and key head (Qwen3-VL), ``head_dim`` weights each, replicated over TP
    qk_norm: bool = False
    name: str = ""

    @classmethod
    def from_hf(cls, source, name: str = "") -> "ModelShape":
        """From a ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``, a ``config.json`` dict, a HF directory, or a
        known model name (``"qwen3_vl_8b"``, ``"qwen2_5_vl_7b"``, a bare Qwen2.5-VL size ``"7b"``)."""
        raw = _raw_config(source)
        model_type = raw.get("model_type")
        if model_type not in _FROM_HF:
            raise LayoutError(f"model: model_type {model_type!r} is not a supported family "
                              f"({', '.join(map(repr, _FROM_HF))})")
        return getattr(cls, _FROM_HF[model_type])(raw, name or (source if isinstance(source, str) else ""))

    @classmethod
    def _from_qwen3_vl(cls, raw: dict, name: str) -> "ModelShape":
        text, vis = raw["text_config"], raw["vision_config"]
        return cls(**_text_fields(text), tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                   qk_norm=True, name=name,
                   vision=Qwen3VisionShape(**_vision_fields(vis, patch_size=16),
                                           deepstack_indexes=tuple(vis.get("deepstack_visual_indexes", ())),
                                           num_position_embeddings=vis.get("num_position_embeddings", 2304)))

    @classmethod
    def _from_qwen2_5_vl(cls, raw: dict, name: str) -> "ModelShape":
        text = raw.get("text_config") or raw
        tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(**_text_fields(text), tie_word_embeddings=bool(tied), name=name,
                   vision=VisionShape(**_vision_fields(raw["vision_config"], patch_size=14)))

    # ---------------------------------------------------------------- layout checks

    def check_layout(self, tp: int, pp: int) -> None:
        """TP divides the attention heads, the KV heads and the (unpadded) vocabulary; PP the layers;
        the vision tower's own rules (:meth:`Qwen3VisionShape.check_layout`)."""
        if tp < 1 or pp < 1:
            raise LayoutError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp}, pp={pp}")
        for what, n in (("num_attention_heads", self.num_attention_heads),
                        ("num_key_value_heads", self.num_key_value_heads), ("vocab_size", self.vocab_size)):
            if n % tp:
                raise LayoutError(f"parallel.tp: {tp} does not divide the model's {what}={n}")
        if self.num_layers % pp:
            raise LayoutError(f"parallel.pp: {pp} does not divide the model's num_hidden_layers={self.num_layers}")
        self.vision.check_layout(tp, pp, self.num_layers)

    # ---------------------------------------------------------------- parameters

    @property
    def qkv_width(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def layer_params(self, tp: int = 1) -> int:
        """One transformer layer on one TP rank: QKV (bias on Qwen2.5-VL), proj, SwiGLU MLP, two RMSNorms
        and the QK-norms (replicated)."""
        h, f, q = self.hidden_size, self.ffn_hidden_size, self.qkv_width
        attn_out = self.num_attention_heads * self.head_dim
        qkv_bias = 0 if self.qk_norm else q
        return 2 * h + 2 * self.head_dim * self.qk_norm + (q * h + qkv_bias + h * attn_out + 3 * f * h) // tp

    def stage_params(self, tp: int, pp: int, stage: int, layers: int | None = None) -> tuple[int, int]:
        """``(language, vision)`` parameters on one rank of pipeline stage ``stage``, which holds ``layers``
        language-model layers (default: an even split, which :meth:`check_layout` requires)."""
        if layers is None:
            self.check_layout(tp, pp)
            layers = self.num_layers // pp
        if not 0 <= stage < pp:
            raise LayoutError(f"stage {stage} outside [0, {pp})")
        h, v = self.hidden_size, self.vocab_size // tp
        lang = layers * self.layer_params(tp)
        if stage == 0:
            lang += v * h  # word embeddings
        if stage == pp - 1:
            lang += h  # final norm
            if not self.tie_word_embeddings or pp > 1:
                lang += v * h  # output layer (a synchronised copy of the embedding when tied and PP > 1)
        vision = self.vision.rank_params(tp) if stage == 0 else 0
        return lang, vision

    def param_count(self) -> int:
        """Unique parameters of the model (what a TP=PP=1 build holds)."""
        lang, vision = self.stage_params(1, 1, 0)
        return lang + vision

    # ---------------------------------------------------------------- activations

    def _unfused_outside_core(self, spec: str) -> bool:
        """Qwen3-VL's self-attention (Bridge's ``Qwen3VLSelfAttention``) computes the local spec's causal
        attention itself, in fp32, outside the core-attention module: selective recomputation
        (``core_attn``) does not reach it."""
        return spec == "local" and self.qk_norm

    def _fp32_rope(self, spec: str) -> bool:
        """The sdpa spec's self-attention rotates query and key in fp32 (``models/specs.py``
        ``Fp32RopeSelfAttention``): fp32 rope tables, and fp32 query/key in a selective checkpoint.
        Qwen3-VL's language model takes Bridge's ``Qwen3VLSelfAttention`` and its own rope instead."""
        return spec == "sdpa" and not self.qk_norm

    def layer_bytes_per_token(self, tp: int, spec: str, recompute: str = "none") -> int:
        """Bytes autograd keeps per token in one language layer (bf16; see the module docstring)."""
        _check_choice("layer_spec", spec, LAYER_SPECS)
        _check_choice("recompute", recompute, RECOMPUTE)
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        a, g = self.num_attention_heads, self.num_key_value_heads
        if recompute == "full":
            return 2 * h
        if recompute == "selective" and self._unfused_outside_core(spec):
            recompute = "none"
        lse = 0 if recompute == "selective" else 4 * a
        # QK-norm: torch.rms_norm keeps its fp32 input and output per head, and fp32 statistics
        qk_norm = (8 * a * d + 8 * g * d + 4 * a + 4 * g) if self.qk_norm else 0
        flash_attn = 2 * a * d + 2 * g * d + 2 * (a + 2 * g) * d + lse + 2 * a * d + qk_norm
        if spec == "transformer_engine":
            return 2 * (4 * h + 4) + 8 * d + (flash_attn + 6 * f) // tp
        if self._fp32_rope(spec):  # fp32 cos/sin of query and key; a selective checkpoint's fp32 query/key
            fp32_qk = 2 * a * d + 2 * g * d if recompute == "selective" else 0
            return 2 * (10 * h + 4) + 16 * d + (flash_attn + fp32_qk + 10 * f) // tp
        if spec == "sdpa" or recompute == "selective":
            return 2 * (10 * h + 4) + 8 * d + (flash_attn + 10 * f) // tp
        fp32_path = 4 * a * d if self._unfused_outside_core(spec) else 0  # its fp32 attention output
        return 2 * (10 * h + 4) + 8 * d + (8 * a * d + fp32_path + qk_norm + 10 * f) // tp  # local, unfused

    def layer_extra_bytes(self, rows: int, seq: int, tp: int, spec: str, recompute: str = "none") -> int:
        """Bytes per layer and micro-batch that are not per token: the unfused (local) attention's
        bf16 probabilities ``[rows, a/tp, S, S]`` and its bool causal mask ``[S, S]`` (Qwen3-VL's
        fp32 path adds the fp32 probabilities, ``4 a/tp`` bytes per row, and keeps them under
        selective recomputation, which then checkpoints nothing); the int32 RNG state a selective
        checkpoint keeps."""
        fp32_path = self._unfused_outside_core(spec)
        if recompute == "full" or spec != "local" and recompute == "none":
            return 0
        if recompute == "selective" and not fp32_path:
            return 4
        a = self.num_attention_heads
        if fp32_path:
            return rows * (6 * a // tp) * seq * seq + seq * seq
        return rows * (2 * a // tp) * seq * seq + seq * seq

    def forward_bytes_per_token(self, tp: int) -> int:
        """Upper bound of the live tensors per token of a no-grad pass through one layer."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return 14 * h + (2 * self.qkv_width + 2 * self.num_attention_heads * self.head_dim + 8 * f) // tp

    def kv_bytes_per_token(self, tp: int, pp: int) -> int:
        """bf16 keys and values of one token in this stage's layers."""
        return (self.num_layers // pp) * 2 * (self.num_key_value_heads // tp) * self.head_dim * 2


def _text_fields(text: dict) -> dict:
    heads = text["num_attention_heads"]
    return dict(vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                ffn_hidden_size=text["intermediate_size"], num_layers=text["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=text["num_key_value_heads"],
                head_dim=text.get("head_dim") or text["hidden_size"] // heads)


def _vision_fields(vis: dict, patch_size: int) -> dict:
    """The vision config's sizes (``patch_size``: the family's default when the config omits it)."""
    return dict(depth=vis["depth"], hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
                num_heads=vis["num_heads"], out_hidden_size=vis["out_hidden_size"],
                in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
                patch_size=vis.get("patch_size", patch_size), temporal_patch_size=vis.get("temporal_patch_size", 2),
                spatial_merge_size=vis.get("spatial_merge_size", 2))


#: HF model_type -> ModelShape constructor
_FROM_HF = {"qwen2_5_vl": "_from_qwen2_5_vl", "qwen3_vl": "_from_qwen3_vl"}


def _raw_config(source) -> dict:
    if isinstance(source, dict):
        return source
    if isinstance(source, str):
        from vigos_megatron.models.hf_configs import known_config_values, known_model_names

        known = known_config_values(source)
        if known is not None:
            return known[0]
        p = Path(source)
        if (p / "config.json").is_file():
            return json.loads((p / "config.json").read_text())
        raise LayoutError(f"model: {source!r} is neither a known model ({', '.join(known_model_names())}) "
                          f"nor a directory with a config.json")
    if isinstance(source, Path):
        return _raw_config(str(source))
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise LayoutError(f"model: cannot read a Qwen VL config from {type(source).__name__}")


def as_model_shape(model) -> ModelShape:
    return model if isinstance(model, ModelShape) else ModelShape.from_hf(model)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise LayoutError(f"{name}: must be one of {choices}, got {value!r}")
