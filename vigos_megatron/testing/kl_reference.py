"""Independent float64 full-vocabulary references for the distillation losses (tests only)."""

from __future__ import annotations

import torch
from torch import Tensor


def kl_reference(student: Tensor, teacher: Tensor, direction: str, temperature: float = 1.0) -> Tensor:
    """float64 per-token KL over the full (unsharded) vocabulary; differentiable w.r.t. ``student``."""
    ls = torch.log_softmax(student.double() / temperature, dim=-1)
    lt = torch.log_softmax(teacher.double() / temperature, dim=-1)
    if direction == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if direction == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    raise ValueError(direction)


def clipped_reference(kl: Tensor, clip: float | None) -> Tensor:
    """Hard clamp: value ``clip`` and zero gradient where ``kl > clip``."""
    if clip is None or clip <= 0:
        return kl
    return torch.where(kl > clip, torch.full_like(kl, clip), kl)


def kl_tolerance_ok(kl: Tensor, ref: Tensor) -> tuple[bool, float]:
    """The issue's fp32 tolerance: per token ``|kl - ref| <= 1e-5 + 1e-5 * |ref|``."""
    err = (kl.detach().double() - ref.detach().double()).abs()
    bound = 1e-5 + 1e-5 * ref.detach().double().abs()
    return bool((err <= bound).all()), float(err.max()) if err.numel() else 0.0


def rel_norm_err(a: Tensor, b: Tensor) -> float:
    denom = b.double().norm()
    diff = (a.double() - b.double()).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def rows_model_kwargs(rows, images) -> dict:
    """Keyword arguments of ``Qwen25VLModel.forward`` for a :class:`~vigos_megatron.schedule.batch.RowsInput`
    at the full length ``S`` (each image row with its own copy of the pixels): the unfused reference
    path that the stage is compared with."""
    ids = rows.image_ids
    pix, grid = images.select(ids) if ids else (None, None)
    return {"input_ids": rows.input_ids, "pixel_values": pix, "image_grid_thw": grid, "attention_mask": None}


def row_and_column(batch, index):
    """For indices into the last stage's ``[N, V/tp]`` output of a packed micro-batch (a
    :class:`~vigos_megatron.schedule.assembly.MicroBatchStream` or
    :class:`~vigos_megatron.schedule.batch.StreamBatch`), the stream row ``c * B + b`` and the column
    of each: what a full-length reference forward (``[R, S, V/tp]``) reads at ``row * S + column``."""
    import torch

    index = torch.as_tensor(index, dtype=torch.long).cpu()
    sizes = torch.tensor([p.numel() for p in batch.positions])
    ends = torch.cumsum(sizes, 0)
    slot = torch.searchsorted(ends, index, right=True)
    flat = torch.cat([p.cpu() for p in batch.positions])[index]
    s_c = torch.tensor(batch.slot_lengths)[slot]
    return slot * batch.rollouts + torch.div(flat, s_c, rounding_mode="floor"), flat % s_c


def logical_index(batch, index):
    """``row * S + column`` of :func:`row_and_column`: the index into the full-length reference
    logits ``[R, S, V/tp]`` flattened batch-first."""
    row, col = row_and_column(batch, index)
    return row * batch.seq_length + col
