"""Vanilla OPSD (``../shared/METHOD.md`` section 3): one privileged teacher context (image, problem,
reference answer, full format), forward KL on every completion token; one student and one teacher
row per rollout."""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.objectives.base import OneTeacherObjective, OneTermSettings


@dataclass
class OPSDLossConfig(OneTermSettings):
    clip: float = 0.05


class OPSD(OneTeacherObjective):
    name = "opsd"
    settings = OPSDLossConfig
    terms = ("privileged",)
    expected_terms = ("privileged",)
    teacher_context = "opsd"
    direction = "forward"


OBJECTIVE = OPSD()
