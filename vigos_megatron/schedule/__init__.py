"""The frozen teacher inside the student's pipeline schedule (``../shared/DESIGN-NOTES.md``).

* :mod:`~vigos_megatron.schedule.stage`: :class:`StudentTeacherStage`, one pipeline stage
  owning the student chunk (trainable, DDP) and the teacher chunk (frozen); the stream
  between stages is ``[T, 1, H]``: every slot's ``[S_c, B, H]`` rows at their own length,
  student slots first; the last stage computes logits only where a loss reads them.
* :mod:`~vigos_megatron.schedule.batch`: assembled rollouts -> per-micro-batch model inputs
  (:class:`StreamBatch`), every slot padded to the micro-batch's longest row of that slot.
* :mod:`~vigos_megatron.schedule.forward_step`: ``forward_step_func`` for megatron's
  ``get_forward_backward_func()`` (``micro_batch_size=1``, streams of any length), running it, and
  reducing the reports.
"""

from vigos_megatron.schedule.batch import RowsInput, StreamBatch, make_stream_batches, stream_batch
from vigos_megatron.schedule.forward_step import (
    LOSS_KEY,
    ReportedLoss,
    forward_step_func,
    reduce_reports,
    run_stream_schedule,
)
from vigos_megatron.schedule.stage import StudentTeacherStage

__all__ = [
    "LOSS_KEY",
    "ReportedLoss",
    "RowsInput",
    "StreamBatch",
    "StudentTeacherStage",
    "forward_step_func",
    "make_stream_batches",
    "reduce_reports",
    "run_stream_schedule",
    "stream_batch",
]
