"""Configuration of the policy model (Qwen2.5-VL under Megatron-Core) and its frozen teacher.

The parallel layout is NOT set here: ``parallel.tp`` / ``parallel.pp`` of the training config
(:mod:`vigos_megatron.config.train`) are the one place for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.errors import require_one_of

TRANSFORMER_IMPLS = ("auto", "local", "sdpa", "transformer_engine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
RECOMPUTE = ("none", "selective", "full")


@dataclass
class ModelConfig:
    """Which checkpoint to build, how to run it, and where the teacher comes from.

    Initial weights: ``init_checkpoint`` (a run or ``iter_*`` directory written by
    ``tools/convert_hf_to_megatron.py``) when set, else the Hugging Face directory ``hf_path``.
    The frozen teacher is rebuilt from the same initial weights at every launch (it is never
    saved), unless ``teacher_hf_path`` names a separate checkpoint of the same architecture
    (VGS setting (a)).
    """

    hf_path: str = ""
    init_checkpoint: str = ""
    teacher_hf_path: str = ""
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
