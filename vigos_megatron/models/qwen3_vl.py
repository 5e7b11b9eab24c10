"""Qwen3-VL (dense): the family's differences (:class:`~vigos_megatron.models.family.ModelFamily`).

Built with Megatron-Bridge's ``Qwen3VLModelProvider``, ``Qwen3VLModel`` and ``Qwen3VLBridge``
mappings: a Megatron vision transformer (TP-sharded; learned position embeddings interpolated to
the image grid, 2-D rotary, patch merger) whose layers ``deepstack_visual_indexes`` also feed a
"deepstack" merger each; a ``Qwen3VLGPTModel`` language model (QK-norm, interleaved mrope,
``Qwen3VLSelfAttention`` applying per-token rotary frequencies) that adds deepstack feature ``k``
to the output of its layer ``k`` at the image tokens. Processor patch 16, spatial merge 2: image
sides are multiples of 32 pixels.

**Layer specs.** Bridge 0.6.2's ``Qwen3VLModelProvider.provide`` always uses Transformer
Engine's layer spec for the language model and ``Qwen3VLModel.__init__`` TE's ViT spec and TE
norm/linears in the mergers. :class:`Qwen3VLSpecProvider` (this module, the one place that
adapts it) keeps Bridge's classes and builds them with the project's specs when
``layer_impl`` is ``local`` or ``sdpa``:

* language model: megatron-core's local GPT layer spec (``local``: core attention
  ``DotProductAttention``, for which ``Qwen3VLSelfAttention`` runs its own causal fp32 path) or
  :func:`~vigos_megatron.models.specs.get_gpt_layer_sdpa_spec` (``sdpa``), both with QK-norm;
* vision transformer: megatron-core's local ViT spec with
  :class:`~vigos_megatron.models.specs.SegmentSDPAAttention` (attention within each image; Bridge
  packs the images as THD segments), local column/row-parallel linears and torch LayerNorm in the
  mergers.

The model is ``Qwen3VLModel`` built without its encoder, then given the vision model built from
the same Bridge classes with those specs (``add_encoder`` set back to true): parameter names are
Bridge's, so ``Qwen3VLBridge``'s mappings (with their local-norm aliases) and distributed
checkpoints apply unchanged. With ``transformer_engine`` Bridge's own ``provide`` runs.

**Layout.** Bridge consumes every deepstack feature on the first pipeline stage: the first
stage must hold at least ``len(deepstack_visual_indexes)`` language-model layers
(:meth:`Qwen3VLFamily.check_layout` refuses a layout that does not, naming it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from vigos_megatron.models.family import FamilyBase, ImageFeatures, vision_layout_problem


@functools.lru_cache(maxsize=1)
def _provider_class():
    """:class:`Qwen3VLSpecProvider`, defined on first use (megatron-bridge imports only after
    :mod:`vigos_megatron.platform` has adapted the libraries); pickle finds it by name through the
    module's ``__getattr__`` (Bridge's weight export broadcasts the provider across pipeline stages)."""
    from megatron.bridge.models.qwen_vl.qwen3_vl_provider import Qwen3VLModelProvider

    @dataclass
    class Qwen3VLSpecProvider(Qwen3VLModelProvider):
        """Bridge's Qwen3-VL provider building the language model and the ViT with the project's specs.

        ``layer_impl``: ``local`` / ``sdpa`` (module docstring) or ``transformer_engine`` (Bridge's
        ``provide`` unchanged).
        """

        layer_impl: str = "transformer_engine"

        def provide(self, pre_process=None, post_process=None, vp_stage=None):
            if self.layer_impl == "transformer_engine":
                model = super().provide(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
                if model.vision_model is not None:
                    _exact_gelu_mergers(model.vision_model)
                return model
            from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.model import Qwen3VLModel

            model = Qwen3VLModel(
                language_transformer_config=self,
                language_transformer_layer_spec=_language_layer_spec(self.layer_impl),
                vision_transformer_config=self.vision_config,
                pre_process=pre_process,
                post_process=post_process,
                pg_collection=self._pg_collection,
                add_encoder=False,
                add_decoder=self.add_decoder,
            )
            if pre_process and self.add_encoder:
                model.add_encoder = True
                model.vision_model = _vision_model(self, model.pg_collection)
            if self.freeze_language_model or self.freeze_vision_model or self.freeze_vision_projection:
                model.freeze(freeze_language_model=self.freeze_language_model,
                             freeze_vision_model=self.freeze_vision_model,
                             freeze_vision_projection=self.freeze_vision_projection)
            return model

    Qwen3VLSpecProvider.__qualname__ = Qwen3VLSpecProvider.__name__
    return Qwen3VLSpecProvider


def __getattr__(name: str):
    if name == "Qwen3VLSpecProvider":
        return _provider_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _language_layer_spec(layer_impl: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from vigos_megatron.models.specs import get_gpt_layer_sdpa_spec

    if layer_impl == "sdpa":
        return get_gpt_layer_sdpa_spec(normalization="RMSNorm", qk_layernorm=True)
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)


def _vision_model(provider, pg_collection):
    """Bridge's ``Qwen3VLVisionModel`` with the local ViT spec and local mergers (module docstring)."""
    from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.attention import Qwen3VLSelfAttention
    from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.transformer_config import get_vision_model_config
    from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.utils import PatchMergerSubmodules
    from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.vision_model import Qwen3VLVisionModel
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from vigos_megatron.models.specs import get_vit_layer_sdpa_spec

    layer_spec = get_vit_layer_sdpa_spec()
    layer_spec.submodules.self_attention.module = Qwen3VLSelfAttention
    config = get_vision_model_config(provider.vision_config, megatron_config=provider)
    config.pipeline_model_parallel_size = 1
    config.first_pipeline_num_layers = None
    config.perform_initialization = provider.perform_initialization
    config.params_dtype = provider.params_dtype
    merger = PatchMergerSubmodules(patch_norm=WrappedTorchNorm, linear_fc1=ColumnParallelLinear,
                                   linear_fc2=RowParallelLinear)
    return _exact_gelu_mergers(Qwen3VLVisionModel(config, layer_spec, merger, pre_process=True, post_process=True,
                                                  pg_collection=pg_collection))


