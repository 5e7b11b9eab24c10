"""One training step's gradients under a given configuration, on given rollouts, for comparing
precisions (``benchmarks/bench_precision.py`` prints them; ``tests/dist/precision_worker.py``
bounds them).

:func:`step_gradients` builds the run with the training's own set-up (``training/setup.py``
``build_run``), scores the rollouts (``training/scoring.py``) and runs the step without its update
(``training/update.py`` ``compute_gradients``). It returns the loss, the reports, the gradient
norm, every trainable student parameter's DP-reduced gradient (fp32) and the per-token KL the
loss used. :func:`grad_errors` compares two such gradients over the tensor- and data-parallel
shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class StepRecord:
    loss: float
    #: ``{key: value}``: the objective's reports (``kl/<term>``, ``clip_fraction``, ``loss``)
    reports: dict
    grad_norm: float
    #: ``{name: fp32 gradient}`` of every trainable student parameter (this rank's TP shard)
    grads: dict
    #: fp32 ``[n]``: per-token KL as the loss used it (clipped tokens at the clip), this rank's tokens
    kl: Tensor
    #: bool ``[n]``: the tokens the clip zeroed
    clipped: Tensor
    logits_dtype: torch.dtype


class CapturingLoss:
    """The step's loss, keeping each micro-batch's tokens and (detached) logits for the per-token KL."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.seen = []

    def __call__(self, tokens, output):
        """``output``: the stage's :class:`~vigos_megatron.losses.scored_rows.LogitsOutput` (the loss from logits)."""
        self.seen.append((tokens, output.logits.detach().clone()))
        return self.loss_fn(tokens, output)


def token_kl(loss, seen) -> Tensor:
    """fp32 ``[n]``: the per-token KL (clipped values) of the captured micro-batches, through the
    objective's own settings (a :class:`~vigos_megatron.losses.objectives.SegmentedDistillationLoss`)."""
    from vigos_megatron.losses.vocab_parallel_kl import LogitRows, kl_rows

    out = []
    with torch.no_grad():
        for tokens, logits in seen:
            seg = tokens.segment.to(logits.device)
            out.append(kl_rows(LogitRows(logits, tokens.student_index), LogitRows(logits, tokens.teacher_index),
                               reverse=loss.reverse_of_segment.to(logits.device)[seg], temperature=loss.temperature,
                               clip=loss.clip, tp_group=loss.tp_group, chunk_bytes=loss.chunk_bytes, impl=loss.impl))
    return torch.cat(out) if out else torch.zeros(0)


def reduce_sharded_gradients(model: list) -> None:
    """With the distributed optimizer, make every rank's gradient buffer hold the whole DP-reduced
    gradient (megatron's reduce-scatter leaves it only in this rank's shard of each bucket): each
    rank contributes its shard, zeros elsewhere, summed over the group. In place; the step must
    not be applied afterwards. A no-op without the distributed optimizer."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in model:
        if not chunk.ddp_config.use_distributed_optimizer:
            continue
        for group in chunk.bucket_groups:
            size, rank = group.intra_distributed_optimizer_instance_size, group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                own = shard_buffer(bucket.grad_data, size)[rank].clone()
                bucket.grad_data.zero_()
                shard_buffer(bucket.grad_data, size)[rank].copy_(own)
                dist.all_reduce(bucket.grad_data, group=group.intra_distributed_optimizer_instance_group)


def step_gradients(cfg, layout, rollouts, ps) -> StepRecord:
    """Build ``cfg``'s run (``layout``), score ``rollouts`` (this data-parallel rank's), compute
    the step's gradients; see the module docstring. Objectives with segmented terms (vigos, opsd, opd)."""
    from vigos_megatron.losses.objectives import SegmentedDistillationLoss
    from vigos_megatron.training.scoring import build_step_inputs
    from vigos_megatron.training.setup import build_run
    from vigos_megatron.training.update import compute_gradients

    if cfg.loss.from_hidden:
        raise ValueError("step_gradients compares the logits the loss reads: set loss.from_hidden=false")
    ctx, _ = build_run(cfg, layout)
    inputs = build_step_inputs(rollouts, cfg, hf_config=ctx.models.builder.hf_config, pad_id=ctx.pad_id, cut=ctx.cut,
                               model=ctx.models.model, dp_group=ps.get_data_parallel_group(),
                               tp_group=ps.get_tensor_model_parallel_group())
    loss = inputs.loss_fn.objective
    if not isinstance(loss, SegmentedDistillationLoss):
        raise ValueError(f"step_gradients: objective {cfg.loss.objective} has no segmented terms (vigos, opsd, opd)")
    capture = CapturingLoss(inputs.loss_fn)
    g = compute_gradients(ctx.models.model, ctx.optimizer, inputs.batches, capture)
    reduce_sharded_gradients(ctx.models.model)
    grads = {name: p.main_grad.detach().float().clone() for name, p in ctx.models.student[0].named_parameters()
             if p.requires_grad}
    kl = token_kl(loss, capture.seen)
    clipped = kl >= loss.clip if loss.clip is not None else torch.zeros_like(kl, dtype=torch.bool)
    return StepRecord(loss=g.loss, reports=g.reports, grad_norm=g.grad_norm, grads=grads, kl=kl, clipped=clipped,
                      logits_dtype=capture.seen[0][1].dtype if capture.seen else torch.float32)


def grad_errors(grads: dict, ref: dict, tp_group) -> tuple[list[tuple[str, float]], float]:
    """Per-parameter ``|g - g_ref| / |g_ref|`` and the whole gradient's, the squares summed over the
    TP shards (a replicated tensor counts once per rank in both sums: the ratio is its own).
    Every rank of ``tp_group`` calls it; ``ref``'s names are compared."""
    from vigos_megatron.collectives import all_reduce

    names = sorted(ref)
    sq = torch.stack([torch.stack([(grads[n].double() - ref[n].double()).pow(2).sum(), ref[n].double().pow(2).sum()])
                      for n in names])
    sq = all_reduce(sq, tp_group)
    per = [(n, math.sqrt(d / r) if r > 0 else float("nan")) for n, (d, r) in zip(names, sq.tolist())]
    return per, math.sqrt(float(sq[:, 0].sum() / sq[:, 1].sum()))
