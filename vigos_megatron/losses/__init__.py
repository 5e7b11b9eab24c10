"""Distillation losses over tensor-parallel vocabulary shards (the objectives that use them:
:mod:`vigos_megatron.objectives`)."""

from vigos_megatron.losses.objectives import (
    PERCEPTION,
    REASONING,
    REFERENCE,
    DistillTokens,
    Segment,
    SegmentedDistillationLoss,
    VGSLoss,
    VGSTokens,
    check_schedule_config,
    global_segment_counts,
)
from vigos_megatron.losses.vocab_parallel_kl import LogitRows, kl_rows, vocab_parallel_kl

__all__ = [
    "PERCEPTION", "REASONING", "REFERENCE", "DistillTokens", "Segment", "SegmentedDistillationLoss", "VGSLoss",
    "VGSTokens", "check_schedule_config", "global_segment_counts", "LogitRows", "kl_rows", "vocab_parallel_kl",
]
