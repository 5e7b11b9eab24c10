"""Assembled rollouts -> the per-micro-batch model inputs of :class:`~vigos_megatron.schedule.stage.StudentTeacherStage`.

A micro-batch of ``B`` rollouts is packed by :func:`~vigos_megatron.rollout.assembly.pack_distill`
into ``R`` token rows ``[R, S]`` (slot ``c`` of rollout ``b`` is row ``c * B + b``; the first
``num_student_rows`` rows are the student's). This module splits the rows into the student's
and the teacher's model inputs and attaches the image of every row that has one:

* ``input_ids`` ``[n, S]`` int64 (right padded; causal attention makes padding inert for the
  real tokens). Every pipeline stage needs them: Qwen2.5-VL computes its mrope position ids
  from ``input_ids`` and the image grids on each stage;
* the micro-batch's distinct images (:class:`ImageSet`, one per rollout that has one) and, per
  model, which image each image row shows (``RowsInput.image_ids``): the vision tower runs
  once per image and model (or once per image when the student shares the teacher's frozen
  tower), not once per row. Only the first stage uses the pixels;
* the positions whose logits a loss reads (:class:`LogitSelection`): the last stage computes
  ``[N, V/tp]`` logits there instead of ``[R, S, V/tp]``;
* the length of every slot (:class:`StreamBatch`): each slot runs at its own length, so a
  short teacher context is not padded to the student's.

Micro-batches of one schedule call may differ in length (at PP > 1 megatron exchanges each
stream's shape first, ``variable_seq_lengths``): :func:`make_stream_batches` pads every slot to
the micro-batch's longest row of that slot and re-indexes the loss tokens accordingly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from vigos_megatron.losses.objectives import DistillTokens, VGSTokens
from vigos_megatron.rollout.assembly import AssembledRollout, MicroBatchStream, pack_distill, padded_length


@dataclass
class ImageSet:
    """The distinct images of one micro-batch (one per rollout that has one).

    Attributes:
        pixel_values: ``[patches, C*T*P*P]`` flattened patches of every image, concatenated.
        grid_thw: int64 ``[m, 3]``, one line per image.
    """

    pixel_values: Tensor
    grid_thw: Tensor
    #: patch offsets ``[m + 1]`` (computed on the host once; carried along by :meth:`to`)
    starts: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.starts:
            self.starts = [0]
            for g in self.grid_thw.cpu():
                self.starts.append(self.starts[-1] + int(g.prod()))
        if self.starts[-1] != self.pixel_values.shape[0]:
            raise ValueError(f"ImageSet: {self.pixel_values.shape[0]} patches, the grids need {self.starts[-1]}")

    def __len__(self) -> int:
        return len(self.starts) - 1

    def select(self, ids: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(pixel_values, grid_thw)`` of images ``ids`` in that order (no copy when ``ids`` is all of them)."""
        ids = list(ids)
        if ids == list(range(len(self))):
            return self.pixel_values, self.grid_thw
        pix = torch.cat([self.pixel_values[self.starts[i]:self.starts[i + 1]] for i in ids])
        return pix, self.grid_thw[ids]

    def to(self, device) -> "ImageSet":
        return ImageSet(self.pixel_values.to(device, non_blocking=True), self.grid_thw.to(device, non_blocking=True),
                        list(self.starts))


@dataclass
class RowsInput:
    """Model inputs of one model's rows (student or teacher) in one micro-batch.

    Attributes:
        input_ids: int64 ``[n, S]`` (the model's slots, ``B`` rows each, in slot order).
        row_images: per row, the index of the image it shows in the micro-batch's
            :class:`ImageSet`, or ``None`` (rows of one rollout share its image).
    """

    input_ids: Tensor
    row_images: list[int | None]

    @property
    def image_ids(self) -> list[int]:
        """The image of every image row, in row order."""
        return [i for i in self.row_images if i is not None]

    def grid_thw(self, images: "ImageSet | None", rows: slice = slice(None)) -> Tensor | None:
        """int64 ``[image rows, 3]`` of ``rows``: one grid line per image row, in row order (mrope positions)."""
        ids = [i for i in self.row_images[rows] if i is not None]
        return images.grid_thw[ids] if ids else None

    def to(self, device) -> "RowsInput":
        return RowsInput(self.input_ids.to(device, non_blocking=True), list(self.row_images))


