"""The student's optimizer: megatron-core Adam with decoupled weight decay, LR warmup + decay.

What :func:`build_optimizer` returns is megatron-core's own machinery, configured from
:class:`~vigos_megatron.config.train.OptimizerConfig`:

* **Parameters.** Only parameters with ``requires_grad`` enter megatron's parameter groups, and
  megatron DDP only gives those a gradient buffer: the frozen teacher inside
  :class:`~vigos_megatron.schedule.stage.StudentTeacherStage` never reaches the optimizer
  (:func:`build_optimizer` checks it). Biases and 1-D tensors (norms) get no weight decay
  (megatron's standard overrides).
* **Update.** ``theta <- theta - lr * (m_hat / (sqrt(v_hat) + eps) + wd * theta)`` (AdamW,
  ``decoupled_weight_decay=True``), gradients clipped to a global norm of ``clip_grad`` over
  every model-parallel shard first (``clip_grad <= 0``: no clipping).
* **Precision.** The dtype of the student's parameters decides: bf16 parameters (GPU) get fp32
  main weights and fp32 Adam moments inside megatron's mixed-precision optimizer (``bf16=True``;
  the bf16 model weights are refreshed from the fp32 main weights after each step); fp32
  parameters (CPU) are updated in place by the fp32 optimizer. Gradients are accumulated and
  reduced in fp32 (``grad_reduce_in_fp32``, :func:`ddp_config`).
* **Distributed optimizer** (``optimizer.distributed_optimizer`` and DP > 1): Adam moments and
  fp32 main weights are sharded over the data-parallel ranks (ZeRO-1); gradients are
  reduce-scattered and the updated parameters all-gathered. By default
  (``optimizer.overlap_param_gather=false``) the all-gather runs synchronously inside
  ``optimizer.step()``: every rank holds the complete post-step weights when the step returns.
  With ``overlap_param_gather=true`` (:func:`ddp_config`) the step updates only this rank's
  shard of each parameter and megatron DDP defers the all-gather to forward pre-hooks registered
  on every submodule of the wrapped stage (the student's too, so they also fire inside the rollout
  engine). Whatever reads the weights outside a forward (a checkpoint save, anything inspecting
  ``parameters()``) would see the other ranks' shards still at their pre-step values, and a
  gather left to the hooks inside generation is a data-parallel all-gather issued by the rollout
  engine, whose data-parallel ranks otherwise never communicate (a rank that generates nothing
  would leave the others waiting). :func:`ensure_params_gathered` is the guard the loop calls
  before every rollout and the checkpoint before every save: it completes every pending gather
  synchronously, so generation and saving issue no data-parallel communication (a no-op without
  overlap). ``tests/test_training_dp_weights.py`` checks both layouts at DP=2.
  With ``overlap_grad_reduce=False`` megatron puts all trainable parameters of a dtype in ONE
  bucket, and the next forward after a step is always generation (guarded), so the option moves
  the gather out of ``step()`` rather than overlapping it with compute. ``align_param_gather``
  (interleaved pipelines only) stays off: there is one model chunk per rank.

LR schedule (megatron's :class:`OptimizerParamScheduler`, stepped once per applied optimizer
step, so ``scheduler.num_steps`` = optimizer steps done). With ``T = total_steps``, warmup
``W = min(warmup_steps, T)`` and ``n`` = steps done before an update, that update runs at::

    n <= W (W > 0):  lr * n / W                           (linear warmup from 0, as megatron / HF)
    otherwise:       min_lr + (lr - min_lr) * c(r),        r = (n - W) / (T - W) in [0, 1)
                     c = 1 - r (linear), (1 + cos(pi r)) / 2 (cosine), 1 (constant)

so the first update of a run with warmup runs at lr 0 (Adam moments still advance) and the last
update of a decaying schedule runs just above ``min_lr`` (never exactly at it). ``T = 1`` is
valid: one update at ``lr`` (no warmup) or at 0 (warmup clamped to 1 step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import OptimizerConfig


class OptimizerBuildError(ValueError):
    """The model or the configuration cannot be given an optimizer; the message says why."""


def _trainable_dtype(model: list) -> torch.dtype:
    dtypes = {p.dtype for chunk in model for p in chunk.parameters() if p.requires_grad}
    if not dtypes:
        raise OptimizerBuildError("model: no parameter requires grad on this rank (nothing to optimise)")
    if len(dtypes) > 1:
        raise OptimizerBuildError(f"model: the trainable parameters mix dtypes {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    if dtype not in (torch.float32, torch.bfloat16):
        raise OptimizerBuildError(f"model: trainable parameters in {dtype}; supported: float32 (CPU), bfloat16 (GPU)")
    return dtype


def ddp_config(cfg: "OptimizerConfig", *, dp_size: int):
    """The :class:`DistributedDataParallelConfig` the caller wraps the student+teacher stage with.

    Args:
        cfg: :class:`~vigos_megatron.config.train.OptimizerConfig`.
        dp_size: data-parallel world size (the distributed optimizer is used only when > 1).

    Gradients are accumulated and reduced in fp32; ``overlap_param_gather`` follows
    ``cfg.overlap_param_gather`` with the distributed optimizer and is off otherwise (megatron's
    DDP would take it for the layer-wise optimizer's gather; see the module docstring and
    :func:`ensure_params_gathered`); ``overlap_grad_reduce=False`` (a micro-batch without images
    leaves the vision tower without gradients, which megatron's overlapped bucket reduction
    would reject).
    """
    from megatron.core.distributed import DistributedDataParallelConfig

    use_dist = bool(cfg.distributed_optimizer and dp_size > 1)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=bool(use_dist and cfg.overlap_param_gather),
        use_distributed_optimizer=use_dist,
        average_in_collective=False,  # required by calculate_per_token_loss
    )


def lr_schedule_steps(warmup_steps: int, total_steps: int) -> tuple[int, int]:
    """``(W, D)``: megatron's warmup and decay step counts for a run of ``total_steps`` updates.

    ``W = min(warmup_steps, total_steps)``; ``D = total_steps``, or ``total_steps + 1`` when the
    whole run is warmup (megatron requires ``W < D``; the decay is then never reached).
    """
    if total_steps < 1:
        raise OptimizerBuildError(f"total_steps: must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise OptimizerBuildError(f"warmup_steps: must be >= 0, got {warmup_steps}")
    w = min(warmup_steps, total_steps)
    return w, (total_steps if w < total_steps else total_steps + 1)


def build_scheduler(cfg: "OptimizerConfig", optimizer, *, total_steps: int):
    """megatron's :class:`OptimizerParamScheduler` for ``cfg`` (see the module docstring).

    On checkpoint load the configuration wins over the stored schedule (``override``), and the
    step count comes from the checkpoint; :mod:`~vigos_megatron.training.checkpoint` warns when
    the two schedules differ.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup, decay = lr_schedule_steps(cfg.warmup_steps, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def megatron_optimizer_config(cfg: "OptimizerConfig", *, params_dtype: torch.dtype, dp_size: int):
    """megatron-core's ``OptimizerConfig`` for :class:`~vigos_megatron.config.train.OptimizerConfig`."""
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig

    use_dist = bool(cfg.distributed_optimizer and dp_size > 1)
    return McoreOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        decoupled_weight_decay=True,
        clip_grad=cfg.clip_grad if cfg.clip_grad > 0 else 0.0,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_dist,
        # megatron asks for the DDP value here too (it reads it only for MXFP8 parameter gathers)
        overlap_param_gather=bool(use_dist and cfg.overlap_param_gather),
    )


