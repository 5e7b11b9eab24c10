"""Configuration of the policy model (Qwen2.5-VL under Megatron-Core) and its frozen teacher.

The parallel layout is NOT set here: ``parallel.tp`` / ``parallel.pp`` of the training config
(:mod:`vigos_megatron.config.train`) are the one place for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vigos_megatron.errors import ConfigError, require_one_of

TRANSFORMER_IMPLS = ("auto", "local", "sdpa", "transformer_engine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RECOMPUTE = ("none", "selective", "full")


@dataclass
class TeacherConfig:
    """A teacher of its own (``model.teacher``): a separate frozen checkpoint, of the student's size or
    another (width, depth, heads; same family, vocabulary, tokenizer and image patching).

    Unset (the default): the teacher is the frozen replica of the initial student. The checkpoint is a
    Hugging Face directory (``hf_path``) or a Megatron checkpoint of ``tools/convert_hf_to_megatron.py``
    (``init_checkpoint``, a run or ``iter_*`` directory). It runs with the student's TP and over the
    student's pipeline stages, its language-model layers split by ``pipeline_layers`` (one count per
    stage) or, when empty, in proportion to the student's (:func:`vigos_megatron.config.teacher.stage_layers`).
    """

    hf_path: str = ""
    init_checkpoint: str = ""
    pipeline_layers: list[int] = field(default_factory=list)

    @property
    def separate(self) -> bool:
        """A checkpoint of its own (not the replica of the initial student)."""
        return bool(self.hf_path or self.init_checkpoint)

    def validate(self) -> None:
        if self.hf_path and self.init_checkpoint:
            raise ConfigError("model.teacher.init_checkpoint: set it or model.teacher.hf_path, not both")
        if any(int(n) < 1 for n in self.pipeline_layers):
            raise ConfigError(f"model.teacher.pipeline_layers: every stage needs at least one layer, got "
                              f"{list(self.pipeline_layers)}")
        if self.pipeline_layers and not self.separate:
            raise ConfigError("model.teacher.pipeline_layers: only for a teacher of its own (model.teacher.hf_path "
                              "or model.teacher.init_checkpoint); the replica is split like the student")


@dataclass
class ModelConfig:
    """Which checkpoint to build, how to run it, and where the teacher comes from.

    Initial weights: ``init_checkpoint`` (a run or ``iter_*`` directory written by
    ``tools/convert_hf_to_megatron.py``) when set, else the Hugging Face directory ``hf_path``.
    The frozen teacher is rebuilt from the same initial weights at every launch (it is never
    saved), unless ``teacher`` names a checkpoint of its own (:class:`TeacherConfig`).
    """

    hf_path: str = ""
    init_checkpoint: str = ""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    #: parameter dtype; "auto": bfloat16 on GPU (fp32 main weights in the optimizer), float32 on CPU
    dtype: str = "auto"
    #: "auto": Transformer Engine layer spec when TE is installed, else "sdpa" on a GPU
    #: (core attention on torch SDPA, vigos_megatron.models.specs) and "local" on the CPU
    transformer_impl: str = "auto"
    #: activation recomputation of the student's transformer layers
    recompute: str = "none"
    #: keep the student's vision tower frozen (no gradients, no optimizer state for it)
    freeze_vision: bool = False
    #: build on the meta device (no weights materialised); for memory planning only
    meta_device: bool = False

    def validate(self) -> None:
        require_one_of(self, "dtype", DTYPES)
        require_one_of(self, "transformer_impl", TRANSFORMER_IMPLS)
        require_one_of(self, "recompute", RECOMPUTE)

    def torch_dtype(self, use_cuda: bool):
        import torch

        name = ("bfloat16" if use_cuda else "float32") if self.dtype == "auto" else self.dtype
        return getattr(torch, name)
