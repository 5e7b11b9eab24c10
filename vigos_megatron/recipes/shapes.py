"""The model shapes the memory estimate (:mod:`vigos_megatron.recipes.memory`) works on: parameter
counts and per-layer activation bytes of Qwen2.5-VL's language model and vision tower, read from a
Hugging Face ``config.json`` (or built for the known sizes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vigos_megatron.errors import UserError

LAYER_SPECS = ("local", "sdpa", "transformer_engine")
RECOMPUTE = ("none", "selective", "full")


class LayoutError(UserError, ValueError):
    """A parallel layout that the model or the batch cannot take; the message names the option."""

    hint = "choose another layout or more GPUs"


@dataclass(frozen=True)
class VisionShape:
    """Qwen2.5-VL's HF vision tower (``vision_config``)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_token(self) -> int:
        return self.spatial_merge_size**2

    def params(self) -> int:
        """Exact parameter count: patch embedding (no bias), blocks, patch merger."""
        h, i = self.hidden_size, self.intermediate_size
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
        m = h * self.patches_per_token
        merger = h + (m * m + m) + (m * self.out_hidden_size + self.out_hidden_size)
        return self.patch_dim * h + self.depth * block + merger

    def block_bytes_per_patch(self) -> int:
        """Bytes autograd saves per patch in one block (bf16, SDPA attention)."""
        h = self.hidden_size
        return 30 * h + 8 + 8 * self.head_dim + 4 * self.num_heads + 8 * self.intermediate_size

    def stored_bytes_per_patch(self, checkpointed: bool) -> int:
        """Bytes kept for backward per patch: pixels + merger + blocks (inputs only when checkpointed)."""
        h = self.hidden_size
        ends = 2 * self.patch_dim + 12 * h + 4 + 4  # pixels, merger, int64 window index + its inverse (per merged token)
        blocks = self.depth * (2 * h if checkpointed else self.block_bytes_per_patch())
        return ends + blocks

    def forward_bytes_per_patch(self) -> int:
        """Upper bound of the live tensors per patch of a no-grad pass through one block."""
        return 12 * self.hidden_size + 8 * self.intermediate_size


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the estimate needs (Qwen2.5-VL language model + vision tower)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    vision: VisionShape
    name: str = ""

    @classmethod
    def from_hf(cls, source, name: str = "") -> "ModelShape":
        """From a ``Qwen2_5_VLConfig``, a ``config.json`` dict, a HF directory, or a size name ("7b")."""
        raw = _raw_config(source)
        text = raw.get("text_config") or raw
        vis = raw["vision_config"]
        heads = text["num_attention_heads"]
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            ffn_hidden_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision=VisionShape(
                depth=vis["depth"],
                hidden_size=vis["hidden_size"],
                intermediate_size=vis["intermediate_size"],
                num_heads=vis["num_heads"],
                out_hidden_size=vis["out_hidden_size"],
                in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
                patch_size=vis.get("patch_size", 14),
                temporal_patch_size=vis.get("temporal_patch_size", 2),
                spatial_merge_size=vis.get("spatial_merge_size", 2),
            ),
            name=name or (source if isinstance(source, str) else ""),
        )

    # ---------------------------------------------------------------- layout checks

    def check_layout(self, tp: int, pp: int) -> None:
        """TP divides the attention heads, the KV heads and the (unpadded) vocabulary; PP the layers."""
        if tp < 1 or pp < 1:
            raise LayoutError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp}, pp={pp}")
        for what, n in (("num_attention_heads", self.num_attention_heads),
                        ("num_key_value_heads", self.num_key_value_heads), ("vocab_size", self.vocab_size)):
            if n % tp:
                raise LayoutError(f"parallel.tp: {tp} does not divide the model's {what}={n}")
        if self.num_layers % pp:
            raise LayoutError(f"parallel.pp: {pp} does not divide the model's num_hidden_layers={self.num_layers}")

    # ---------------------------------------------------------------- parameters

    @property
    def qkv_width(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def layer_params(self, tp: int = 1) -> int:
        """One transformer layer on one TP rank: QKV (+bias), proj, SwiGLU MLP, two RMSNorms (replicated)."""
        h, f, q = self.hidden_size, self.ffn_hidden_size, self.qkv_width
        attn_out = self.num_attention_heads * self.head_dim
        return 2 * h + (q * h + q + h * attn_out + 3 * f * h) // tp

    def stage_params(self, tp: int, pp: int, stage: int) -> tuple[int, int]:
        """``(language, vision)`` parameters on one rank of pipeline stage ``stage``."""
        self.check_layout(tp, pp)
        if not 0 <= stage < pp:
            raise LayoutError(f"stage {stage} outside [0, {pp})")
        h, v = self.hidden_size, self.vocab_size // tp
        lang = self.num_layers // pp * self.layer_params(tp)
        if stage == 0:
            lang += v * h  # word embeddings
        if stage == pp - 1:
            lang += h  # final norm
            if not self.tie_word_embeddings or pp > 1:
                lang += v * h  # output layer (a synchronised copy of the embedding when tied and PP > 1)
        vision = self.vision.params() if stage == 0 else 0
        return lang, vision

    def param_count(self) -> int:
        """Unique parameters of the model (what a TP=PP=1 build holds)."""
        lang, vision = self.stage_params(1, 1, 0)
        return lang + vision

    # ---------------------------------------------------------------- activations

    def layer_bytes_per_token(self, tp: int, spec: str, recompute: str = "none") -> int:
        """Bytes autograd keeps per token in one language layer (bf16; see the module docstring)."""
        _check_choice("layer_spec", spec, LAYER_SPECS)
        _check_choice("recompute", recompute, RECOMPUTE)
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        a, g = self.num_attention_heads, self.num_key_value_heads
        if recompute == "full":
            return 2 * h
        lse = 0 if recompute == "selective" else 4 * a
        flash_attn = 2 * a * d + 2 * g * d + 2 * (a + 2 * g) * d + lse + 2 * a * d
        if spec == "transformer_engine":
            return 2 * (4 * h + 4) + 8 * d + (flash_attn + 6 * f) // tp
        if spec == "sdpa" or recompute == "selective":
            return 2 * (10 * h + 4) + 8 * d + (flash_attn + 10 * f) // tp
        return 2 * (10 * h + 4) + 8 * d + (8 * a * d + 10 * f) // tp  # local, unfused attention

    def layer_extra_bytes(self, rows: int, seq: int, tp: int, spec: str, recompute: str = "none") -> int:
        """Bytes per layer and micro-batch that are not per token: the unfused (local) attention's
        bf16 probabilities ``[rows, a/tp, S, S]`` and its bool causal mask ``[S, S]``; the int32 RNG
        state a selective checkpoint keeps."""
        if recompute == "selective":
            return 4
        if spec != "local" or recompute != "none":
            return 0
        return rows * (2 * self.num_attention_heads // tp) * seq * seq + seq * seq

    def forward_bytes_per_token(self, tp: int) -> int:
        """Upper bound of the live tensors per token of a no-grad pass through one layer."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return 14 * h + (2 * self.qkv_width + 2 * self.num_attention_heads * self.head_dim + 8 * f) // tp

    def kv_bytes_per_token(self, tp: int, pp: int) -> int:
        """bf16 keys and values of one token in this stage's layers."""
        return (self.num_layers // pp) * 2 * (self.num_key_value_heads // tp) * self.head_dim * 2


def _raw_config(source) -> dict:
    if isinstance(source, dict):
        return source
    if isinstance(source, str):
        from vigos_megatron.models.hf_configs import QWEN2_5_VL_SIZES, qwen2_5_vl_values

        if source.lower() in QWEN2_5_VL_SIZES:
            return qwen2_5_vl_values(source)
        p = Path(source)
        if (p / "config.json").is_file():
            return json.loads((p / "config.json").read_text())
        raise LayoutError(f"model: {source!r} is neither a Qwen2.5-VL size ({', '.join(QWEN2_5_VL_SIZES)}) "
                          f"nor a directory with a config.json")
    if isinstance(source, Path):
        return _raw_config(str(source))
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise LayoutError(f"model: cannot read a Qwen2.5-VL config from {type(source).__name__}")


def as_model_shape(model) -> ModelShape:
    return model if isinstance(model, ModelShape) else ModelShape.from_hf(model)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise LayoutError(f"{name}: must be one of {choices}, got {value!r}")