def _check_adam_class() -> None:
    """Refuse megatron's Adam if it resolved to the Transformer Engine stand-in (never a fake kernel)."""
    import sys

    import megatron.core.optimizer as mopt

    from vigos_megatron.platform import is_te_standin

    cls = getattr(mopt, "Adam", None)
    module = getattr(cls, "__module__", "")
    if module.startswith("transformer_engine") and is_te_standin(sys.modules.get(module)):
        raise OptimizerBuildError(
            "megatron-core resolved Adam to the Transformer Engine stand-in: import megatron.core.optimizer "
            "before vigos_megatron.platform.activate() installs it"
        )


def _optimizer_tensor_ids(optimizer) -> set[int]:
    """ids of every model parameter an (chained) megatron optimizer holds or updates."""
    ids = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for attr in ("model_float16_groups", "model_fp32_groups", "float16_groups", "fp32_from_fp32_groups"):
            for group in getattr(opt, attr, None) or []:
                ids.update(id(p) for p in group)
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            for group in inner.param_groups:
                ids.update(id(p) for p in group["params"])
    return ids


def build_optimizer(cfg: "OptimizerConfig", model: list, *, total_steps: int, dp_size: int):
    """``(optimizer, scheduler)`` over the trainable parameters of ``model``.

    Args:
        cfg: :class:`~vigos_megatron.config.train.OptimizerConfig`.
        model: this rank's DDP-wrapped chunks, ``[DistributedDataParallel(StudentTeacherStage)]``,
            wrapped with :func:`ddp_config` (``cfg``, ``dp_size``).
        total_steps: optimizer steps of the whole run (``train.steps``; sets the LR schedule).
        dp_size: data-parallel world size.

    Returns megatron's ``ChainedOptimizer`` (``step()`` -> ``(applied, grad_norm, num_zeros)``;
    ``param_groups[0]["lr"]`` is the LR of the next update) and its ``OptimizerParamScheduler``
    (call ``scheduler.step(increment=1)`` after each applied update). Raises
    :class:`OptimizerBuildError` when a frozen parameter (the teacher) would reach the optimizer
    or the DDP wrapping disagrees with ``cfg``.
    """
    from megatron.core.optimizer import get_megatron_optimizer

    if not model:
        raise OptimizerBuildError("model: empty list of model chunks")
    want_dist = bool(cfg.distributed_optimizer and dp_size > 1)
    for i, chunk in enumerate(model):
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is None:
            raise OptimizerBuildError(f"model[{i}]: not wrapped with megatron DistributedDataParallel (see ddp_config())")
        if ddp.use_distributed_optimizer != want_dist:
            raise OptimizerBuildError(
                f"model[{i}]: DDP built with use_distributed_optimizer={ddp.use_distributed_optimizer}, but "
                f"optimizer.distributed_optimizer={cfg.distributed_optimizer} at DP={dp_size} needs {want_dist}: "
                "wrap the stage with ddp_config(cfg, dp_size=...)"
            )
        want_overlap = bool(want_dist and cfg.overlap_param_gather)
        if bool(ddp.overlap_param_gather) != want_overlap:
            raise OptimizerBuildError(
                f"model[{i}]: DDP built with overlap_param_gather={ddp.overlap_param_gather}, but "
                f"optimizer.overlap_param_gather={cfg.overlap_param_gather} at DP={dp_size} needs {want_overlap}: "
                "wrap the stage with ddp_config(cfg, dp_size=...)"
            )
    dtype = _trainable_dtype(model)
    _check_adam_class()
    mcfg = megatron_optimizer_config(cfg, params_dtype=dtype, dp_size=dp_size)
    optimizer = get_megatron_optimizer(mcfg, model)

    frozen = {id(p) for chunk in model for p in chunk.parameters() if not p.requires_grad}
    leaked = frozen & _optimizer_tensor_ids(optimizer)
    if leaked:
        raise OptimizerBuildError(f"{len(leaked)} frozen parameter(s) (the teacher?) reached the optimizer")
    scheduler = build_scheduler(cfg, optimizer, total_steps=total_steps)
    return optimizer, scheduler