@dataclass
class LogitSelection:
    """The positions whose logits the last stage computes, per slot, and the loss tokens re-indexed to them.

    Attributes:
        positions: per slot (student slots, then teacher slots), int64 ``[N_c]`` sorted flat
            positions ``b * S_c + column`` into the slot's rows ``[B, S_c]``.
        tokens: the stream's loss tokens with every index pointing into the last stage's
            output ``[sum_c N_c, V/tp]`` (the slots' selected logits, in slot order).
    """

    positions: list[Tensor]
    tokens: DistillTokens | VGSTokens

    def to(self, device) -> "LogitSelection":
        return LogitSelection([p.to(device) for p in self.positions], _tokens_to(self.tokens, device))


def _index_fields(tokens) -> list[str]:
    return [f.name for f in dataclasses.fields(tokens) if f.name.endswith("_index")]


def _tokens_to(tokens, device):
    return dataclasses.replace(tokens, **{
        f.name: getattr(tokens, f.name).to(device)
        for f in dataclasses.fields(tokens) if isinstance(getattr(tokens, f.name), Tensor)
    })


def select_loss_positions(tokens: DistillTokens | VGSTokens, *, rollouts: int, seq_length: int,
                          slot_lengths: Sequence[int]) -> LogitSelection:
    """The positions that a loss term reads, per slot, and ``tokens`` re-indexed to them.

    ``tokens`` index the logical stream's logits ``[R, S, V/tp]`` flattened batch-first (row
    ``c * B + b`` is slot ``c`` of rollout ``b``). The selected positions are the sorted union of
    all their indices, i.e. ordered by (slot, rollout, column); index ``i`` becomes
    ``searchsorted(positions, i)``, so the last stage's output (each slot's selected logits, in
    slot order) is read exactly as ``[R*S, V/tp]`` was. Position ``(c, b, column)`` is
    ``b * S_c + column`` in slot ``c``'s rows ``[B, S_c]``.
    """
    B, S = rollouts, seq_length
    fields = _index_fields(tokens)
    flat = torch.cat([getattr(tokens, f) for f in fields])
    positions = torch.unique(flat, sorted=True) if flat.numel() else flat.new_zeros(0)
    row, col = torch.div(positions, S, rounding_mode="floor"), positions % S
    slot, b = torch.div(row, B, rounding_mode="floor"), row % B
    lengths = torch.tensor(list(slot_lengths), dtype=torch.long)
    if positions.numel() and bool((col >= lengths[slot]).any()):
        raise ValueError("select_loss_positions: a loss position lies beyond its slot's length")
    per_slot = [b[slot == c] * int(lengths[c]) + col[slot == c] for c in range(len(slot_lengths))]
    remapped = dataclasses.replace(tokens, **{f: torch.searchsorted(positions, getattr(tokens, f)) for f in fields})
    return LogitSelection(per_slot, remapped)


@dataclass
class StreamBatch:
    """One micro-batch of the student+teacher stream.

    The logical layout is ``R = K * B`` rows of ``S`` tokens (slot ``c`` of rollout ``b`` is row
    ``c * B + b``; the first ``num_student_rows = Ks * B`` rows are the student's). What runs is
    tighter: slot ``c``'s ``B`` rows are cut to ``slot_lengths[c]`` (``S_c``, the micro-batch's
    longest row of that slot rounded up; 0 for a slot none of its rollouts uses), and between
    pipeline stages the stream travels as one tensor ``[T, 1, H]``, ``T = B * sum_c S_c``: the
    slots' hidden states ``[S_c, B, H]`` flattened and concatenated in slot order. A teacher
    context shorter than the student's is then not padded to the student's length.

    Attributes:
        student, teacher: the rows of each model (``num_student_rows`` and ``rows - num_student_rows``).
        images: the micro-batch's distinct images (``None`` when no row has one).
        num_student_rows: ``Ns = Ks * B``.
        rows: ``R``; ``seq_length``: ``S`` (the logical layout's length).
        rollouts: ``B`` samples (use it, not ``R``, for sample/throughput accounting).
        slot_lengths: ``S_c`` per slot (student slots first).
        tokens: the loss's token indices into the logical layout's logits ``[R*S, V/tp]``.
        logits: the positions the last stage computes logits at (:func:`select_loss_positions`);
            the loss reads them with :attr:`loss_tokens`.
    """

    student: RowsInput
    teacher: RowsInput
    images: ImageSet | None
    num_student_rows: int
    rows: int
    seq_length: int
    rollouts: int
    slot_lengths: list[int]
    tokens: DistillTokens | VGSTokens
    logits: LogitSelection

    @property
    def loss_tokens(self) -> DistillTokens | VGSTokens:
        """The token indices into what the last stage returns (what the loss is bound with)."""
        return self.logits.tokens

    @property
    def stream_length(self) -> int:
        """``T``: tokens of the ``[T, 1, H]`` tensor sent between pipeline stages."""
        return self.rollouts * sum(self.slot_lengths)

    @property
    def student_slots(self) -> int:
        return self.num_student_rows // self.rollouts

    def to(self, device) -> "StreamBatch":
        return dataclasses.replace(
            self, student=self.student.to(device), teacher=self.teacher.to(device),
            images=None if self.images is None else self.images.to(device), tokens=_tokens_to(self.tokens, device),
            logits=self.logits.to(device),
        )


