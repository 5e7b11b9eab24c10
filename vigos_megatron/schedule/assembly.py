"""Rollouts -> the token rows of one micro-batch stream and the loss's token indices.

After a rollout, each sample has its prompt prefixes (``vigos_megatron.data.contexts``) and
the student's completion ids. This module appends the completion tokens each context must
score (METHOD.md section 2), byte-exactly, and packs a micro-batch: ``R = (Ks + Kt) * B`` rows,
the ``Ks`` student slots first (trainable rows), then the ``Kt`` teacher slots; slot ``c`` of
rollout ``b`` is row ``c * B + b``, and slot ``c`` runs at its own length ``S_c``. The loss tokens
index straight into what the last stage returns: the logits at the loss positions of every slot,
concatenated in slot order (``[N, V/tp]``, :class:`MicroBatchStream`). Which slots a rollout fills
is its objective's choice (:mod:`vigos_megatron.objectives`); an unused slot is an all-pad row.

The logits at position ``p`` predict token ``p + 1``; for completion token ``j`` appended
after a prefix of length ``L`` at offset ``o`` (``o`` = first appended completion index),
the scoring position is ``L - 1 + j - o``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from vigos_megatron.losses.objectives import PERCEPTION, REASONING, REFERENCE, DistillTokens, VGSTokens
from vigos_megatron.rollout.segments import CompletionSegments


@dataclass
class Row:
    """One sequence of the stream: a prompt prefix plus appended completion tokens."""

    context: str
    ids: Tensor  # int64 [L]
    has_image: bool = True


@dataclass
class AssembledRollout:
    """The rows of one rollout and its supervised tokens.

    ``scores`` holds ``(student_slot, student_pos, teacher_slot, teacher_pos, segment)`` per
    supervised completion token (slots index ``student_slots`` + ``teacher_slots``).
    """

    student_slots: list[Row]
    teacher_slots: list[Row | None]
    scores: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    completion_tokens: int = 0
    valid: bool = True
    correct: bool | None = None


#: ``cut(prefix, lead) -> prefix'``: :class:`~vigos_megatron.data.contexts.PrefixCut`
PrefixCutFn = Callable[[Tensor, bytes], Tensor]


def context_row(contexts: dict, name: str, tail: Tensor, has_image: bool = True, prefix: Tensor | None = None) -> Row:
    """Context ``name``'s prefix (or ``prefix``, a byte-exact cut of it) followed by ``tail``."""
    if prefix is None:
        if name not in contexts:
            raise KeyError(f"context {name!r} was not encoded for this sample (have {sorted(contexts)})")
        prefix = contexts[name]
    return Row(name, torch.cat([prefix.long(), tail.long()]), has_image)


def reasoning_prefix(contexts: dict[str, Tensor], seg: CompletionSegments, cut: PrefixCutFn | None) -> Tensor:
    """The reasoning teacher's prefix for a tail that starts at ``seg.reasoning[0]``, byte-exact.

    When the span's first token carries the end of the ``<think>`` tag (``seg.reasoning_lead``,
    e.g. ``>`` of ``>The``) the prefix gives those bytes up (``cut``), so the teacher reads
    ``... <think>The`` and never ``<think>>The`` (``../shared/METHOD.md`` section 1).
    """
    if "reasoning" not in contexts:
        raise KeyError(f"context 'reasoning' was not encoded for this sample (have {sorted(contexts)})")
    if not seg.reasoning_lead:
        return contexts["reasoning"]
    if cut is None:
        raise ValueError(f"the reasoning span's first token starts with {seg.reasoning_lead!r} of the tag: "
                         "assembling it byte-exactly needs the tokenizer's PrefixCut (cut=...)")
    return cut(contexts["reasoning"], seg.reasoning_lead)


