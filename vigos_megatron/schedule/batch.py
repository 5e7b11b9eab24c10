"""Assembled rollouts -> the per-micro-batch model inputs of :class:`~vigos_megatron.schedule.stage.StudentTeacherStage`.

A micro-batch of ``B`` rollouts is packed by :func:`~vigos_megatron.schedule.assembly.pack_distill`
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
* the length of every slot and the positions whose logits a loss reads (from the packing, with the
  loss tokens already indexing the last stage's ``[N, V/tp]`` output): each slot runs at its own
  length, so a short teacher context is not padded to the student's.

Micro-batches of one schedule call may differ in length (at PP > 1 megatron exchanges each
stream's shape first, ``variable_seq_lengths``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from vigos_megatron.losses.objectives import DistillTokens, VGSTokens
from vigos_megatron.schedule.assembly import AssembledRollout, MicroBatchStream, pack_distill


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


def _tokens_to(tokens, device):
    return dataclasses.replace(tokens, **{
        f.name: getattr(tokens, f.name).to(device)
        for f in dataclasses.fields(tokens) if isinstance(getattr(tokens, f.name), Tensor)
    })


@dataclass
class StreamBatch:
    """One micro-batch of the student+teacher stream.

    Slot ``c`` of rollout ``b`` is row ``c * B + b``; the first ``num_student_rows = Ks * B`` rows
    are the student's. Slot ``c``'s ``B`` rows run at ``slot_lengths[c]`` (``S_c``, the
    micro-batch's longest row of that slot rounded up; 0 for a slot none of its rollouts uses),
    and between pipeline stages the stream travels as one tensor ``[T, 1, H]``,
    ``T = B * sum_c S_c``: the slots' hidden states ``[S_c, B, H]`` flattened and concatenated in
    slot order. A teacher context shorter than the student's is then not padded to its length.

    Attributes:
        student, teacher: the rows of each model (``num_student_rows`` and ``rows - num_student_rows``).
        images: the micro-batch's distinct images (``None`` when no row has one).
        num_student_rows: ``Ns = Ks * B``; ``rows``: ``R``.
        rollouts: ``B`` samples (use it, not ``R``, for sample/throughput accounting).
        slot_lengths: ``S_c`` per slot (student slots first).
        positions: per slot, int64 ``[N_c]`` sorted flat positions ``b * S_c + column`` whose
            logits the last stage computes (its output: ``[sum_c N_c, V/tp]``, slot order).
        tokens: the loss's token indices into that output.
    """

    student: RowsInput
    teacher: RowsInput
    images: ImageSet | None
    num_student_rows: int
    rows: int
    rollouts: int
    slot_lengths: list[int]
    positions: list[Tensor]
    tokens: DistillTokens | VGSTokens

    @property
    def seq_length(self) -> int:
        """``S = max_c S_c``: the width of :attr:`RowsInput.input_ids`."""
        return max(self.slot_lengths)

    @property
    def stream_length(self) -> int:
        """``T``: tokens of the ``[T, 1, H]`` tensor sent between pipeline stages."""
        return self.rollouts * sum(self.slot_lengths)

    @property
    def student_slots(self) -> int:
        return self.num_student_rows // self.rollouts

    def teacher_only(self) -> "StreamBatch":
        """This micro-batch without its student rows, for a pass of the teacher alone: the student's slots
        empty (``S_c = 0``: the stage skips them and the stream carries the teacher's part only), no student
        image row, no student position; the tokens' teacher indices shifted to index the teacher's rows alone
        (the last stage then returns none of the student's). The tokens' student indices are left as they
        are and do not index that output: such a pass reads teacher rows only."""
        ks = self.student_slots
        scored = sum(int(p.numel()) for p in self.positions[:ks])
        shifted = {f.name: getattr(self.tokens, f.name) - scored for f in dataclasses.fields(self.tokens)
                   if f.name.startswith("teacher_")}
        empty = [p[:0] for p in self.positions[:ks]]
        return dataclasses.replace(
            self, student=RowsInput(self.student.input_ids, [None] * len(self.student.row_images)),
            slot_lengths=[0] * ks + self.slot_lengths[ks:], positions=empty + self.positions[ks:],
            tokens=dataclasses.replace(self.tokens, **shifted))

    def to(self, device) -> "StreamBatch":
        return dataclasses.replace(
            self, student=self.student.to(device), teacher=self.teacher.to(device),
            images=None if self.images is None else self.images.to(device),
            positions=[p.to(device) for p in self.positions], tokens=_tokens_to(self.tokens, device),
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


def stream_batch(stream: MicroBatchStream, vision: Sequence[Mapping], *, image_token_id: int,
                 spatial_merge_size: int) -> StreamBatch:
    """Model inputs of one packed micro-batch.

    Args:
        stream: from :func:`~vigos_megatron.schedule.assembly.pack_distill` or ``pack_vgs``.
        vision: per rollout of the micro-batch (``B`` entries, in packing order), a mapping with
            ``pixel_values`` ``[patches, D]`` and ``image_grid_thw`` ``[1, 3]`` (the
            :class:`~vigos_megatron.data.contexts.ContextEncoder` output has both).
        image_token_id: ``<|image_pad|>`` id; each image row must hold exactly
            ``prod(grid) / spatial_merge_size**2`` of them.
    """
    if len(vision) != stream.rollouts:
        raise ValueError(f"stream_batch: {len(vision)} vision entries for {stream.rollouts} rollouts")
    R = stream.input_ids.shape[0]
    ns = stream.num_student_rows
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
        num_student_rows=ns, rows=R, rollouts=stream.rollouts, slot_lengths=list(stream.slot_lengths),
        positions=stream.positions, tokens=stream.tokens,
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
    (:func:`~vigos_megatron.schedule.assembly.pack_distill` for ViGOS/OPSD,
    :func:`~vigos_megatron.schedule.assembly.pack_vgs` for VGS). Each micro-batch has its own
    shape: slot ``c`` runs at ``S_c``, its longest row of that slot rounded up to ``multiple``
    (:func:`~vigos_megatron.schedule.assembly.slot_lengths`); the stream ``[T, 1, H]`` between
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
        out.append(stream_batch(pack(group, pad_id=pad_id, multiple=multiple), [vision[i] for i in idx],
                                image_token_id=image_token_id, spatial_merge_size=spatial_merge_size))
    return out
