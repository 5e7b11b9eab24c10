"""One pipeline stage holding the trainable student chunk and the frozen teacher chunk.

Layout (``../shared/DESIGN-NOTES.md``, :class:`~vigos_megatron.schedule.batch.StreamBatch`): a
micro-batch of ``B`` rollouts has ``K`` slots of ``B`` rows each, the ``Ks`` student slots
(trainable) first, then the teacher contexts; slot ``c`` runs at its own length ``S_c``. The teacher
may have another width than the student (``H_t`` vs ``H_s``, a teacher of its own, ``model.teacher``)
and another number of layers on this stage; the stages are the student's.

Between pipeline stages the stream travels as ONE flat tensor ``[E, 1, 1]`` (megatron's p2p sends one
3-D tensor per direction, its shape sent ahead: ``variable_seq_lengths``), the slots' ``[S_c, B, H_c]``
hidden states flattened and concatenated in slot order, ``H_c = H_s`` for a student slot and ``H_t``
for a teacher slot: ``E = B * (H_s * sum_{c < Ks} S_c + H_t * sum_{c >= Ks} S_c)``.

* the student chunk runs on its slots' parts of ``x`` (gradients flow back into them);
* the teacher chunk runs on its slots' parts, detached, under ``torch.no_grad()`` (the
  gradient sent back to the previous stage holds exact zeros there);
* each slot is one language-model call on ``[S_c, B, H_c]``;
* on every stage but the last the stage returns the stream ``[E, 1, 1]``; on the last it returns, at
  the positions a loss reads (slot order, student first; ``batch.tokens`` index them), the pair
  ``(student rows, teacher rows)``: final hidden states ``[N_s, H_s]`` and ``[N_t, H_t]``
  (``from_hidden``: the loss applies each model's output weight chunk by chunk,
  :mod:`vigos_megatron.losses.hidden_kl`) or vocabulary-sharded logits ``[N_s, V/tp]`` and
  ``[N_t, V/tp]``. :meth:`StudentTeacherStage.scored_rows` turns the pair into what the loss reads
  (with the student's and the teacher's output weight shards ``[V/tp, H_s]`` / ``[V/tp, H_t]``, tied or
  not: the tensors the output layers would use, so the student's weight gradient reaches its
  ``main_grad`` through autograd and DDP as on the logits path).

Megatron DDP wraps the whole stage: DDP allocates gradient buffers only for parameters with
``requires_grad``, i.e. the student's; the teacher has none, gets no ``.grad`` and must never
be handed to an optimizer (:meth:`StudentTeacherStage.student_parameters` lists what may).
``finalize_model_grads`` unwraps to the module that has ``pre_process`` (this stage) and asks
it for ``share_embeddings_and_output_weights`` / ``shared_embedding_or_output_weight()``
(tied embeddings at PP > 1): both answer for the student.

The schedule calls :meth:`set_input_tensor` before it pulls the micro-batch from the data
iterator, so the slot split (which needs the micro-batch's slot lengths) happens at the
start of :meth:`forward`; :meth:`set_input_tensor` only keeps the received tensor.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from vigos_megatron.models.family import family_of
from vigos_megatron.models.teacher import freeze_


class StudentTeacherStage(MegatronModule):
    """This rank's pipeline stage: ``student`` (trainable chunk) + ``teacher`` (frozen chunk, same layer split).

    Args:
        student: the student's model chunk for this stage (``Qwen25VLModel`` from
            :meth:`~vigos_megatron.models.builder.QwenVLBuilder.build`), not DDP-wrapped.
        teacher: the frozen teacher's chunk for the same stage (:mod:`vigos_megatron.models.teacher`: the
            replica, or a model of its own, of another width and depth); it is frozen again here.
        share_vision: the student's image rows reuse the teacher's vision-tower features. Only
            valid when the student's tower is frozen and identical to the teacher's (the teacher
            is the replica of the initial student and ``model.freeze_vision`` is on); then the
            tower runs once per image of a micro-batch for both models.
        from_hidden: the last stage returns the final hidden states at the loss positions
            ``[N, H]`` instead of their logits (``loss.from_hidden``).
        fp32_logits: the last stage returns fp32 logits from a bf16 model (the output layer's fp32
            accumulator, not rounded to bf16; ``loss.logits_dtype``,
            :mod:`vigos_megatron.models.output_logits`); ``False``: logits in the model's dtype (from
            hidden states: the KL's GEMMs round them the same way, ``HiddenOutput.rounded``).

    ``forward(batch)`` takes a :class:`~vigos_megatron.schedule.batch.StreamBatch` and returns
    the stream ``[E, 1, 1]`` (intermediate stages) or, on the last stage, the pair of student and
    teacher rows (hidden states or logits) at the loss positions.
    Each model's chunk runs through :mod:`vigos_megatron.models.stage_forward` (the same modules
    as ``Qwen25VLModel.forward``, with one vision-tower pass per image and the selected logits).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, *, share_vision: bool = False,
                 from_hidden: bool = True, fp32_logits: bool = True):
        super().__init__(config=student.config)
        for flag in ("pre_process", "post_process"):
            if getattr(student, flag) != getattr(teacher, flag):
                raise ValueError(f"student and teacher chunks differ in {flag}: built with different layer splits")
        self.student = student
        self.teacher = teacher
        freeze_([teacher])
        #: the stream's width of a student slot and of a teacher slot
        self.widths = (student.config.hidden_size, teacher.config.hidden_size)
        self.model_type = student.model_type
        self.pre_process = student.pre_process
        self.post_process = student.post_process
        self.share_embeddings_and_output_weights = student.share_embeddings_and_output_weights
        self.share_vision = bool(share_vision)
        self.from_hidden = bool(from_hidden)
        self.fp32_logits = bool(fp32_logits)
        tower = family_of(student).vision_tower(student) if self.pre_process else None
        if self.share_vision and tower is not None and any(p.requires_grad for p in tower.parameters()):
            raise ValueError("share_vision needs a frozen student vision tower (model.freeze_vision)")
        self._input_tensor: torch.Tensor | None = None

    # ------------------------------------------------------------------ megatron hooks

    def shared_embedding_or_output_weight(self):
        """The student's tied embedding / output weight on this stage (``finalize_model_grads``)."""
        return self.student.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Keep what the previous stage sent: ``[E, 1, 1]`` (``None`` / ``[None]`` on the first stage)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"StudentTeacherStage receives one tensor per micro-batch, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self._input_tensor = input_tensor

    def scored_rows(self, output: torch.Tensor):
        """The last stage's ``output`` as the loss reads it (:mod:`vigos_megatron.losses.scored_rows`)."""
        from vigos_megatron.losses.scored_rows import HiddenOutput, LogitsOutput

        student_rows, teacher_rows = output
        if not self.from_hidden:
            return LogitsOutput(torch.cat([student_rows, teacher_rows]))
        return HiddenOutput(student_rows, _output_weight(self.student), teacher_rows, _output_weight(self.teacher),
                            teacher_offset=student_rows.shape[0], rounded=not self.fp32_logits)

    def train(self, mode: bool = True):
        """Train/eval the student; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def student_parameters(self):
        """The trainable parameters (what an optimizer may hold)."""
        return [p for p in self.student.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward

    def _image_features(self, batch) -> tuple[dict, dict]:
        """``({image: features})`` for the teacher's and the student's image rows: one tower pass per image and model.

        With ``share_vision`` the student's rows reuse the teacher's features (a frozen student
        tower that is still the teacher's, so the values are identical), so the tower runs once
        per image of the micro-batch in all.
        """
        from vigos_megatron.models.stage_forward import image_features

        def run(model, ids):
            ids = sorted(set(ids))
            if not ids:
                return {}
            pix, grid = batch.images.select(ids)
            return dict(zip(ids, image_features(model, pix, grid)))

        s_ids, t_ids = batch.student.image_ids, batch.teacher.image_ids
        with torch.no_grad():
            t_feats = run(self.teacher, t_ids + (s_ids if self.share_vision else []))
        s_feats = t_feats if self.share_vision else run(self.student, s_ids)
        return s_feats, t_feats

    def _run_slots(self, model, rows, slots: range, batch, xs: list, feats: dict | None) -> list[torch.Tensor]:
        """``model`` on each of its slots (``B`` rows of ``S_c`` tokens; slots with ``S_c = 0`` skipped).

        Returns per slot the flattened ``[S_c, B, H]`` hidden states ``[S_c * B * H]`` or, on the last
        stage, the ``[N_c, H]`` final hidden states (``from_hidden``) or ``[N_c, V/tp]`` logits at the
        slot's selected positions.
        """
        from vigos_megatron.models.stage_forward import embed_rows, language_forward, mrope_positions

        B = batch.rollouts
        outs = []
        for k, c in enumerate(slots):
            s_c = batch.slot_lengths[c]
            if s_c == 0:
                continue
            part = slice(k * B, (k + 1) * B)
            ids = rows.input_ids[part, :s_c]
            emb = None
            if self.pre_process:
                emb = embed_rows(model, ids, [feats[i] for i in rows.row_images[part] if i is not None])
            model.set_input_tensor(xs[c])
            out = language_forward(model, rows=emb,
                                   position_ids=mrope_positions(model, ids, rows.grid_thw(batch.images, part)),
                                   logit_positions=batch.positions[c] if self.post_process else None,
                                   hidden_only=self.from_hidden, fp32_logits=self.fp32_logits)
            if self.post_process:
                _check(out, (batch.positions[c].numel(),), f"slot {c} scored rows")
                outs.append(out)
            else:
                _check(out, (s_c, B), f"slot {c} hidden states")
                outs.append(out.reshape(-1))  # [S_c * B * H]
        return outs

    def forward(self, batch):
        """Student slots through the student chunk, teacher slots through the teacher chunk (no grad).

        Returns the stream ``[E, 1, 1]`` on intermediate stages; on the last stage the pair
        ``(student rows, teacher rows)`` of hidden states ``[N_s, H_s]`` / ``[N_t, H_t]`` or logits
        ``[N_s, V/tp]`` / ``[N_t, V/tp]`` at the selected positions (each in slot order).
        """
        ks = batch.student_slots
        x = self._input_tensor
        self._input_tensor = None
        xs = [None] * len(batch.slot_lengths)
        s_feats = t_feats = None
        if self.pre_process:
            if x is not None:
                raise RuntimeError("the first pipeline stage received an input tensor")
            s_feats, t_feats = self._image_features(batch)
        else:
            if x is None:
                raise RuntimeError("a non-first pipeline stage got no input tensor (set_input_tensor not called)")
            xs = self._split_stream(x, batch)
        outs = self._run_slots(self.student, batch.student, range(0, ks), batch, xs, s_feats)
        with torch.no_grad():
            t_outs = self._run_slots(self.teacher, batch.teacher, range(ks, len(batch.slot_lengths)), batch, xs,
                                     t_feats)
        if self.post_process:
            if not outs:  # the teacher alone (StreamBatch.teacher_only): no student row
                outs = [t_outs[0].new_empty(0, self.widths[0] if self.from_hidden else t_outs[0].shape[-1])]
            return _cat_rows(outs), _cat_rows(t_outs)
        # a fresh tensor, not a view (megatron frees the sent output's storage)
        return torch.cat([o.view(-1, 1, 1) for o in outs + t_outs])

    def _split_stream(self, x: torch.Tensor, batch) -> list[torch.Tensor]:
        """The received stream ``[E, 1, 1]`` as slot ``c``'s rows ``[S_c, B, H_c]``; the teacher's are cut off
        the student's graph (an unused slot, ``S_c = 0``, is an empty ``[0, B, H_c]``)."""
        B, ks = batch.rollouts, batch.student_slots
        widths = [self.widths[c >= ks] for c in range(len(batch.slot_lengths))]
        sizes = [B * s * h for s, h in zip(batch.slot_lengths, widths)]
        if x.dim() != 3 or tuple(x.shape) != (sum(sizes), 1, 1):
            raise ValueError(f"received stream {tuple(x.shape)}, expected [E={sum(sizes)}, 1, 1]")
        parts = torch.split(x.view(-1), sizes)
        return [p.view(s, B, h) if c < ks else p.detach().view(s, B, h)
                for c, (p, s, h) in enumerate(zip(parts, batch.slot_lengths, widths))]


def _cat_rows(outs: list[torch.Tensor]) -> torch.Tensor:
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _check(t: torch.Tensor, lead: tuple, what: str) -> None:
    if t.dim() != len(lead) + 1 or tuple(t.shape[: len(lead)]) != lead:
        raise RuntimeError(f"{what}: shape {tuple(t.shape)}, expected leading dims {lead}")


def _output_weight(model) -> torch.Tensor:
    """The ``[V/tp, H]`` weight ``model``'s output layer multiplies by: the shared embedding / output
    weight when tied (what GPTModel passes the output layer), else the output layer's own."""
    lm = model.language_model
    return lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else lm.output_layer.weight