def _row_rollouts(stream: MicroBatchStream, rows: range, vision: Sequence[Mapping], image_token_id: int,
                  spatial_merge_size: int) -> list[int | None]:
    """Per row of ``rows``, the rollout whose image it shows (``None``: no image), validated."""
    B = stream.rollouts
    out: list[int | None] = []
    for r in rows:
        n_img = int((stream.input_ids[r] == image_token_id).sum())
        if not bool(stream.row_has_image[r]):
            if n_img:
                raise ValueError(f"row {r} ({stream.row_context[r] or 'unused'}) has no image but {n_img} image tokens")
            out.append(None)
            continue
        v = vision[r % B]
        grid = v["image_grid_thw"].reshape(-1, 3)
        if grid.shape[0] != 1:
            raise ValueError(f"rollout {r % B}: expected one image, image_grid_thw has {grid.shape[0]} lines")
        expected = int(grid.prod()) // spatial_merge_size**2
        if n_img != expected:
            raise ValueError(f"row {r} ({stream.row_context[r]}): {n_img} image tokens, the image needs {expected}")
        if v["pixel_values"].shape[0] != int(grid.prod()):
            raise ValueError(f"rollout {r % B}: pixel_values has {v['pixel_values'].shape[0]} patches, grid {grid.tolist()}")
        out.append(r % B)
    return out


