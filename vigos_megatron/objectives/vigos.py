"""ViGOS (``../shared/METHOD.md`` section 2): perception, reasoning and reference teachers, one frozen model.

========================  =====================================================  =================
teacher (context)         scores                                                 divergence
========================  =====================================================  =================
perception                the description span of a valid rollout                forward KL
reasoning (privileged)    the reasoning+answer span of a valid rollout           forward KL
reference (fallback)      every token of an invalid rollout                      reverse KL
========================  =====================================================  =================

Rows per rollout: the student's, then two teacher slots (perception / reference, reasoning).
Each term is a token mean over its own tokens of the global batch, weighted by ``lambda_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.errors import require_at_least, require_positive
from vigos_megatron.objectives.base import SegmentedObjective, StreamRows


@dataclass
class ViGOSLossConfig:
    """Segment-wise self-distillation: perception, reasoning and reference teachers."""

    lambda_perception: float = 1.0
    lambda_reasoning: float = 1.0
    lambda_reference: float = 2.0
    #: both logits are divided by it; no T^2 factor
    temperature: float = 1.0
    #: hard per-token clamp of the full-vocabulary KL (value clip, gradient 0 above); <= 0 disables
    clip: float = 0.05

    def validate(self) -> None:
        require_at_least(self, 0, "lambda_perception", "lambda_reasoning", "lambda_reference")
        require_positive(self, "temperature")


def vigos_segments(cfg: ViGOSLossConfig) -> tuple:
    """The three terms in segment-id order (``PERCEPTION``, ``REASONING``, ``REFERENCE``)."""
    from vigos_megatron.losses.objectives import Segment

    return (Segment("perception", "forward", cfg.lambda_perception),
            Segment("reasoning", "forward", cfg.lambda_reasoning),
            Segment("reference", "reverse", cfg.lambda_reference))


def vigos_loss(cfg: ViGOSLossConfig, global_counts, *, tp_group=None, chunk_bytes: int | None = None,
               impl: str = "auto"):
    """:class:`~vigos_megatron.losses.objectives.SegmentedDistillationLoss` of ViGOS's three terms."""
    from vigos_megatron.losses.objectives import SegmentedDistillationLoss
    from vigos_megatron.losses.vocab_parallel_kl import DEFAULT_CHUNK_BYTES

    return SegmentedDistillationLoss(vigos_segments(cfg), global_counts, temperature=cfg.temperature, clip=cfg.clip,
                                     tp_group=tp_group, chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES, impl=impl)


class ViGOS(SegmentedObjective):
    name = "vigos"
    settings = ViGOSLossConfig
    terms = ("perception", "reasoning", "reference")
    expected_terms = ("perception", "reasoning")
    rows = StreamRows(stream=(1, 2), image=(1, 2), logits=(1, 1))
    #: the perception and reasoning teachers score the <description> and <think> segments
    completion_formats = ("vigos",)

    def contexts(self, cfg):
        return ("student", "perception", "reasoning", "reference")

    def assemble(self, rollout, cfg, cut):
        from vigos_megatron.schedule.assembly import assemble_vigos

        return assemble_vigos(rollout.sample["contexts"], rollout.completion, rollout.segments, correct=rollout.correct,
                              cut=cut, reasoning_teacher_sees_description=cfg.data.context.reasoning_teacher_sees_description)

    def segments(self, settings):
        return vigos_segments(settings)


OBJECTIVE = ViGOS()
