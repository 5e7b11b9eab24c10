"""Configuration of the training objective: ``loss.objective`` and one ``loss.<name>`` section per
registered objective (:mod:`vigos_megatron.objectives`; each section is that objective's own settings
dataclass), plus the KL's memory bound and implementation."""

from __future__ import annotations

from dataclasses import field, make_dataclass

from vigos_megatron.errors import require_at_least, require_one_of
from vigos_megatron.losses.impls import DEFAULT_CHUNK_BYTES, KL_IMPLS
from vigos_megatron.objectives import MODULES, get


#: the dtype of the logits the loss reads in a bf16 model (``loss.logits_dtype``)
LOGITS_DTYPES = ("float32", "model")


def _validate(self) -> None:
    require_one_of(self, "objective", MODULES)
    require_one_of(self, "impl", KL_IMPLS)
    require_at_least(self, 4096, "chunk_bytes")
    require_one_of(self, "logits_dtype", LOGITS_DTYPES)


def _settings(name: str) -> type:
    return get(name).settings


#: ``objective``; ``<name>`` for every registered objective (its settings); ``chunk_bytes``: bytes of
#: one fp32 ``[chunk, V/tp]`` work tensor inside the KL (bounds the loss's memory); ``impl``: "auto"
#: (fused Triton kernels for CUDA tensors, torch otherwise), "torch", "triton" (from hidden states: who reduces
#: each tile); ``from_hidden``: the last
#: stage hands the loss its final hidden states and output weights and the KL forms each chunk's logits
#: itself (no [tokens, V/tp] logits kept; false: the logits path, the reference); ``logits_dtype``
#: (both paths): the logits the loss reads in a bf16 model, "float32" (the output layer's fp32
#: accumulator, unrounded: the distillation gradient ``p_S - q_T`` of nearly equal distributions is not
#: drowned by bf16 rounding; benchmarks/bench_precision.py) or "model" (rounded to bf16: half the logits'
#: memory on the logits path, bf16 GEMM speed from hidden states on the CPU; recipes.memory prices both);
#: an fp32 model reads fp32 logits either way
LossConfig = make_dataclass(
    "LossConfig",
    [("objective", str, field(default="vigos")),
     *[(name, _settings(name), field(default_factory=_settings(name))) for name in MODULES],
     ("chunk_bytes", int, field(default=DEFAULT_CHUNK_BYTES)),
     ("impl", str, field(default="auto")),
     ("from_hidden", bool, field(default=True)),
     ("logits_dtype", str, field(default="float32"))],
    namespace={"validate": _validate},
    module=__name__,
)

__all__ = ["KL_IMPLS", "LOGITS_DTYPES", "LossConfig"]
