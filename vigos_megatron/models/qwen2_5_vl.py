"""Qwen2.5-VL: the family's differences (:class:`~vigos_megatron.models.family.ModelFamily`).

Built with Megatron-Bridge's ``Qwen25VLModelProvider`` and ``Qwen25VLModel``: the HF vision
tower (window attention, 2-D rotary, merger), replicated on every tensor-parallel rank of the
first pipeline stage, then a Megatron ``GPTModel`` with mrope (sections ``[t, h, w]`` in
contiguous blocks). No deepstack. The processor's patch is 14 and its spatial merge 2: image
sides are resized to multiples of 28 pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vigos_megatron.models.family import FamilyBase, ImageFeatures


class Qwen25VLFamily(FamilyBase):
    display_name = "Qwen2.5-VL"
    #: the HF key layout Bridge's mappings name (vigos_megatron.models.hf_checkpoint)
    bridge_key_layout = "hub"
    model_type = "qwen2_5_vl"

    def hf_config_class(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    def hf_model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def check_layout(self, hf_config, *, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                     first_stage_layers: int) -> None:
        """Nothing beyond the checks every family shares (heads, layers, vocabulary)."""

    def configure_provider(self, provider, hf_config, transformer_impl: str):
        """Bridge's provider, with the project's layer spec (``local`` / ``sdpa``) set on it."""
        from vigos_megatron.models.builder import apply_local_settings, apply_sdpa_settings

        if transformer_impl == "local":
            apply_local_settings(provider)
        elif transformer_impl == "sdpa":
            apply_sdpa_settings(provider)
        return provider

    def vision_tower(self, model) -> torch.nn.Module:
        return model.visual

    def recompute_vision(self, model) -> None:
        """Full recomputation: the HF tower is outside megatron's recompute, it checkpoints itself."""
        model.visual.gradient_checkpointing_enable()

    def image_features(self, model, pixel_values: Tensor, grid_thw: Tensor) -> list[ImageFeatures]:
        """The HF tower with its merger on the images ``grid_thw`` ``[m, 3]`` describes, in one call;
        ``pixel_values`` ``[sum_i t_i*h_i*w_i, C*T*P*P]``. One :class:`ImageFeatures` per image."""
        out = model.get_image_features(pixel_values, grid_thw, return_dict=True).pooler_output
        return [ImageFeatures(e) for e in out]

    def rope_index(self, model, input_ids: Tensor, grid_thw: Tensor | None) -> Tensor:
        """mrope position ids ``[3, n, S]`` of rows ``input_ids`` ``[n, S]`` (``grid_thw``: one line per image, in order)."""
        cfg = model.config
        mm = torch.zeros_like(input_ids, dtype=torch.int)
        mm[input_ids == cfg.image_token_id] = 1
        mm[input_ids == cfg.video_token_id] = 2
        pos, _ = model.get_rope_index(input_ids, mm, grid_thw, None, second_per_grid_ts=None, attention_mask=None)
        return pos


FAMILY = Qwen25VLFamily()