def assemble_vigos(
    contexts: dict[str, Tensor],
    completion: Tensor,
    seg: CompletionSegments,
    *,
    reasoning_teacher_sees_description: bool = False,
    correct: bool | None = None,
    cut: PrefixCutFn | None = None,
) -> AssembledRollout:
    """ViGOS rows: perception + reasoning teachers on valid rollouts, the reference teacher otherwise.

    Every teacher row decodes to its context's text followed by the completion's bytes from the
    first byte of the span it scores (byte-exact, ``../shared/METHOD.md`` section 1).

    Args:
        contexts: prompt prefixes by context name (``student``, ``perception``, ``reasoning``,
            ``reference``), int64 ``[L_name]``; the student's ends with its ``<description>`` prefill.
        completion: int64 ``[n]`` generated ids (EOS included when generated).
        seg: :func:`~vigos_megatron.rollout.segments.parse_completion` of ``completion``.
        cut: re-encodes the reasoning prefix when the span's first token straddles ``<think>``
            (:class:`~vigos_megatron.data.contexts.PrefixCut`); required only then.
    """
    n = int(completion.numel())
    student = context_row(contexts, "student", completion)
    ls = contexts["student"].numel()
    out = AssembledRollout([student], [None, None], completion_tokens=n, valid=seg.valid, correct=correct)
    if not seg.valid:
        ref = context_row(contexts, "reference", completion)
        lr = contexts["reference"].numel()
        out.teacher_slots[0] = ref
        out.scores = [(0, ls - 1 + j, 0, lr - 1 + j, REFERENCE) for j in range(n)]
        return out
    d0, d1 = seg.description
    r0, r1 = seg.reasoning
    # perception: image only, then the completion up to the end of the description
    out.teacher_slots[0] = context_row(contexts, "perception", completion[:d1])
    lp = contexts["perception"].numel()
    out.scores += [(0, ls - 1 + j, 0, lp - 1 + j, PERCEPTION) for j in range(d0, d1)]
    # reasoning: privileged prompt then ONLY the reasoning+answer tokens (released code), or
    # the whole completion prefix when it also sees the description (paper wording)
    offset = 0 if reasoning_teacher_sees_description else r0
    prefix = contexts["reasoning"] if reasoning_teacher_sees_description else reasoning_prefix(contexts, seg, cut)
    out.teacher_slots[1] = context_row(contexts, "reasoning", completion[offset:r1], prefix=prefix)
    lq = prefix.numel()
    out.scores += [(0, ls - 1 + j, 1, lq - 1 + j - offset, REASONING) for j in range(r0, r1)]
    return out


def assemble_opsd(contexts: dict[str, Tensor], completion: Tensor, *, correct: bool | None = None,
                  teacher_context: str = "opsd") -> AssembledRollout:
    """One teacher context scores every completion token (segment 0): vanilla OPSD's privileged
    ``opsd`` context, or the student's own context (``teacher_context="student"``, the standard
    on-policy distillation of a separate teacher). Both prefixes end where the completion starts."""
    n = int(completion.numel())
    ls, lo = contexts["student"].numel(), contexts[teacher_context].numel()
    return AssembledRollout(
        [context_row(contexts, "student", completion)],
        [context_row(contexts, teacher_context, completion)],
        scores=[(0, ls - 1 + j, 0, lo - 1 + j, 0) for j in range(n)],
        completion_tokens=n,
        correct=correct,
    )


def assemble_vgs(
    contexts: dict[str, Tensor],
    completion: Tensor,
    *,
    teacher_image_context: str = "opsd",
    teacher_text_context: str = "opsd_text",
    correct: bool | None = None,
) -> AssembledRollout:
    """VGS: student with/without image, teacher with/without image, all on every completion token.

    ``teacher_*_context`` select the teacher's prompts: ``student``/``student_text`` for a
    separate teacher checkpoint (setting a), ``opsd``/``opsd_text`` for the privileged
    self-distillation setting (b). ``scores`` rows are ``(0, p_SI, 0, p_TI, 0)`` and the
    text-only positions are recovered by :func:`pack_vgs`.
    """
    n = int(completion.numel())
    rows_s = [context_row(contexts, "student", completion), context_row(contexts, "student_text", completion, has_image=False)]
    rows_t = [context_row(contexts, teacher_image_context, completion), context_row(contexts, teacher_text_context, completion, has_image=False)]
    return AssembledRollout(rows_s, rows_t, completion_tokens=n, correct=correct)


@dataclass
class MicroBatchStream:
    """Token rows of one micro-batch and the positions whose logits its loss reads.

    Slot ``c`` of rollout ``b`` is row ``c * B + b``; slot ``c`` runs at its own length ``S_c``
    (``slot_lengths``: its longest row rounded up, 0 for a slot no rollout uses). The last stage
    computes logits only at ``positions[c]`` of each slot (sorted flat positions ``b * S_c + column``
    into the slot's rows ``[B, S_c]``) and returns them concatenated in slot order, ``[N, V/tp]``
    with ``N = sum_c N_c``; ``tokens`` index that tensor.

    Attributes:
        input_ids: int64 ``[R, S]``, ``S = max_c S_c`` (pad-filled; causal attention makes right
            padding inert); slot ``c``'s rows are read as ``[:, :S_c]``.
        lengths: int64 ``[R]`` real tokens per row (0 for an unused slot).
        row_context: context name per row ("" for unused slots).
        row_has_image: bool ``[R]``; row ``r`` belongs to rollout ``r % B``.
        num_student_rows: ``Ks * B`` leading trainable rows.
        rollouts: ``B``.
    """

    input_ids: Tensor
    lengths: Tensor
    row_context: list[str]
    row_has_image: Tensor
    num_student_rows: int
    rollouts: int
    slot_lengths: list[int]
    positions: list[Tensor]
    tokens: DistillTokens | VGSTokens

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]


