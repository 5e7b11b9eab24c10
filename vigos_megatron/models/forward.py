"""Forward passes of Qwen2.5-VL model chunks, alone or through megatron's pipeline schedule.

A *VLM batch* is a dict with the processor's outputs:

* ``input_ids``      ``[B, S]`` int64 (image placeholders = ``config.image_token_id``),
* ``pixel_values``   ``[N_patches, C*T*P*P]`` (all images of the batch, flattened patches),
* ``image_grid_thw`` ``[N_images, 3]``.

Every pipeline stage needs ``input_ids`` and ``image_grid_thw`` (mrope position ids are
computed on each stage); only the first stage uses ``pixel_values``. Logits are
``[B, S, V/TP]`` (vocabulary-sharded over the tensor-parallel group) on the last stage.
"""

from __future__ import annotations

from functools import partial

import torch


def batch_to(batch: dict, device) -> dict:
    """``batch`` with every tensor moved to ``device`` (non-tensors kept)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def chunk_forward(model, batch: dict) -> torch.Tensor:
    """Run one model chunk on ``batch`` (no pipeline schedule: PP=1, or stage-local under PP).

    The inputs are moved to the model's device first (they are usually built on the CPU).
    """
    from vigos_megatron.runtime import model_device

    batch = batch_to(batch, model_device(model))
    return model(
        input_ids=batch["input_ids"],
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch.get("attention_mask_4d"),
    )


def _forward_step(data_iterator, model, *, collect: list):
    batch = next(data_iterator)
    output = chunk_forward(model, batch)

    def loss_func(output_tensor):
        collect.append(output_tensor.detach())
        return output_tensor.sum() * 0.0, {}

    return output, loss_func


def pipeline_forward_logits(chunks: list, batches: list[dict]) -> list[torch.Tensor] | None:
    """Forward-only through megatron's pipeline schedule, one micro-batch per entry of ``batches``.

    All micro-batches must share ``[B, S]``. Returns the vocabulary-sharded logits
    ``[B, S, V/TP]`` of each micro-batch on the last pipeline stage, ``None`` on other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = batches[0]["input_ids"].shape
    for i, bt in enumerate(batches):
        if tuple(bt["input_ids"].shape) != (b, s):
            raise ValueError(f"micro-batch {i}: input_ids shape {tuple(bt['input_ids'].shape)} != {(b, s)}")
    collect: list[torch.Tensor] = []
    fwd_bwd = get_forward_backward_func()
    with torch.no_grad():
        fwd_bwd(
            forward_step_func=partial(_forward_step, collect=collect),
            data_iterator=iter(batches),
            model=chunks,
            num_microbatches=len(batches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return collect


def gather_vocab_shards(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V/TP]`` -> ``[..., V]`` over the tensor-parallel group (for tests / inspection)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits.contiguous())
