"""Stage 3 of an iteration: ONE megatron schedule call over the step's micro-batches, then the
optimizer step over the student's parameters.

The frozen teacher runs inside the same schedule (``StudentTeacherStage``): its rows travel with
the student's through every pipeline stage and its logits are read by the loss on the last stage,
never stored or shipped. ``finalize_model_grads`` reduces the gradients over data-parallel ranks
and divides them by the global supervised-token count (the objectives' normalisation).

A step whose loss or gradient norm is not finite on any rank is not applied: with
``on_nonfinite="skip"`` the gradients are dropped (the step still counts, the LR schedule does
not advance); with ``"stop"`` :class:`NonFiniteStep` is raised before the optimizer touches a
weight, so the last checkpoint stays good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist


class NonFiniteStep(RuntimeError):
    """The step's loss or gradient norm is NaN/inf (``train.on_nonfinite=stop``)."""


@dataclass
class UpdateResult:
    #: the step's objective (same value on every rank)
    loss: float
    #: ``{key: value}`` of the objective's reports (every rank)
    reports: dict = field(default_factory=dict)
    grad_norm: float = float("nan")
    lr: float = float("nan")
    applied: bool = True


def share_from_last_stage(obj, ps):
    """The last pipeline stage's ``obj`` (a small picklable value) on every rank of the pipeline group."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def _any_rank(flag: bool, device) -> bool:
    from vigos_megatron.collectives import reduce_int

    return reduce_int(int(flag), dist.group.WORLD, dist.ReduceOp.MAX, device=device) > 0


@dataclass
class StepGradients:
    """One step's loss, reports and finalised gradients (not yet applied)."""

    #: the step's objective (same value on every rank)
    loss: float
    #: ``{key: value}`` of the objective's reports (every rank)
    reports: dict
    #: global norm of the student's gradients over every model-parallel shard (before clipping)
    grad_norm: float
    lr: float


def compute_gradients(model: list, optimizer, batches: list, loss_fn) -> StepGradients:
    """Forward+backward of student and teacher over ``batches`` in one schedule call.

    Afterwards every trainable parameter's ``main_grad`` holds the step's gradient, reduced over
    data-parallel ranks and divided by the global supervised-token count, and the optimizer's
    gradients are prepared (copied to its fp32 main parameters); nothing is applied yet.
    Arguments as in :func:`train_step`.
    """
    from megatron.core import parallel_state as ps

    from vigos_megatron.schedule.forward_step import LOSS_KEY, reduce_reports, run_stream_schedule

    for m in model:
        m.train()
        m.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_stream_schedule(model, batches, loss_fn)
    # {key: value} over micro-batches and DP ranks, computed on the last stage, known on every rank
    reduced = share_from_last_stage(reduce_reports(reports, ps.get_data_parallel_group()), ps)
    optimizer.prepare_grads()
    return StepGradients(loss=reduced.get(LOSS_KEY, float("nan")), reports=reduced,
                         grad_norm=float(optimizer.get_grad_norm()), lr=float(optimizer.param_groups[0]["lr"]))


def probe_gradient_norms(model: list, optimizer, batches: list, probes: dict) -> dict:
    """``{name: global gradient norm}`` of each probe loss (``{name: loss callable}``) over ``batches``.

    One schedule call per probe (forward+backward of student and teacher), its gradient finalised
    like the step's own (reduced over data-parallel ranks, divided by the global token count) and its
    norm taken over every model-parallel shard by the optimizer; nothing is applied. The step's own
    :func:`compute_gradients` starts from zeroed buffers afterwards, so its update is unchanged.
    """
    from vigos_megatron.schedule.forward_step import ReportedLoss

    return {name: compute_gradients(model, optimizer, batches, ReportedLoss(fn)).grad_norm for name, fn in probes.items()}


def teacher_pass_reports(model: list, batches: list, fn) -> list[dict]:
    """The last stage's reports of ``fn`` (``(tokens, output) -> (loss, num_tokens, report)``, an objective's
    :meth:`~vigos_megatron.objectives.base.Objective.teacher_pass`) on the teacher's rows of ``batches``.

    One forward-only schedule call over the batches' :meth:`~vigos_megatron.schedule.batch.StreamBatch.teacher_only`
    views, without autograd: only the teacher's slots run and travel between the stages (about the teacher's
    forward FLOPs of the step once more), no gradient buffer is touched. ``[]`` on the other stages.
    """
    import torch

    from vigos_megatron.schedule.forward_step import run_stream_schedule

    with torch.no_grad():
        return run_stream_schedule(model, [b.teacher_only() for b in batches], fn, forward_only=True)


def train_step(model: list, optimizer, scheduler, batches: list, loss_fn, *, on_nonfinite: str = "skip") -> UpdateResult:
    """Forward+backward of student and teacher over ``batches`` in one schedule call, then the update.

    Args:
        model: ``[DistributedDataParallel(StudentTeacherStage)]`` (this rank's stage).
        optimizer, scheduler: megatron-core optimizer over the student's parameters and its LR scheduler.
        batches: the step's :class:`~vigos_megatron.schedule.batch.StreamBatch` micro-batches (one ``R, S``).
        loss_fn: ``ReportedLoss`` of the step's objective.
    """
    from vigos_megatron.runtime import compute_device

    g = compute_gradients(model, optimizer, batches, loss_fn)
    loss, reduced, grad_norm, lr = g.loss, g.reports, g.grad_norm, g.lr
    if _any_rank(not (math.isfinite(loss) and math.isfinite(grad_norm)), compute_device()):
        optimizer.zero_grad()
        for m in model:
            m.zero_grad_buffer()
        if on_nonfinite == "stop":
            raise NonFiniteStep(f"non-finite step: loss {loss}, gradient norm {grad_norm}; no update was applied "
                                "(train.on_nonfinite=stop)")
        return UpdateResult(loss=loss, reports=reduced, grad_norm=grad_norm, lr=lr, applied=False)
    ok, step_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return UpdateResult(loss=loss, reports=reduced, grad_norm=float(step_norm) if step_norm is not None else grad_norm,
                        lr=lr, applied=bool(ok))
