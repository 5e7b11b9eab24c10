"""Qwen VL models on Megatron-Core, built with Megatron-Bridge's providers, models and weight mappings.

Nothing here re-implements a model: :class:`QwenVLBuilder` wraps ``megatron.bridge.AutoBridge``
(Qwen2.5-VL: ``Qwen25VLModelProvider`` / ``Qwen25VLModel``; Qwen3-VL: ``Qwen3VLModelProvider`` /
``Qwen3VLModel``); what differs between the families lives in their modules behind
:class:`~vigos_megatron.models.family.ModelFamily` (:mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`). The
builder fixes what megatron-bridge 0.6.2 leaves to the caller, for every family:

* ``mrope_section`` is taken from the HF config (the provider keeps [16, 24, 24]);
* the vocabulary is never padded: ``vocab_size % tensor_model_parallel_size == 0`` is
  required (Qwen2.5-VL's 151,936 and 152,064 divide by up to 128), so checkpoint shapes
  never depend on TP;
* CPU-friendly settings when Transformer Engine is absent: megatron-core's local layer
  spec, local attention, every fusion off, fp32, CPU initialisation; with TE installed
  (``transformer_impl`` "auto" or "transformer_engine") the TE layer spec and fused kernels.

Sharding of the resulting model chunks (per pipeline stage): vision tower on stage 0 (Qwen2.5-VL:
full on every TP rank; Qwen3-VL: TP-sharded like the language model); embedding ``[V/TP, H]``; QKV ``[(nq+2*nkv)*d/TP, H]``; fc1 ``[2*F/TP, H]``;
proj ``[H, nq*d/TP]``; fc2 ``[H, F/TP]``; output layer ``[V/TP, H]``; norms replicated.
Logits come out ``[B, S, V/TP]`` (vocabulary-sharded).

Call :func:`vigos_megatron.platform.activate` and initialise megatron ``parallel_state``
(e.g. :func:`vigos_megatron.testing.distributed.init_gloo` or
:func:`vigos_megatron.startup.local_model_parallel`) before building.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vigos_megatron.errors import UserError

class ModelBuildError(UserError, ValueError):
    """The checkpoint or the requested layout cannot be built; the message says why."""

    hint = "choose a layout or model that fits (parallel.tp, parallel.pp, the checkpoint)"


# --------------------------------------------------------------------------- HF config


def load_hf_config(source):
    """The HF config of a supported family (:mod:`vigos_megatron.models.family`) from a config
    object or a HF directory; anything else is refused naming the file and what is supported."""
    from vigos_megatron.models.family import family_for_config, family_for_type

    if not isinstance(source, (str, Path)):
        family = family_for_config(source)
        if not getattr(source, "architectures", None):
            source.architectures = [family.hf_model_class().__name__]  # AutoBridge dispatches on it
        return source
    path = Path(source)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelBuildError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelBuildError(f"{cfg_file}: invalid JSON ({e})") from None
    family = family_for_type(raw.get("model_type"), where=str(cfg_file))
    return family.hf_config_class().from_pretrained(path)


def mrope_section_of(hf_config) -> list[int]:
    """The multimodal rope section [t, h, w] (in rotary frequency pairs) from the HF text config."""
    text = hf_config.text_config
    for holder in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None)):
        if isinstance(holder, dict) and holder.get("mrope_section"):
            return list(holder["mrope_section"])
    raise ModelBuildError("HF config has no text_config.rope_parameters['mrope_section']")


def check_vocab_divisible(vocab_size: int, tensor_model_parallel_size: int) -> None:
    """The vocabulary is never padded: it must divide by TP."""
    if vocab_size % tensor_model_parallel_size != 0:
        raise ModelBuildError(
            f"vocab_size {vocab_size} is not divisible by tensor_model_parallel_size {tensor_model_parallel_size}; "
            "the vocabulary is not padded (checkpoint shapes must not depend on TP): choose a TP size that divides it"
        )


def check_heads_divisible(hf_config, tensor_model_parallel_size: int) -> None:
    text = hf_config.text_config
    for name in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(text, name)
        if n % tensor_model_parallel_size != 0:
            raise ModelBuildError(f"text_config.{name}={n} is not divisible by tensor_model_parallel_size "
                                  f"{tensor_model_parallel_size}")


# --------------------------------------------------------------------------- TE detection


def transformer_engine_available() -> bool:
    """True when a real Transformer Engine (not the platform stand-in) is importable and CUDA is present."""
    import importlib.util
    import sys

    from vigos_megatron import platform, runtime

    mod = sys.modules.get("transformer_engine")
    if mod is not None:
        return not platform.is_te_standin(mod) and runtime.use_cuda()
    return importlib.util.find_spec("transformer_engine") is not None and runtime.use_cuda()


def resolve_transformer_impl(transformer_impl: str) -> str:
    """"auto" -> "transformer_engine" when TE is usable; else "sdpa" on a GPU
    (:func:`vigos_megatron.runtime.use_cuda`) and "local" on the CPU. "local" and "sdpa"
    (:mod:`vigos_megatron.models.specs`) can be asked for anywhere."""
    from vigos_megatron import runtime

    if transformer_impl == "auto":
        if transformer_engine_available():
            return "transformer_engine"
        return "sdpa" if runtime.use_cuda() else "local"
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ModelBuildError("transformer_impl='transformer_engine' but Transformer Engine (with CUDA) is not available")
    if transformer_impl not in ("local", "sdpa", "transformer_engine"):
        raise ModelBuildError(
            f"transformer_impl: unknown value {transformer_impl!r} (auto, local, sdpa, transformer_engine)"
        )
    return transformer_impl


# --------------------------------------------------------------------------- builder


@dataclass
class QwenVLBuilder:
    """An AutoBridge plus the configured provider for one Qwen VL model and layout.

    ``bridge.load_hf_weights(chunks, hf_dir)`` / ``bridge.export_hf_weights(chunks)`` are
    megatron-bridge's declarative mappings (``Qwen25VLBridge`` / ``Qwen3VLBridge``
    ``.mapping_registry``).
    """

    hf_config: object
    bridge: object
    provider: object
    transformer_impl: str

    @classmethod
    def from_hf(
        cls,
        source,
        *,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        dtype: torch.dtype = torch.float32,
        transformer_impl: str = "auto",
        recompute: str = "none",
        pipeline_layers: list[int] | None = None,
    ) -> "QwenVLBuilder":
        """``source``: a HF directory or a ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``.

        ``pipeline_layers``: the language-model layers of each pipeline stage (uneven only at the
        first and last stage, :func:`vigos_megatron.config.teacher.stage_layers`); ``None``: an even
        split, which the layer count must allow.

        ``recompute``: activation recomputation of the language model's layers in training mode
        (``"none"``, ``"selective"``: core attention, ``"full"``: every layer's input, one layer per
        unit). Modules in eval mode (the frozen teacher, generation) never recompute.
        """
        from vigos_megatron import platform

        platform.activate()
        from megatron.bridge import AutoBridge

        from vigos_megatron.models.family import family_for_config

        hf_config = load_hf_config(source)
        family = family_for_config(hf_config)
        check_vocab_divisible(hf_config.text_config.vocab_size, tensor_model_parallel_size)
        check_heads_divisible(hf_config, tensor_model_parallel_size)
        n_layers = hf_config.text_config.num_hidden_layers
        if pipeline_layers is None:
            if n_layers % pipeline_model_parallel_size != 0:
                raise ModelBuildError(
                    f"num_hidden_layers={n_layers} is not divisible by pipeline_model_parallel_size "
                    f"{pipeline_model_parallel_size}"
                )
            pipeline_layers = [n_layers // pipeline_model_parallel_size] * pipeline_model_parallel_size
        else:
            from vigos_megatron.config.teacher import stage_layers

            try:
                pipeline_layers = stage_layers(n_layers, pipeline_model_parallel_size, pipeline_layers)
            except ValueError as e:
                raise ModelBuildError(str(e)) from None
        family.check_layout(hf_config, tensor_model_parallel_size=tensor_model_parallel_size,
                            pipeline_model_parallel_size=pipeline_model_parallel_size,
                            first_stage_layers=pipeline_layers[0])
        impl = resolve_transformer_impl(transformer_impl)

        bridge = AutoBridge.from_hf_config(hf_config)
        provider = bridge.to_megatron_provider(load_weights=False)
        provider.tensor_model_parallel_size = tensor_model_parallel_size
        provider.pipeline_model_parallel_size = pipeline_model_parallel_size
        provider.sequence_parallel = False
        provider.context_parallel_size = 1
        from vigos_megatron.config.teacher import provider_split

        for key, value in provider_split(pipeline_layers).items():
            setattr(provider, key, value)
        provider.mrope_section = mrope_section_of(hf_config)
        provider.should_pad_vocab = False
        provider.vocab_size = hf_config.text_config.vocab_size
        provider.params_dtype = dtype
        provider.pipeline_dtype = dtype
        # micro-batches of one step have their own lengths (schedule/batch.py): at PP > 1 megatron
        # sends each activation's shape ahead of it (three integers per micro-batch and direction)
        provider.variable_seq_lengths = pipeline_model_parallel_size > 1
        if provider.variable_seq_lengths:
            # megatron rejects variable lengths with its default MoE dispatcher ("allgather") even
            # in a dense model; the dispatcher is never used here (no experts)
            provider.moe_token_dispatcher_type = "alltoall"
        provider.autocast_dtype = dtype
        provider.bf16 = dtype == torch.bfloat16
        provider.fp16 = dtype == torch.float16
        _apply_recompute(provider, recompute)
        provider = family.configure_provider(provider, hf_config, impl)
        provider.finalize()
        return cls(hf_config=hf_config, bridge=bridge, provider=provider, transformer_impl=impl)

    # ---------------------------------------------------------------- construction

    def build(self, *, init_weights: bool = True, meta_device: bool = False, pg_collection=None) -> list:
        """Model chunks for this rank's pipeline stage (a one-element list: no virtual PP).

        ``init_weights=False`` skips random initialisation (weights are loaded next);
        ``meta_device=True`` allocates nothing (parameter counting / memory planning).
        Parallel state must be initialised; not wrapped in DDP, no mixed-precision wrapper.
        """
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection

        if not parallel_state.is_initialized():
            raise ModelBuildError("megatron parallel_state is not initialised (init_gloo / local_model_parallel)")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (self.provider.tensor_model_parallel_size, self.provider.pipeline_model_parallel_size):
            raise ModelBuildError(
                f"builder is configured for TP={self.provider.tensor_model_parallel_size} "
                f"PP={self.provider.pipeline_model_parallel_size} but parallel_state has TP={tp} PP={pp}"
            )
        p = self.provider
        p._pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        from vigos_megatron import runtime

        p.use_cpu_initialization = not runtime.use_cuda() or meta_device
        p.perform_initialization = bool(init_weights) and not meta_device
        p.init_model_with_meta_device = bool(meta_device)
        # Bridge's VL models need explicit stage flags (None would drop the vision tower).
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if meta_device:
            with torch.device("meta"):
                model = p.provide(pre_process=pre, post_process=post)
        else:
            model = p.provide(pre_process=pre, post_process=post)
            if not p.use_cpu_initialization:
                model.cuda(runtime.compute_device())
        from megatron.core import tensor_parallel
        from megatron.core.enums import ModelType

        model.model_type = ModelType.encoder_or_decoder  # what megatron's get_model() sets; the schedules read it
        model.vigos_model_type = self.hf_config.model_type  # models.family.family_of reads it
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        # One dtype for every parameter: the vision towers and the local spec's torch norms are
        # created in the default dtype otherwise (checkpoints must round-trip bit-exactly).
        model.to(dtype=p.params_dtype)
        return [model]

    def build_from_hf(self, hf_dir) -> list:
        """Build this rank's chunks and load the HF weights in ``hf_dir`` (bridge mappings)."""
        chunks = self.build(init_weights=False)
        self.load_hf_weights(chunks, hf_dir)
        return chunks

    def load_hf_weights(self, chunks: list, hf_dir) -> None:
        from vigos_megatron.models.hf_checkpoint import check_hf_weights

        check_hf_weights(hf_dir, self.hf_config)
        self.bridge.load_hf_weights(chunks, str(hf_dir))

    def export_hf_weights(self, chunks: list, *, show_progress: bool = True):
        """Yield ``(hf_name, full_tensor)`` for every HF parameter (gathers over TP/PP; all ranks)."""
        for name, tensor in self.bridge.export_hf_weights(chunks, cpu=True, show_progress=show_progress):
            yield name, tensor