def _exact_gelu_mergers(vision_model):
    """HF's patch mergers (``Qwen3VLVisionPatchMerger``: ``nn.GELU()``) use the exact erf GELU; Bridge's
    read the ViT config's activation, the tanh approximation of the ViT MLPs. Each merger gets its
    own copy of the config with ``activation_func = F.gelu`` (the ViT layers keep theirs)."""
    import copy

    import torch.nn.functional as F

    for merger in [vision_model.merger, *vision_model.decoder.deepstack_merger_list]:
        merger.config = copy.copy(merger.config)
        merger.config.activation_func = F.gelu
        merger.activation_func = F.gelu
    return vision_model


class Qwen3VLFamily(FamilyBase):
    display_name = "Qwen3-VL"
    #: the HF key layout Bridge's mappings name (vigos_megatron.models.hf_checkpoint)
    bridge_key_layout = "current"
    model_type = "qwen3_vl"

    def hf_config_class(self):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    def hf_model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def check_layout(self, hf_config, *, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                     first_stage_layers: int) -> None:
        """Deepstack needs its layers on the first stage; the ViT's heads shard over TP
        (:func:`~vigos_megatron.models.family.vision_layout_problem`)."""
        from vigos_megatron.models.builder import ModelBuildError

        problem = vision_layout_problem(tp=tensor_model_parallel_size, pp=pipeline_model_parallel_size,
                                        num_layers=hf_config.text_config.num_hidden_layers,
                                        deepstack_layers=len(hf_config.vision_config.deepstack_visual_indexes),
                                        vit_heads=hf_config.vision_config.num_heads,
                                        first_stage_layers=first_stage_layers)
        if problem:
            raise ModelBuildError(problem)

    def configure_provider(self, provider, hf_config, transformer_impl: str):
        """:class:`Qwen3VLSpecProvider` with Bridge's settings and ``layer_impl`` = the impl."""
        from vigos_megatron.models.builder import apply_local_settings

        cls = _provider_class()
        values = {f.name: getattr(provider, f.name) for f in fields(provider) if f.init and hasattr(provider, f.name)}
        out = cls(**values, layer_impl=transformer_impl)
        if transformer_impl in ("local", "sdpa"):
            apply_local_settings(out)
            out.transformer_layer_spec = None  # unused: provide() picks the spec from layer_impl
        return out

    def vision_tower(self, model) -> torch.nn.Module:
        return model.vision_model

    def recompute_vision(self, model) -> None:
        """Nothing to do: the Megatron ViT takes the provider's recompute settings (``get_vision_model_config``)."""

    def image_features(self, model, pixel_values: Tensor, grid_thw: Tensor) -> list[ImageFeatures]:
        """The vision transformer, merger and deepstack mergers on the images ``grid_thw`` ``[m, 3]``
        describes, in one call (each image attends within itself); ``pixel_values``
        ``[sum_i t_i*h_i*w_i, C*T*P*P]``. One :class:`ImageFeatures` (with deepstack) per image."""
        embeds, deep = model.vision_model(hidden_states=pixel_values, grid_thw=grid_thw)
        sizes = (grid_thw.prod(-1) // model.square_merge_size).tolist()
        per_layer = [torch.split(d, sizes) for d in deep]
        return [ImageFeatures(e, tuple(d[i] for d in per_layer)) for i, e in enumerate(torch.split(embeds, sizes))]

    def rope_index(self, model, input_ids: Tensor, grid_thw: Tensor | None) -> Tensor:
        """Interleaved-mrope position ids ``[3, n, S]`` of rows ``input_ids`` ``[n, S]`` (Bridge's ``get_rope_index``).

        ``model``: a Megatron chunk (its config is the provider) or HF's ``Qwen3VLModel`` (the warm
        start passes the positions the Megatron student uses to the HF model)."""
        from megatron.bridge.models.qwen_vl.modelling_qwen3_vl.rope import get_rope_index

        cfg = model.config
        merge = getattr(cfg, "spatial_merge_size", None) or cfg.vision_config.spatial_merge_size
        pos, _ = get_rope_index(merge, cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, input_ids,
                                image_grid_thw=grid_thw)
        return pos


FAMILY = Qwen3VLFamily()
