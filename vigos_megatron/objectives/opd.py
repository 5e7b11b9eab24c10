"""Standard on-policy distillation (the VGS paper's baseline, ``../shared/METHOD.md`` section 4):
``l_std = KL(p_S(.|I,x) || q_T(.|I,x))`` alone, the teacher under the student's own context.

One student and one teacher row per rollout, both the student's context followed by the whole
completion; every completion token is scored (reverse KL), a token mean over the global batch.
With the default teacher (a frozen copy of the initial student) the two rows are equal and the
loss is exactly 0: set ``model.teacher_hf_path`` to a separate teacher checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.config.loader import ConfigError
from vigos_megatron.objectives.base import SegmentedObjective, StreamRows


@dataclass
class OPDLossConfig:
    weight: float = 1.0
    temperature: float = 1.0
    #: per-token clamp of the KL (value clip, gradient 0 above); <= 0 disables (the paper uses none)
    clip: float = 0.0

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0, got {self.weight}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


class OPD(SegmentedObjective):
    name = "opd"
    settings = OPDLossConfig
    terms = ("std",)
    expected_terms = ("std",)
    rows = StreamRows(stream=(1, 1), image=(1, 1), logits=(1, 1))

    def contexts(self, cfg):
        return ("student",)

    def assemble(self, rollout, cfg, cut):
        from vigos_megatron.schedule.assembly import assemble_opsd

        return assemble_opsd(rollout.sample["contexts"], rollout.completion, correct=rollout.correct,
                             teacher_context="student")

    def segments(self, settings):
        from vigos_megatron.losses.objectives import Segment

        return (Segment("std", "reverse", settings.weight),)


OBJECTIVE = OPD()