def _apply_recompute(provider, recompute: str) -> None:
    if recompute == "none":
        provider.recompute_granularity = None
    elif recompute == "selective":
        provider.recompute_granularity = "selective"
        provider.recompute_modules = ["core_attn"]
    elif recompute == "full":
        provider.recompute_granularity = "full"
        provider.recompute_method = "uniform"
        provider.recompute_num_layers = 1
    else:
        raise ModelBuildError(f"recompute: unknown value {recompute!r} (none, selective, full)")


def apply_local_settings(provider) -> None:
    """megatron-core's local layer spec, local attention, all fusions off."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnBackend

    provider.transformer_layer_spec = get_gpt_layer_local_spec(normalization=provider.normalization)
    provider.attention_backend = AttnBackend.local
    for flag in (
        "gradient_accumulation_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "masked_softmax_fusion",
        "persist_layer_norm",
        "apply_rope_fusion",
        "cross_entropy_loss_fusion",
    ):
        if hasattr(provider, flag):
            setattr(provider, flag, False)


def apply_sdpa_settings(provider) -> None:
    """The local settings with core attention on torch's SDPA (:mod:`vigos_megatron.models.specs`).

    On a GPU also megatron-core's fused SwiGLU (``bias_activation_fusion``: ``torch.compile``d,
    keeps only the fc1 output for backward instead of also ``silu(gate)``); the CPU keeps the
    unfused activation (no compilation in CPU runs and tests).
    """
    from vigos_megatron import runtime
    from vigos_megatron.models.specs import sdpa_block_spec

    apply_local_settings(provider)
    provider.transformer_layer_spec = sdpa_block_spec
    provider.bias_activation_fusion = runtime.use_cuda()


# --------------------------------------------------------------------------- accounting


def param_bytes(chunks) -> int:
    """Bytes held by the parameters of ``chunks`` on this rank (meta tensors count their size)."""
    seen: set[int] = set()
    total = 0
    for m in chunks:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def param_count(chunks) -> int:
    seen: set[int] = set()
    total = 0
    for m in chunks:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