def slot_lengths(rollouts: list[AssembledRollout], multiple: int) -> list[int]:
    """``S_c`` per slot: the longest row of slot ``c`` over ``rollouts`` rounded up to ``multiple`` (0: unused)."""
    slots = [r.student_slots + r.teacher_slots for r in rollouts]
    out = []
    for c in range(len(slots[0])):
        longest = max((rows[c].ids.numel() for rows in slots if rows[c] is not None), default=0)
        out.append(-(-longest // multiple) * multiple)
    return out


class _LossPositions:
    """Collects ``(slot, rollout, column)`` references and turns them into indices into ``[N, V/tp]``."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths
        self.slot: list[int] = []
        self.flat: list[int] = []

    def ref(self, c: int, b: int, column: int) -> int:
        """Register one reference; returns its handle (for :meth:`indices`)."""
        if not 0 <= column < self.lengths[c]:
            raise ValueError(f"pack: a loss position (column {column}) lies beyond slot {c}'s length {self.lengths[c]}")
        self.slot.append(c)
        self.flat.append(b * self.lengths[c] + column)
        return len(self.flat) - 1

    def finish(self) -> tuple[list[Tensor], Tensor]:
        """``(positions per slot, index of every reference into the slots' concatenated selections)``."""
        slot = torch.tensor(self.slot, dtype=torch.long)
        flat = torch.tensor(self.flat, dtype=torch.long)
        index = torch.zeros_like(flat)
        positions, offset = [], 0
        for c in range(len(self.lengths)):
            mine = slot == c
            pos = torch.unique(flat[mine], sorted=True)
            index[mine] = offset + torch.searchsorted(pos, flat[mine])
            positions.append(pos)
            offset += pos.numel()
        return positions, index


def _pack(rollouts: list[AssembledRollout], pad_id: int, multiple: int) -> tuple[dict, list[int]]:
    if not rollouts:
        raise ValueError("pack: empty micro-batch")
    B = len(rollouts)
    ks, kt = len(rollouts[0].student_slots), len(rollouts[0].teacher_slots)
    if any(len(r.student_slots) != ks or len(r.teacher_slots) != kt for r in rollouts):
        raise ValueError("pack: rollouts of one micro-batch must come from the same objective (same slots)")
    lengths = slot_lengths(rollouts, multiple)
    R = (ks + kt) * B
    ids = torch.full((R, max(lengths)), pad_id, dtype=torch.long)
    row_lengths = torch.zeros(R, dtype=torch.long)
    names = [""] * R
    has_image = torch.zeros(R, dtype=torch.bool)
    for b, r in enumerate(rollouts):
        for c, row in enumerate(r.student_slots + r.teacher_slots):
            if row is None:
                continue
            i = c * B + b
            ids[i, : row.ids.numel()] = row.ids
            row_lengths[i] = row.ids.numel()
            names[i] = row.context
            has_image[i] = row.has_image
    fields = dict(input_ids=ids, lengths=row_lengths, row_context=names, row_has_image=has_image,
                  num_student_rows=ks * B, rollouts=B, slot_lengths=lengths)
    return fields, lengths


def pack_distill(rollouts: list[AssembledRollout], *, pad_id: int, multiple: int = 64) -> MicroBatchStream:
    """Pack ViGOS / OPSD / ``opd`` rollouts (one scored token: one student and one teacher position);
    ``tokens`` is the micro-batch's :class:`DistillTokens` into ``[N, V/tp]``."""
    fields, lengths = _pack(rollouts, pad_id, multiple)
    ks = len(rollouts[0].student_slots)
    where = _LossPositions(lengths)
    refs, seg = [], []
    for b, r in enumerate(rollouts):
        for s_slot, s_pos, t_slot, t_pos, segment in r.scores:
            refs.append((where.ref(s_slot, b, s_pos), where.ref(ks + t_slot, b, t_pos)))
            seg.append(segment)
    positions, index = where.finish()
    s_ref = torch.tensor([a for a, _ in refs], dtype=torch.long)
    t_ref = torch.tensor([t for _, t in refs], dtype=torch.long)
    tokens = DistillTokens(index[s_ref], index[t_ref], torch.tensor(seg, dtype=torch.long))
    return MicroBatchStream(**fields, positions=positions, tokens=tokens)


def pack_vgs(rollouts: list[AssembledRollout], *, pad_id: int, multiple: int = 64) -> MicroBatchStream:
    """Pack VGS rollouts (every completion token in all four rows); ``tokens`` is the micro-batch's
    :class:`VGSTokens` into ``[N, V/tp]``."""
    fields, lengths = _pack(rollouts, pad_id, multiple)
    where = _LossPositions(lengths)
    refs: list[list[int]] = [[], [], [], []]
    trajectory: list[int] = []
    for b, r in enumerate(rollouts):
        n = r.completion_tokens
        trajectory += [b] * n
        for c, row in enumerate(r.student_slots + r.teacher_slots):
            prefix = row.ids.numel() - n
            refs[c] += [where.ref(c, b, prefix - 1 + j) for j in range(n)]
    positions, index = where.finish()
    tokens = VGSTokens(*(index[torch.tensor(x, dtype=torch.long)] for x in refs),
                       trajectory=torch.tensor(trajectory, dtype=torch.long))
    return MicroBatchStream(**fields, positions=positions, tokens=tokens)
