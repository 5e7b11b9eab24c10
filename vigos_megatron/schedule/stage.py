"""One pipeline stage holding the trainable student chunk and the frozen teacher chunk.

Layout (``../shared/DESIGN-NOTES.md``): a micro-batch is one stream of ``R`` rows of length
``S``; the first ``Ns = num_student_rows`` rows are the student's (trainable), the remaining
``Nt = R - Ns`` rows are teacher contexts. Between pipeline stages the stream travels as one
tensor ``[S, R, H]`` (megatron's p2p shape ``(seq_length, micro_batch_size, hidden_size)``,
so the schedule is called with ``micro_batch_size=R``):

* the student chunk runs on ``x[:, :Ns]`` (gradients flow back into those rows);
* the teacher chunk runs on ``x[:, Ns:].detach()`` under ``torch.no_grad()`` (the gradient
  sent back to the previous stage holds exact zeros in the teacher rows);
* the stage returns ``torch.cat([student_out, teacher_out])``: hidden states ``[S, R, H]``
  (concatenated along dim 1) on every stage but the last, batch-first vocabulary-sharded
  logits ``[R, S, V/tp]`` (concatenated along dim 0) on the last, which is what megatron's
  GPTModel (hence Qwen2.5-VL) returns there.

Megatron DDP wraps the whole stage: DDP allocates gradient buffers only for parameters with
``requires_grad``, i.e. the student's; the teacher has none, gets no ``.grad`` and must never
be handed to an optimizer (:meth:`StudentTeacherStage.student_parameters` lists what may).
``finalize_model_grads`` unwraps to the module that has ``pre_process`` (this stage) and asks
it for ``share_embeddings_and_output_weights`` / ``shared_embedding_or_output_weight()``
(tied embeddings at PP > 1): both answer for the student.

The schedule calls :meth:`set_input_tensor` before it pulls the micro-batch from the data
iterator, so the row split (which needs the micro-batch's ``num_student_rows``) happens at the
start of :meth:`forward`; :meth:`set_input_tensor` only keeps the received tensor.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from vigos_megatron.models.teacher import freeze_


class StudentTeacherStage(MegatronModule):
    """This rank's pipeline stage: ``student`` (trainable chunk) + ``teacher`` (frozen chunk, same layer split).

    Args:
        student: the student's model chunk for this stage (``Qwen25VLModel`` from
            :meth:`~vigos_megatron.models.qwen2_5_vl.QwenVLBuilder.build`), not DDP-wrapped.
        teacher: the teacher replica's chunk for the same stage
            (:func:`~vigos_megatron.models.teacher.build_teacher_replica`); it is frozen again here.

    ``forward(batch)`` takes a :class:`~vigos_megatron.schedule.batch.StreamBatch` and returns
    ``[S, R, H]`` hidden states (intermediate stages) or ``[R, S, V/tp]`` logits (last stage).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module):
        super().__init__(config=student.config)
        for flag in ("pre_process", "post_process"):
            if getattr(student, flag) != getattr(teacher, flag):
                raise ValueError(f"student and teacher chunks differ in {flag}: built with different layer splits")
        self.student = student
        self.teacher = teacher
        freeze_([teacher])
        self.model_type = student.model_type
        self.pre_process = student.pre_process
        self.post_process = student.post_process
        self.share_embeddings_and_output_weights = student.share_embeddings_and_output_weights
        self._input_tensor: torch.Tensor | None = None

    # ------------------------------------------------------------------ megatron hooks

    def shared_embedding_or_output_weight(self):
        """The student's tied embedding / output weight on this stage (``finalize_model_grads``)."""
        return self.student.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Keep what the previous stage sent: ``[S, R, H]`` (``None`` / ``[None]`` on the first stage)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"StudentTeacherStage receives one tensor per micro-batch, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self._input_tensor = input_tensor

    def train(self, mode: bool = True):
        """Train/eval the student; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def student_parameters(self):
        """The trainable parameters (what an optimizer may hold)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward

    def forward(self, batch) -> torch.Tensor:
        """Student rows through the student chunk, teacher rows through the teacher chunk (no grad).

        Returns ``[S, R, H]`` on intermediate stages, ``[R, S, V/tp]`` on the last stage.
        """
        ns, rows, seq = batch.num_student_rows, batch.rows, batch.seq_length
        x = self._input_tensor
        self._input_tensor = None
        if self.pre_process:
            if x is not None:
                raise RuntimeError("the first pipeline stage received an input tensor")
            s_in = t_in = None
        else:
            if x is None:
                raise RuntimeError("a non-first pipeline stage got no input tensor (set_input_tensor not called)")
            if x.dim() != 3 or x.shape[0] != seq or x.shape[1] != rows:
                raise ValueError(f"received stream {tuple(x.shape)}, expected [S={seq}, R={rows}, H]")
            s_in = x[:, :ns]
            t_in = x[:, ns:].detach()
        self.student.set_input_tensor(s_in)
        s_out = self.student(**batch.student.model_kwargs())
        self.teacher.set_input_tensor(t_in)
        with torch.no_grad():
            t_out = self.teacher(**batch.teacher.model_kwargs())
        if self.post_process:  # batch-first logits [rows, S, V/tp]
            _check(s_out, (ns, seq), "student logits")
            _check(t_out, (rows - ns, seq), "teacher logits")
            return torch.cat([s_out, t_out], dim=0)
        _check(s_out, (seq, ns), "student hidden states")
        _check(t_out, (seq, rows - ns), "teacher hidden states")
        return torch.cat([s_out, t_out], dim=1)


def _check(t: torch.Tensor, lead: tuple[int, int], what: str) -> None:
    if t.dim() != 3 or tuple(t.shape[:2]) != lead:
        raise RuntimeError(f"{what}: shape {tuple(t.shape)}, expected leading dims {lead}")
