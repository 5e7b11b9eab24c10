"""The ``forward_step_func`` of megatron's schedule for the student+teacher stream, and running it.

``get_forward_backward_func()`` is called with ``seq_length=T`` and ``micro_batch_size=1``
(``T = B * sum_c S_c``, the stream's tokens: every slot at its own length) so that its p2p
buffers are the stream ``[T, 1, H]``. On the last stage :func:`forward_step_func` returns
the stage's output at the positions the loss reads (hidden states ``[N, H]`` or logits
``[N, V/tp]``, indexed by ``batch.tokens``) and a loss function that reads it through the stage's
``scored_rows`` (with the output weights when from hidden states); the objective
(:mod:`vigos_megatron.losses.objectives`) needs ``config.calculate_per_token_loss=True``.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.distributed as dist

from vigos_megatron.collectives import all_reduce, group_size
from vigos_megatron.losses.objectives import check_schedule_config
from vigos_megatron.runtime import compute_device, model_device
from vigos_megatron.schedule.batch import StreamBatch

#: report key holding ``[sum of returned losses, sum of num_tokens]`` of a micro-batch
LOSS_KEY = "loss"


class ReportedLoss:
    """An objective whose report also carries ``[loss, num_tokens]`` (megatron's reported loss).

    ``sum(loss) / sum(num_tokens)`` over micro-batches and data-parallel ranks is the step's
    objective (the value whose gradient ``finalize_model_grads`` produces).
    """

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, tokens, output_tensor):
        loss, num_tokens, report = self.objective(tokens, output_tensor)
        report = dict(report)
        report[LOSS_KEY] = torch.stack([loss.detach().double().reshape(()), num_tokens.double().reshape(())])
        return loss, num_tokens, report




def forward_step_func(data_iterator, model, *, loss_fn):
    """One micro-batch: ``model`` (the DDP-wrapped :class:`StudentTeacherStage`) on the next :class:`StreamBatch`.

    Bind ``loss_fn`` (e.g. ``ReportedLoss(vigos_loss(...))``) with ``functools.partial``.
    Returns ``(output, loss_func)``; output is the stream ``[T, 1, H]`` or, on the last stage, the
    hidden states ``[N, H]`` or logits ``[N, V/tp]`` that ``batch.tokens`` index, and
    ``loss_func(output) = loss_fn(batch.tokens, stage.scored_rows(output))``.
    """
    from megatron.core.utils import get_attr_wrapped_model

    batch: StreamBatch = next(data_iterator).to(model_device(model))
    output = model(batch)
    return output, partial(_loss_on_rows, loss_fn, batch.tokens, get_attr_wrapped_model(model, "scored_rows"))


def _loss_on_rows(loss_fn, tokens, scored_rows, output):
    return loss_fn(tokens, scored_rows(output))


def run_stream_schedule(model: list, batches: Sequence[StreamBatch], loss_fn, *, forward_only: bool = False,
                        pg_collection=None) -> list[dict]:
    """Run megatron's pipeline schedule over ``batches`` (one iteration); return the last stage's reports.

    ``model``: this rank's chunks (one DDP-wrapped stage, no virtual pipeline). The batches share
    their rows ``R`` and student rows; their slot lengths (so the stream ``[T, 1, H]`` sent between
    stages) may differ, which at PP > 1 needs ``variable_seq_lengths`` in the model config
    (megatron then sends each tensor's shape before it). With a ``finalize_model_grads_func`` in the
    config (and not ``forward_only``) the gradients are finalised (DP reduction, embedding
    all-reduce, division by the global token count). The returned list is empty on stages other
    than the last.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if not batches:
        raise ValueError("run_stream_schedule: no micro-batches")
    config = get_model_config(model[0])
    check_schedule_config(config)
    rows = {(b.rows, b.num_student_rows) for b in batches}
    if len(rows) != 1:
        raise ValueError(f"micro-batches of one schedule call must share (R, Ns); got {sorted(rows)}")
    streams = {b.stream_length for b in batches}
    if len(streams) > 1 and config.pipeline_model_parallel_size > 1 and not config.variable_seq_lengths:
        raise ValueError(f"micro-batches with streams of {sorted(streams)} tokens at PP > 1 need "
                         "variable_seq_lengths=True in the model config (megatron's p2p buffers are fixed-size)")
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step_func, loss_fn=loss_fn),
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=max(streams),  # the p2p buffer size when the shapes are fixed (then all equal)
        micro_batch_size=1,
        forward_only=forward_only,
        **kwargs,
    )


def reduce_reports(reports: Sequence[dict], dp_group=None) -> dict[str, float]:
    """``{key: sum(numerator) / sum(denominator)}`` over micro-batches and data-parallel ranks.

    Every report value is a ``[numerator, denominator]`` pair; ``reports[LOSS_KEY]`` gives the
    step's loss. Call on the last pipeline stage (other stages get ``{}``); all ranks of
    ``dp_group`` must call it.
    """
    if not reports:
        return {}
    keys = sorted(set().union(*reports))
    dp = group_size(dp_group)
    if dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, keys, group=dp_group)
        keys = sorted(set().union(*gathered))
    sums = torch.zeros(len(keys), 2, dtype=torch.float64)
    for rep in reports:
        for i, k in enumerate(keys):
            if k in rep:
                sums[i] += torch.as_tensor(rep[k], dtype=torch.float64).detach().cpu().reshape(2)
    if dp > 1:
        sums = all_reduce(sums.to(compute_device()), dp_group).cpu()
    return {k: float(sums[i, 0] / sums[i, 1]) if sums[i, 1] != 0 else float("nan") for i, k in enumerate(keys)}
