"""Distillation losses over tensor-parallel vocabulary shards."""

from vigos_megatron.losses.objectives import (
    PERCEPTION,
    REASONING,
    REFERENCE,
    DistillTokens,
    SegmentedDistillationLoss,
    VGSLoss,
    VGSTokens,
    build_loss,
    check_schedule_config,
    global_segment_counts,
    opsd_loss,
    vigos_loss,
)
from vigos_megatron.losses.vocab_parallel_kl import LogitRows, kl_rows, vocab_parallel_kl

__all__ = [
    "PERCEPTION", "REASONING", "REFERENCE", "DistillTokens", "SegmentedDistillationLoss", "VGSLoss", "VGSTokens",
    "build_loss", "check_schedule_config", "global_segment_counts", "opsd_loss", "vigos_loss",
    "LogitRows", "kl_rows", "vocab_parallel_kl",
]
