"""What an objective is: its contexts, the rows a rollout contributes, its loss, metrics and memory rows.

An objective module (``vigos_megatron/objectives/<name>.py``) defines its loss settings (a
dataclass with ``validate()``, the ``loss.<name>`` section of the config) and ``OBJECTIVE``, an
:class:`Objective`. The registry (:mod:`vigos_megatron.objectives`) lists the modules; config
validation, scoring, the metrics and ``recipes.memory`` ask the objective and never branch on its name.

Module-level imports stay light (the configuration imports every objective module); the losses,
the assembly and torch are imported where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import PretrainConfig
    from vigos_megatron.schedule.assembly import AssembledRollout, MicroBatchStream
    from vigos_megatron.training.rollouts import Rollout


@dataclass(frozen=True)
class StreamRows:
    """Rows per rollout, ``(student, teacher)``: in the stream, showing the image, and read by the
    loss per completion token (the memory estimate's workload)."""

    stream: tuple[int, int]
    image: tuple[int, int]
    logits: tuple[int, int]


class Objective:
    """One training objective (subclasses set the class attributes and implement the methods)."""

    #: the ``loss.objective`` value and the name of the ``loss.<name>`` settings
    name: ClassVar[str]
    #: the settings dataclass (``loss.<name>``)
    settings: ClassVar[type]
    #: term names by segment id (the ``term/<name>`` metrics, ``rollouts.jsonl``)
    terms: ClassVar[tuple[str, ...]]
    #: the terms a healthy step has tokens for (a fallback term may be empty)
    expected_terms: ClassVar[tuple[str, ...]]
    rows: ClassVar[StreamRows]
    #: the completion formats (the prompt template's ``format``) this objective can train on; None: any
    completion_formats: ClassVar[tuple[str, ...] | None] = None

    def contexts(self, cfg: "PretrainConfig") -> tuple[str, ...]:
        """The data contexts (``data.context.contexts``) this objective reads under ``cfg``."""
        raise NotImplementedError

    def assemble(self, rollout: "Rollout", cfg: "PretrainConfig", cut: Callable) -> "AssembledRollout":
        """The student and teacher rows of one rollout and its scored tokens (byte-exact contexts:
        ``cut`` is the tokenizer's :class:`~vigos_megatron.data.contexts.PrefixCut`)."""
        raise NotImplementedError

    def pack(self, group: list, *, pad_id: int, multiple: int) -> "MicroBatchStream":
        """One micro-batch of assembled rollouts as a stream with its loss tokens."""
        raise NotImplementedError

    def teacher_pass(self, settings: Any, *, chunk_bytes: int, impl: str, tp_group):
        """The loss callable ``(tokens, output) -> (loss, num_tokens, report)`` of a forward-only pass of the
        teacher alone over all of the step's micro-batches, run before the step's schedule when its loss
        needs data from the whole global batch (:func:`~vigos_megatron.training.update.teacher_pass_reports`);
        None (the default): no such pass."""
        return None

    def build_loss(self, settings: Any, tokens: list, *, chunk_bytes: int, impl: str, dp_group, tp_group,
                   teacher_reports: list | None = None):
        """The megatron loss callable ``(tokens, output) -> (loss, num_tokens, report)`` of one step
        (``settings``: this objective's ``loss.<name>``; ``tokens``: the loss tokens of this rank's
        micro-batches, e.g. ``[b.tokens for b in batches]``; ``teacher_reports``: the last stage's reports of
        :meth:`teacher_pass` over them, None without a pass)."""
        raise NotImplementedError

    def gradient_probes(self, settings: Any, step: int, tokens: list, *, chunk_bytes: int, impl: str, dp_group,
                        tp_group) -> dict:
        """``{name: loss callable}`` whose gradient norms step ``step`` logs (extra backward passes over the
        step's micro-batches, nothing applied; arguments as :meth:`build_loss`). None by default."""
        return {}

    def probe_metrics(self, settings: Any, norms: dict) -> dict:
        """Metrics from ``{name: gradient norm}`` of :meth:`gradient_probes`."""
        return {}


class SegmentedObjective(Objective):
    """An objective whose loss is :class:`~vigos_megatron.losses.objectives.SegmentedDistillationLoss`:
    each scored token belongs to one term, each term a token mean over the global batch."""

    def segments(self, settings: Any) -> tuple:
        """The :class:`~vigos_megatron.losses.objectives.Segment` of each term, in segment-id order."""
        raise NotImplementedError

    def pack(self, group: list, *, pad_id: int, multiple: int):
        from vigos_megatron.schedule.assembly import pack_distill

        return pack_distill(group, pad_id=pad_id, multiple=multiple)

    def build_loss(self, settings: Any, tokens: list, *, chunk_bytes: int, impl: str, dp_group, tp_group,
                   teacher_reports: list | None = None):
        from vigos_megatron.losses.objectives import SegmentedDistillationLoss, global_segment_counts
        from vigos_megatron.runtime import compute_device

        segments = self.segments(settings)
        # counted on the backend's device: the DP all-reduce runs on NCCL where CUDA is used
        device = compute_device()
        counts = global_segment_counts([t.segment.to(device) for t in tokens], len(segments), dp_group=dp_group)
        return SegmentedDistillationLoss(segments, counts, temperature=settings.temperature, clip=settings.clip,
                                         tp_group=tp_group, chunk_bytes=chunk_bytes, impl=impl)


@dataclass
class OneTermSettings:
    """Settings of a one-term objective: ``weight * mean_t KL_t`` over every completion token."""

    weight: float = 1.0
    #: both logits are divided by it; no T^2 factor
    temperature: float = 1.0
    #: hard per-token clamp of the KL (value clip, gradient 0 above); <= 0 disables
    clip: float = 0.0

    def validate(self) -> None:
        from vigos_megatron.errors import require_at_least, require_positive

        require_at_least(self, 0, "weight")
        require_positive(self, "temperature")


class OneTeacherObjective(SegmentedObjective):
    """One teacher row per rollout, its context ``teacher_context``, scoring every completion token
    with one KL ``direction`` (one student and one teacher row in the stream)."""

    teacher_context: ClassVar[str]
    direction: ClassVar[str]
    rows = StreamRows(stream=(1, 1), image=(1, 1), logits=(1, 1))

    def contexts(self, cfg):
        return tuple(dict.fromkeys(("student", self.teacher_context)))

    def assemble(self, rollout, cfg, cut):
        from vigos_megatron.schedule.assembly import assemble_opsd

        return assemble_opsd(rollout.sample["contexts"], rollout.completion, correct=rollout.correct,
                             teacher_context=self.teacher_context)

    def segments(self, settings):
        from vigos_megatron.losses.objectives import Segment

        return (Segment(self.terms[0], self.direction, settings.weight),)