def _complete_param_gather(group) -> bool:
    """What megatron DDP's forward pre-hook does for one bucket group, done synchronously and for
    the whole group. Returns True when it had to wait for or issue an all-gather.

    ``group``: a megatron ``_ParamAndGradBucketGroup`` of a DDP chunk built with the distributed
    optimizer and ``overlap_param_gather``. Its state after a step: ``param_gather_dispatched`` is
    cleared by ``finish_grad_sync`` (every step's gradient reduction, before ``step()``) and set by
    each gather; ``param_gather_handle`` is an all-gather still in flight.
    """
    if group.param_gather_dispatched and group.param_gather_handle is None:
        return False  # gathered since the last gradient reduction: complete
    if not group.param_gather_dispatched and group.param_gather_handle is not None:
        # dispatched before the last gradient reduction (the forward never reached this bucket's
        # modules): it carries pre-step values; drain it, then gather afresh
        group.param_gather_handle.wait()
        group.param_gather_handle = None
    # in flight since the step: wait for it; nothing dispatched: a synchronous all-gather now
    group.start_param_sync(force_sync=True)
    return True


def ensure_params_gathered(model: list) -> bool:
    """Make the full post-step parameters present on every rank before they are read outside a
    training forward (rollout generation, checkpoint saving). Returns True when a gather had to
    be completed.

    Args:
        model: this rank's DDP chunks (:func:`ddp_config`).

    Without ``overlap_param_gather`` (the default) the distributed optimizer gathers inside
    ``step()`` and nothing is ever pending: a no-op. With it, every bucket group whose all-gather
    is pending since the last step is completed synchronously (:func:`_complete_param_gather`),
    after which DDP's forward pre-hooks find nothing to do, so the forwards that follow (the
    rollout engine's) issue no data-parallel collective. Collective over the data-parallel group
    (every DP rank calls it at the same point); idempotent until the next step.
    """
    forced = False
    for chunk in model:
        ddp = getattr(chunk, "ddp_config", None)
        if ddp is None or not (ddp.use_distributed_optimizer and ddp.overlap_param_gather):
            continue
        groups = list(chunk.bucket_groups) + list(getattr(chunk, "expert_parallel_bucket_groups", []))
        with torch.no_grad():
            for group in groups:
                forced |= _complete_param_gather(group)
    return forced
