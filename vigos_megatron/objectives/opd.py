"""Standard on-policy distillation (the VGS paper's baseline, ``../shared/METHOD.md`` section 4):
``l_std = KL(p_S(.|I,x) || q_T(.|I,x))`` alone, the teacher under the student's own context.

One student and one teacher row per rollout, both the student's context followed by the whole
completion; every completion token is scored (reverse KL, no clip unless configured), a token mean
over the global batch. With the default teacher (a frozen copy of the initial student) the two rows
are equal and the loss is exactly 0: set ``model.teacher.hf_path`` to a separate teacher checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.objectives.base import OneTeacherObjective, OneTermSettings


@dataclass
class OPDLossConfig(OneTermSettings):
    pass


class OPD(OneTeacherObjective):
    name = "opd"
    settings = OPDLossConfig
    terms = ("std",)
    expected_terms = ("std",)
    teacher_context = "student"
    direction = "reverse"


OBJECTIVE = OPD()
