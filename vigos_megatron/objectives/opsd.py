"""Vanilla OPSD (``../shared/METHOD.md`` section 3): one privileged teacher context (image, problem,
reference answer, full format), forward KL on every completion token; one student and one teacher
row per rollout."""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.config.loader import ConfigError
from vigos_megatron.objectives.base import SegmentedObjective, StreamRows


@dataclass
class OPSDLossConfig:
    """Vanilla OPSD: one privileged teacher, forward KL on every completion token."""

    weight: float = 1.0
    temperature: float = 1.0
    clip: float = 0.05

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0, got {self.weight}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


class OPSD(SegmentedObjective):
    name = "opsd"
    settings = OPSDLossConfig
    terms = ("privileged",)
    expected_terms = ("privileged",)
    rows = StreamRows(stream=(1, 1), image=(1, 1), logits=(1, 1))

    def contexts(self, cfg):
        return ("student", "opsd")

    def assemble(self, rollout, cfg, cut):
        from vigos_megatron.schedule.assembly import assemble_opsd

        return assemble_opsd(rollout.sample["contexts"], rollout.completion, correct=rollout.correct)

    def segments(self, settings):
        from vigos_megatron.losses.objectives import Segment

        return (Segment("privileged", "forward", settings.weight),)


OBJECTIVE = OPSD()
