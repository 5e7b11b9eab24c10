"""What the last pipeline stage hands a loss: the rows it scores, as logits or as hidden states.

The objectives (:mod:`vigos_megatron.losses.objectives`) index the last stage's ``N`` scored rows
(student rows first, then teacher rows) and build the KL's terms through one of these:

* :class:`LogitsOutput`: vocabulary-sharded logits ``[N, V/tp]`` (``loss.from_hidden: false``,
  the reference path): terms are :class:`~vigos_megatron.losses.kl_common.LogitRows`;
* :class:`HiddenOutput`: final hidden states and the output weight scoring each row
  (``loss.from_hidden: true``): terms are :class:`~vigos_megatron.losses.hidden_kl.HiddenRows`,
  a student row scored by the student's ``[V/tp, H_s]`` weight, a teacher row by the teacher's
  ``[V/tp, H_t]`` (its own tensor, its own width).

Teacher terms and detached student terms carry no gradient (hidden states and weights detached).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vigos_megatron.losses.hidden_kl import HiddenRows
from vigos_megatron.losses.kl_common import LogitRows


@dataclass(frozen=True)
class LogitsOutput:
    """Logits ``[N, V/tp]`` of the scored rows (teacher rows computed without grad)."""

    logits: Tensor

    @property
    def device(self):
        return self.logits.device

    def student(self, index: Tensor, *, coef: float = 1.0, detach: bool = False) -> LogitRows:
        return LogitRows(self.logits.detach() if detach else self.logits, index, coef)

    def teacher(self, index: Tensor, *, coef: float = 1.0) -> LogitRows:
        return LogitRows(self.logits.detach(), index, coef)


@dataclass(frozen=True)
class HiddenOutput:
    """Final hidden states of the scored rows and the output weights that score them.

    ``student_hidden`` ``[N_s', H_s]`` is indexed by the student indices, ``teacher_hidden``
    ``[N_t', H_t]`` by the teacher indices minus ``teacher_offset`` (one tensor holding both, as the
    stage returns it today: the same tensor and offset 0). ``*_weight``: ``[V/tp, H]`` shards.
    """

    student_hidden: Tensor
    student_weight: Tensor
    teacher_hidden: Tensor
    teacher_weight: Tensor
    teacher_offset: int = 0
    #: logits rounded to the model's dtype (``loss.logits_dtype: model``; :class:`HiddenRows`)
    rounded: bool = False

    def __post_init__(self):
        # detached once: terms sharing a weight tensor are summed before one output GEMM
        object.__setattr__(self, "_constant", {
            "student": (self.student_hidden.detach(), self.student_weight.detach()),
            "teacher": (self.teacher_hidden.detach(), self.teacher_weight.detach()),
        })

    @property
    def device(self):
        return self.student_hidden.device

    def student(self, index: Tensor, *, coef: float = 1.0, detach: bool = False) -> HiddenRows:
        if detach:
            return HiddenRows(*self._constant["student"], index, coef, self.rounded)
        return HiddenRows(self.student_hidden, self.student_weight, index, coef, self.rounded)

    def teacher(self, index: Tensor, *, coef: float = 1.0) -> HiddenRows:
        idx = index - self.teacher_offset if self.teacher_offset else index
        return HiddenRows(*self._constant["teacher"], idx, coef, self.rounded)


def scored_rows(output) -> LogitsOutput | HiddenOutput:
    """``output`` as a row source: a plain tensor is taken as logits ``[..., V/tp]``."""
    return LogitsOutput(output) if isinstance(output, Tensor) else output
