"""Model families: what differs between Qwen2.5-VL and Qwen3-VL, behind one interface.

The builder (:mod:`vigos_megatron.models.builder`), the training stage
(:mod:`vigos_megatron.models.stage_forward`), the rollout engine and the converters call a
:class:`ModelFamily`; nothing else branches on the family. One module per family implements it:

* :mod:`vigos_megatron.models.qwen2_5_vl` - HF vision tower (replicated over TP) in Bridge's
  ``Qwen25VLModel``, mrope with sections [t, h, w] in blocks, patch 14 (image sides in units of
  28 pixels);
* :mod:`vigos_megatron.models.qwen3_vl` - Megatron vision transformer (TP-sharded) in Bridge's
  ``Qwen3VLModel``, deepstack (features of some vision layers added to the first language-model
  layers' outputs at the image tokens), interleaved mrope, patch 16 (units of 32 pixels).

A family is looked up by the HF ``model_type`` (:func:`family_for_type`), by a HF config
(:func:`family_for_config`) or by a built model chunk (:func:`family_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the config imports this module without torch (the launcher stays light)
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class ImageFeatures:
    """One image's features for the language model.

    ``embeds`` ``[tokens, H]`` replace the image's ``<|image_pad|>`` embeddings (``tokens`` =
    ``t*h*w / merge**2``); ``deepstack`` holds one ``[tokens, H]`` tensor per deepstack layer
    ``k``, added to the output of language-model layer ``k`` at the same positions (empty for a
    family without deepstack).
    """

    embeds: Tensor
    deepstack: tuple[Tensor, ...] = ()


class ModelFamily(Protocol):
    """What a model family provides (see the module docstring)."""

    #: HF ``config.json`` ``model_type``
    model_type: str
    #: the family's name in messages ("Qwen2.5-VL")
    display_name: str
    #: the HF key layout (``hub`` / ``current``, :mod:`vigos_megatron.models.hf_checkpoint`) Bridge's mappings name
    bridge_key_layout: str
    #: pixels per merged vision token along a side (patch_size * spatial_merge_size)
    def pixel_unit(self, hf_config) -> int: ...
    def hf_config_class(self) -> type: ...
    def hf_model_class(self) -> type: ...
    def check_layout(self, hf_config, *, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                     first_stage_layers: int) -> None: ...
    def configure_provider(self, provider, hf_config, transformer_impl: str):
        """Return the provider to build with (may be a family subclass), configured for the impl."""
    def vision_tower(self, model) -> torch.nn.Module: ...
    def recompute_vision(self, model) -> None:
        """Activation recomputation of the vision tower under ``model.recompute: full``."""
    def image_features(self, model, pixel_values: Tensor, grid_thw: Tensor) -> list[ImageFeatures]: ...
    def rope_index(self, model, input_ids: Tensor, grid_thw: Tensor | None) -> Tensor: ...


class FamilyBase:
    """What every family computes the same way from its HF config."""

    def pixel_unit(self, hf_config) -> int:
        return pixel_unit_of(hf_config.vision_config.to_dict())


def pixel_unit_of(vision_config: dict) -> int:
    """Pixels per language-model image token along a side: ``patch_size * spatial_merge_size`` of a HF
    ``vision_config`` (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
    return int(vision_config["patch_size"]) * int(vision_config["spatial_merge_size"])


def vision_layout_problem(*, tp: int, pp: int, num_layers: int, deepstack_layers: int = 0,
                          vit_heads: int | None = None, first_stage_layers: int | None = None) -> str | None:
    """Why a ``tp`` x ``pp`` layout cannot hold the vision side, as one line naming the option; None if it can.

    * deepstack: Bridge adds deepstack feature ``k`` after language-model layer ``k`` on the first
      pipeline stage, so the first stage (``first_stage_layers``, default ``num_layers // pp``) must hold
      at least ``deepstack_layers`` (``len(vision_config.deepstack_visual_indexes)``) layers;
    * a TP-sharded vision transformer (Qwen3-VL's; ``vit_heads`` = its ``num_heads``, None for a
      replicated tower): ``tp`` divides its heads.

    The one home of these rules: the builder, the configuration check before any process group
    (:func:`vigos_megatron.config.train.validate_layout`) and the recipes' shapes raise their own
    error with this message.
    """
    first = num_layers // pp if first_stage_layers is None else first_stage_layers
    if deepstack_layers > first:
        return (f"parallel.pp: {pp} leaves {first} language-model layers (of {num_layers}) on the first pipeline "
                f"stage, fewer than the {deepstack_layers} deepstack layers (vision_config.deepstack_visual_indexes), "
                f"which must all be there; use pp <= {num_layers // deepstack_layers}"
                + ("" if first_stage_layers is None else " or more layers on the first stage"))
    if vit_heads is not None and vit_heads % tp:
        return (f"parallel.tp: {tp} does not divide the vision transformer's num_heads={vit_heads} "
                f"(the vision transformer is TP-sharded)")
    return None


#: supported HF model types -> family module (imported on first use)
_FAMILY_MODULES = {
    "qwen2_5_vl": "vigos_megatron.models.qwen2_5_vl",
    "qwen3_vl": "vigos_megatron.models.qwen3_vl",
}

#: model types recognised but refused, with the reason shown to the user
_REFUSED = {
    "qwen3_vl_moe": "Qwen3-VL MoE (30B-A3B, 235B-A22B) is not supported",
    "qwen3_5_vl": "Qwen3.5-VL is not supported",
    "qwen3_5_vl_moe": "Qwen3.5-VL MoE is not supported",
    "qwen2_vl": "Qwen2-VL is not supported",
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_FAMILY_MODULES)


def family_for_type(model_type: str | None, *, where: str = "config.json") -> ModelFamily:
    """The family of HF ``model_type``; a :class:`~vigos_megatron.models.builder.ModelBuildError` naming ``where`` otherwise."""
    import importlib

    from vigos_megatron.models.builder import ModelBuildError

    supported = ", ".join(repr(t) for t in _FAMILY_MODULES)
    if model_type in _REFUSED:
        raise ModelBuildError(f"{where}: model_type {model_type!r}: {_REFUSED[model_type]} (supported: {supported})")
    if model_type not in _FAMILY_MODULES:
        raise ModelBuildError(f"{where}: model_type is {model_type!r}; supported: {supported} (Qwen2.5-VL, Qwen3-VL dense)")
    return importlib.import_module(_FAMILY_MODULES[model_type]).FAMILY


def family_for_config(hf_config) -> ModelFamily:
    return family_for_type(getattr(hf_config, "model_type", None), where=type(hf_config).__name__)


def family_of(model) -> ModelFamily:
    """The family of a built model chunk (Bridge's ``Qwen25VLModel`` / ``Qwen3VLModel``), unwrapping DDP/Float16 wrappers."""
    m = model
    while not hasattr(m, "language_model") and hasattr(m, "module"):
        m = m.module
    model_type = getattr(m, "vigos_model_type", None)
    if model_type is None:
        raise TypeError(f"{type(model).__name__} was not built by QwenVLBuilder (no family tag)")
    return family_for_type(model_type)
