"""Assembled rollouts -> the per-micro-batch model inputs of :class:`~vigos_megatron.schedule.stage.StudentTeacherStage`.

A micro-batch of ``B`` rollouts is packed by :func:`~vigos_megatron.rollout.assembly.pack_distill`
into ``R`` token rows ``[R, S]`` (slot ``c`` of rollout ``b`` is row ``c * B + b``; the first
``num_student_rows`` rows are the student's). This module splits the rows into the student's
and the teacher's model inputs and attaches the image of every row that has one:

* ``input_ids`` ``[n, S]`` int64 (right padded; causal attention makes padding inert for the
  real tokens). Every pipeline stage needs them: Qwen2.5-VL computes its mrope position ids
  from ``input_ids`` and ``image_grid_thw`` on each stage;
* ``pixel_values`` ``[sum of patches, C*T*P*P]``: the images of the rows that have one,
  concatenated in row order (rollout ``b``'s image for each of its image rows; the vision
  tower runs once per image row). Only the first stage uses them;
* ``image_grid_thw`` ``[image rows, 3]`` int64, one line per image row in row order.

All micro-batches of one schedule call must share ``S`` (megatron sizes its p2p buffers as
``(seq_length, micro_batch_size, hidden)``): :func:`make_stream_batches` pads every stream of
the step to the longest and re-indexes the loss tokens accordingly.
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
class RowsInput:
    """Model inputs of one model's rows (student or teacher) in one micro-batch.

    Attributes:
        input_ids: int64 ``[n, S]``.
        pixel_values: ``[patches, C*T*P*P]`` of the image rows in row order, or ``None``.
        image_grid_thw: int64 ``[image rows, 3]`` in row order, or ``None``.
    """

    input_ids: Tensor
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None

    def model_kwargs(self) -> dict:
        """Keyword arguments of a Qwen2.5-VL chunk's forward (causal mask built by the model)."""
        return {"input_ids": self.input_ids, "pixel_values": self.pixel_values,
                "image_grid_thw": self.image_grid_thw, "attention_mask": None}

    def to(self, device) -> "RowsInput":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return RowsInput(move(self.input_ids), move(self.pixel_values), move(self.image_grid_thw))


@dataclass
class StreamBatch:
    """One micro-batch of the student+teacher stream.

    Attributes:
        student, teacher: the rows of each model (``num_student_rows`` and ``rows - num_student_rows``).
        num_student_rows: ``Ns``, the leading trainable rows of the stream.
        rows: ``R`` (the schedule's ``micro_batch_size``); ``seq_length``: ``S``.
        rollouts: ``B`` samples (use it, not ``R``, for sample/throughput accounting).
        tokens: the loss's token indices into the last stage's logits ``[R, S, V/tp]`` flattened
            to ``[R*S, V/tp]``.
    """

    student: RowsInput
    teacher: RowsInput
    num_student_rows: int
    rows: int
    seq_length: int
    rollouts: int
    tokens: DistillTokens | VGSTokens

    def to(self, device) -> "StreamBatch":
        tokens = dataclasses.replace(self.tokens, **{
            f.name: getattr(self.tokens, f.name).to(device)
            for f in dataclasses.fields(self.tokens) if isinstance(getattr(self.tokens, f.name), Tensor)
        })
        return dataclasses.replace(self, student=self.student.to(device), teacher=self.teacher.to(device), tokens=tokens)


def _rows_input(stream: MicroBatchStream, rows: range, vision: Sequence[Mapping], image_token_id: int,
                spatial_merge_size: int) -> RowsInput:
    B = stream.rollouts
    pixels, grids = [], []
    for r in rows:
        n_img = int((stream.input_ids[r] == image_token_id).sum())
        if not bool(stream.row_has_image[r]):
            if n_img:
                raise ValueError(f"row {r} ({stream.row_context[r] or 'unused'}) has no image but {n_img} image tokens")
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
        pixels.append(v["pixel_values"])
        grids.append(grid.long())
    return RowsInput(
        stream.input_ids[rows.start:rows.stop].contiguous(),
        torch.cat(pixels) if pixels else None,
        torch.cat(grids) if grids else None,
    )


def stream_batch(stream: MicroBatchStream, vision: Sequence[Mapping], *, image_token_id: int,
                 spatial_merge_size: int) -> StreamBatch:
    """Model inputs of one packed micro-batch.

    Args:
        stream: from :func:`~vigos_megatron.rollout.assembly.pack_distill` (``logits_layout="bsv"``).
        vision: per rollout of the micro-batch (``B`` entries, in packing order), a mapping with
            ``pixel_values`` ``[patches, D]`` and ``image_grid_thw`` ``[1, 3]`` (the
            :class:`~vigos_megatron.data.contexts.ContextEncoder` output has both).
        image_token_id: ``<|image_pad|>`` id; each image row must hold exactly
            ``prod(grid) / spatial_merge_size**2`` of them.
    """
    if len(vision) != stream.rollouts:
        raise ValueError(f"stream_batch: {len(vision)} vision entries for {stream.rollouts} rollouts")
    if stream.tokens is None:
        raise ValueError("stream_batch: the stream has no loss tokens (pack with pack_distill / pack_vgs)")
    R, S = stream.input_ids.shape
    ns = stream.num_student_rows
    args = (vision, image_token_id, spatial_merge_size)
    return StreamBatch(
        student=_rows_input(stream, range(0, ns), *args),
        teacher=_rows_input(stream, range(ns, R), *args),
        num_student_rows=ns, rows=R, seq_length=S, rollouts=stream.rollouts, tokens=stream.tokens,
    )


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
) -> list[StreamBatch]:
    """Split ``rollouts`` (with ``vision[i]`` the image inputs of rollout ``i``) into micro-batches of one ``S``.

    Consecutive groups of ``rollouts_per_micro_batch`` rollouts are packed with ``pack``
    (:func:`~vigos_megatron.rollout.assembly.pack_distill` for ViGOS/OPSD,
    :func:`~vigos_megatron.rollout.assembly.pack_vgs` for VGS) to one ``S``: the longest row of the
    step rounded up to ``multiple`` (the schedule sizes every p2p buffer with it).
    """
    if len(rollouts) != len(vision):
        raise ValueError(f"{len(rollouts)} rollouts but {len(vision)} vision entries")
    B = rollouts_per_micro_batch
    if B <= 0 or len(rollouts) % B:
        raise ValueError(f"{len(rollouts)} rollouts do not split into micro-batches of {B}")
    groups = [range(i, i + B) for i in range(0, len(rollouts), B)]
    S = padded_length(list(rollouts), multiple)
    return [
        stream_batch(
            pack([rollouts[i] for i in g], pad_id=pad_id, seq_length=S, logits_layout="bsv"),
            [vision[i] for i in g], image_token_id=image_token_id, spatial_merge_size=spatial_merge_size,
        )
        for g in groups
    ]