def slot_lengths_of(rollouts: Sequence[AssembledRollout], multiple: int) -> list[int]:
    """``S_c`` per slot: the longest row of slot ``c`` over ``rollouts`` rounded up to ``multiple`` (0: unused)."""
    slots = [r.student_slots + r.teacher_slots for r in rollouts]
    out = []
    for c in range(len(slots[0])):
        longest = max((rows[c].ids.numel() for rows in slots if rows[c] is not None), default=0)
        out.append(-(-longest // multiple) * multiple)
    return out


def stream_batch(stream: MicroBatchStream, vision: Sequence[Mapping], *, image_token_id: int,
                 spatial_merge_size: int, slot_lengths: Sequence[int] | None = None) -> StreamBatch:
    """Model inputs of one packed micro-batch.

    Args:
        stream: from :func:`~vigos_megatron.rollout.assembly.pack_distill` or ``pack_vgs``.
        vision: per rollout of the micro-batch (``B`` entries, in packing order), a mapping with
            ``pixel_values`` ``[patches, D]`` and ``image_grid_thw`` ``[1, 3]`` (the
            :class:`~vigos_megatron.data.contexts.ContextEncoder` output has both).
        image_token_id: ``<|image_pad|>`` id; each image row must hold exactly
            ``prod(grid) / spatial_merge_size**2`` of them.
        slot_lengths: ``S_c`` per slot (from :func:`slot_lengths_of` over the micro-batch's
            rollouts); ``None``: every slot at the stream's ``S``.
    """
    if len(vision) != stream.rollouts:
        raise ValueError(f"stream_batch: {len(vision)} vision entries for {stream.rollouts} rollouts")
    if stream.tokens is None:
        raise ValueError("stream_batch: the stream has no loss tokens (pack with pack_distill / pack_vgs)")
    R, S = stream.input_ids.shape
    B, ns = stream.rollouts, stream.num_student_rows
    lengths = [S] * (R // B) if slot_lengths is None else list(slot_lengths)
    if len(lengths) != R // B:
        raise ValueError(f"stream_batch: {len(lengths)} slot lengths for {R // B} slots")
    for c, s_c in enumerate(lengths):
        longest = int(stream.lengths[c * B:(c + 1) * B].max())
        if not longest <= s_c <= S:
            raise ValueError(f"stream_batch: slot {c} length {s_c} outside [{longest}, {S}]")
    args = (vision, image_token_id, spatial_merge_size)
    owners = _row_rollouts(stream, range(R), *args)
    # distinct images: a rollout's image (and a filler's copy of it: the same tensor) is stored once
    slot: dict[int, int] = {}
    pixels, grids = [], []
    for b in sorted({o for o in owners if o is not None}):
        key = id(vision[b]["pixel_values"])
        if key not in slot:
            slot[key] = len(pixels)
            pixels.append(vision[b]["pixel_values"])
            grids.append(vision[b]["image_grid_thw"].reshape(-1, 3).long())
    row_images = [None if o is None else slot[id(vision[o]["pixel_values"])] for o in owners]
    return StreamBatch(
        student=RowsInput(stream.input_ids[:ns].contiguous(), row_images[:ns]),
        teacher=RowsInput(stream.input_ids[ns:].contiguous(), row_images[ns:]),
        images=ImageSet(torch.cat(pixels), torch.cat(grids)) if pixels else None,
        num_student_rows=ns, rows=R, seq_length=S, rollouts=B, slot_lengths=lengths, tokens=stream.tokens,
        logits=select_loss_positions(stream.tokens, rollouts=B, seq_length=S, slot_lengths=lengths),
    )


def rollout_tokens(rollout: AssembledRollout) -> int:
    """Tokens of all of a rollout's rows (student and teacher slots): what it costs to run."""
    return sum(row.ids.numel() for row in rollout.student_slots + rollout.teacher_slots if row is not None)


def make_stream_batches(
    rollouts: Sequence[AssembledRollout],
    vision: Sequence[Mapping],
    *,
    rollouts_per_micro_batch: int,
    pad_id: int,
    image_token_id: int,
    spatial_merge_size: int,
    multiple: int = 64,
    pack=pack_distill,
    group_by_length: bool = False,
) -> list[StreamBatch]:
    """Split ``rollouts`` (with ``vision[i]`` the image inputs of rollout ``i``) into micro-batches.

    Groups of ``rollouts_per_micro_batch`` rollouts are packed with ``pack``
    (:func:`~vigos_megatron.rollout.assembly.pack_distill` for ViGOS/OPSD,
    :func:`~vigos_megatron.rollout.assembly.pack_vgs` for VGS). Each micro-batch has its own
    shape: ``S`` is its longest row and slot ``c`` runs at ``S_c``, its longest row of that slot
    (:func:`slot_lengths_of`), both rounded up to ``multiple``; the stream ``[T, 1, H]`` between
    pipeline stages then differs from one micro-batch to the next (megatron exchanges the shape
    first: ``variable_seq_lengths``, set by the model builder at PP > 1).

    With ``group_by_length`` the rollouts are grouped in order of decreasing
    :func:`rollout_tokens` (ties by index) instead of consecutively, so that rows of similar
    length share a micro-batch and little of it is padding. The loss is a sum over tokens
    normalised by global counts, so the grouping does not change it (up to summation order).
    """
    if len(rollouts) != len(vision):
        raise ValueError(f"{len(rollouts)} rollouts but {len(vision)} vision entries")
    B = rollouts_per_micro_batch
    if B <= 0 or len(rollouts) % B:
        raise ValueError(f"{len(rollouts)} rollouts do not split into micro-batches of {B}")
    order = list(range(len(rollouts)))
    if group_by_length:
        order.sort(key=lambda i: (-rollout_tokens(rollouts[i]), i))
    out = []
    for k in range(0, len(order), B):
        idx = order[k:k + B]
        group = [rollouts[i] for i in idx]
        out.append(stream_batch(
            pack(group, pad_id=pad_id, seq_length=padded_length(group, multiple)),
            [vision[i] for i in idx], image_token_id=image_token_id,
            spatial_merge_size=spatial_merge_size, slot_lengths=slot_lengths_of(group, multiple),
        ))
    return out
