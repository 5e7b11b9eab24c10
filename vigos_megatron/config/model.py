"""Configuration of the policy model (Qwen2.5-VL under Megatron-Core)."""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.config.loader import ConfigError

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which checkpoint to build, and how to shard and run it.

    ``hf_path`` is a Hugging Face Qwen2.5-VL directory (config.json, optionally weights,
    tokenizer and processor files). ``megatron_checkpoint`` (optional) is a run or checkpoint
    directory written by ``tools/convert_hf_to_megatron.py`` or by training; when set, weights
    are loaded from it instead of from ``hf_path``.
    """

    hf_path: str = ""
    megatron_checkpoint: str = ""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    #: parameter dtype: float32 (CPU/tests), bfloat16 (GPU training)
    dtype: str = "float32"
    #: "auto": Transformer Engine layer spec and fused kernels when TE is installed, else local spec
    transformer_impl: str = "auto"
    #: build on the meta device (no weights materialised); for memory planning only
    meta_device: bool = False
    #: build the frozen teacher replica next to the student
    build_teacher: bool = True

    def validate(self) -> None:
        if self.tensor_model_parallel_size < 1:
            raise ConfigError(f"tensor_model_parallel_size: must be >= 1, got {self.tensor_model_parallel_size}")
        if self.pipeline_model_parallel_size < 1:
            raise ConfigError(f"pipeline_model_parallel_size: must be >= 1, got {self.pipeline_model_parallel_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"transformer_impl: must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)
