"""Training checkpoints: student weights, optimizer, LR schedule, RNG streams, loader position.

One checkpoint is one megatron-core ``dist_checkpointing`` directory in the run directory's
layout (:mod:`vigos_megatron.convert.megatron_checkpoint`): ``RUN/iter_<step>/`` with the
tracker ``RUN/latest_checkpointed_iteration.txt``. Entries of a training checkpoint:

=====================  ======================================================================
``model``              the student's tensors under megatron-core global names, exactly as the
                       converters write them: any TP/PP loads them and
                       ``tools/convert_megatron_to_hf.py`` exports them. The frozen teacher is
                       never saved (it is rebuilt from the run's initial weights).
``optimizer``          the sharded optimizer tensors in model space (Adam ``exp_avg`` /
                       ``exp_avg_sq`` and, for optimizers with separate main weights, the fp32
                       main weights), one global tensor per parameter, keyed
                       ``optimizer.state.<state name>.<model key>``: independent of TP/PP/DP. The
                       distributed optimizer writes megatron's ``fully_reshardable`` format
                       (its DP shards gathered on DP rank 0 over the gloo group, in host memory).
``optimizer_common``   the optimizer's non-tensor state (parameter groups, Adam step count).
``rank_state``         per rank (a ``(pp, tp, dp)`` grid of objects): RNG states (python,
                       numpy, torch CPU, CUDA when used, megatron's CUDA RNG tracker) and the
                       rank's :class:`TrainState` (its loader's skip counters differ per DP rank).
``vigos_training``     common metadata: format version, step, the layout it was written at,
                       the optimizer kind, the LR scheduler state, rank 0's :class:`TrainState`.
=====================  ======================================================================

Crash safety: everything above is written by ONE ``dist_checkpointing.save`` call; the HF files
and the tracker follow, the tracker last and atomically (temp + rename), so a crash mid-save
leaves the previous checkpoint the latest. A later save of the same step removes the partial
directory first.

Loading at another layout (:func:`load_training_checkpoint`): the model always loads (global
names). The optimizer state loads at any TP/PP/DP: within one optimizer kind directly, and
across the kinds that DP changes (the distributed optimizer is used only at DP > 1:
``distributed`` <-> ``fp32`` on CPU, ``distributed`` <-> ``mixed_precision`` for bf16) by
pointing the request at the other kind's keys: the Adam moments share their keys; the fp32 main
weights are ``param`` (distributed) / ``fp32_param`` (mixed precision), and for the ``fp32``
kind the model weights themselves; the Adam step count moves from one kind's common state to
the other's. Only a change of parameter dtype (``fp32`` <-> ``mixed_precision``) is refused,
with :class:`~vigos_megatron.models.hf_checkpoint.CheckpointError`; ``load_optimizer=False``
then resumes with the checkpoint's weights, schedule and loader positions and fresh Adam
moments. RNG streams and per-rank loader counters are restored only at the layout that wrote
them (elsewhere the RNG streams stay as seeded and every rank takes rank 0's
:class:`TrainState`, with a warning).
"""

from __future__ import annotations

import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vigos_megatron.convert.megatron_checkpoint import (
    TRACKER_FILE,
    check_model_checkpoint,
    iter_dir_name,
    model_sharded_state_dict,
    resolve_checkpoint,
    save_model_checkpoint,
)
from vigos_megatron.models.hf_checkpoint import CheckpointError
from vigos_megatron.training.optimizer_state import (
    CONVERTIBLE,
    adam_step,
    materialize_optimizer_state,
    merge_split,
    optimizer_kind,
    retarget_main_params,
    set_adam_step,
    split_sharded,
    unwrap_local,
)

FORMAT_VERSION = 1
META_KEY = "vigos_training"
OPTIMIZER_KEY = "optimizer"
OPTIMIZER_COMMON_KEY = "optimizer_common"
RANK_STATE_KEY = "rank_state"
#: megatron's layout-independent format for the distributed optimizer, gathered over gloo in host memory
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
    "chained_optim_avoid_prefix": True,
}
_SCHEDULER_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                     "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


@dataclass
class TrainState:
    """Where a run stands after ``step`` optimizer steps (what the loop needs to continue exactly)."""

    #: optimizer steps done (the checkpoint is ``iter_<step>``)
    step: int
    #: ``StreamingLoader.state_dict()`` of this rank's loader
    loader: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def current_layout() -> dict:
    """``{"tp", "pp", "dp"}`` sizes of this run (megatron parallel state)."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rank_coords() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    from megatron.core import parallel_state as ps

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return shape, offset


def get_rng_state() -> dict:
    """Every RNG stream this process draws from (restored by :func:`set_rng_state`)."""
    from megatron.core import tensor_parallel

    from vigos_megatron.runtime import use_cuda

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if use_cuda() else None,
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    from vigos_megatron.runtime import use_cuda

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if use_cuda():
        if state.get("cuda") is None:
            warnings.warn("checkpoint holds no CUDA RNG state (written on CPU): the CUDA stream stays as seeded")
        else:
            torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rank_state_object(data):
    from megatron.core.dist_checkpointing import ShardedObject

    shape, offset = _rank_coords()
    return ShardedObject(RANK_STATE_KEY, data, shape, offset, replica_id=0)


def latest_iteration(run_dir) -> int | None:
    """The iteration the tracker of ``run_dir`` names, or None when there is none yet."""
    tracker = Path(run_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, got {text!r}") from None


def _prepare_iteration_dir(run: Path, iteration: int) -> None:
    """Refuse to overwrite the latest (or an older) complete checkpoint; remove a partial one."""
    latest = latest_iteration(run)  # every rank reads the same file: they all agree
    target = run / iter_dir_name(iteration)
    if latest is not None and iteration <= latest:
        raise CheckpointError(
            f"{target}: step {iteration} is not after the latest complete checkpoint (iteration {latest}); "
            "refusing to overwrite it"
        )
    if _rank() == 0 and target.exists():
        warnings.warn(f"{target}: removing an incomplete checkpoint left by an interrupted save")
        shutil.rmtree(target)
    _barrier()


# ----------------------------------------------------------------------------- save


def save_training_checkpoint(run_dir, state: TrainState, *, student_chunks: list, model: list, optimizer, scheduler,
                             hf_source_dir) -> Path:
    """Collectively write ``RUN/iter_<state.step>`` (every rank calls it). Returns the directory.

    Args:
        run_dir: the run directory (created if needed).
        state: this rank's :class:`TrainState`; ``state.step >= 1``.
        student_chunks: the student's unwrapped chunks (``[Qwen25VLModel]``): the "model" entries.
        model: the DDP-wrapped stage chunks (their parameters are gathered first if a gather is pending).
        optimizer, scheduler: from :func:`~vigos_megatron.training.optimizer.build_optimizer`.
        hf_source_dir: HF config / tokenizer / processor files copied into ``iter_*/hf``.
    """
    from vigos_megatron.training.optimizer import ensure_params_gathered

    run = Path(run_dir)
    if int(state.step) < 1:
        raise ValueError(f"state.step: a training checkpoint needs step >= 1 (iteration 0 is the initial weights), "
                         f"got {state.step}")
    if _rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
    _barrier()
    _prepare_iteration_dir(run, int(state.step))
    ensure_params_gathered(model)

    materialize_optimizer_state(optimizer)
    model_sd = model_sharded_state_dict(student_chunks)["model"]
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=dict(OPTIMIZER_METADATA))
    opt_sharded, opt_common = split_sharded(opt_sd)
    rank0_state = asdict(state)
    d = _dist()
    if d:
        box = [rank0_state]
        d.broadcast_object_list(box, src=0)
        rank0_state = box[0]
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(state.step),
        "layout": current_layout(),
        "optimizer_kind": optimizer_kind(optimizer),
        "scheduler": scheduler.state_dict(),
        "train_state": rank0_state,
    }
    extra = {
        OPTIMIZER_KEY: opt_sharded,
        OPTIMIZER_COMMON_KEY: opt_common,
        RANK_STATE_KEY: _rank_state_object({"rng": get_rng_state(), "train_state": asdict(state)}),
        META_KEY: meta,
    }
    return save_model_checkpoint(student_chunks, run, int(state.step), hf_source_dir=hf_source_dir,
                                 extra_sharded_state=extra)


# ----------------------------------------------------------------------------- load


def _load_scheduler(scheduler, saved: dict) -> None:
    """The configuration's schedule, at the checkpoint's step count (warns when they differ)."""
    mine = scheduler.state_dict()
    diff = {k: (saved.get(k), mine.get(k)) for k in _SCHEDULER_FIELDS if saved.get(k) != mine.get(k)}
    if diff and _rank() == 0:
        warnings.warn("LR schedule differs from the checkpoint's (checkpoint -> now): "
                      + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
                      + "; continuing with the configured schedule at the checkpoint's step")
    scheduler.num_steps = 0
    scheduler.load_state_dict(saved)


def read_training_metadata(ckpt_dir) -> dict:
    """The ``vigos_training`` entry of a checkpoint directory (no process group needed)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    meta = common.get(META_KEY)
    if meta is None:
        raise CheckpointError(f"{ckpt_dir}: not a training checkpoint (no {META_KEY!r} entry; written by a converter?)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: training checkpoint format {meta.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
    return meta


def load_training_checkpoint(run_dir, *, student_chunks: list, model: list, optimizer, scheduler,
                             load_optimizer: bool = True) -> TrainState | None:
    """Resume from the latest checkpoint of ``run_dir`` (collective). Returns its
    :class:`TrainState`, or None for a fresh start (no tracker, or iteration 0: the converter's
    initial weights, which the caller loads as the initial model).

    Loads the student's weights into ``student_chunks`` (any TP/PP), the optimizer state
    (``load_optimizer``, config ``checkpoint.load_optimizer``; see the module docstring for the
    layouts and optimizer kinds), the LR schedule position, and at the same layout the RNG
    streams and this rank's TrainState. ``load_optimizer=False`` keeps fresh Adam moments and
    sets the fp32 main weights (if any) from the loaded model weights (bf16 on GPU: the fp32
    digits beyond bf16 are lost). ``model`` (the DDP-wrapped stage) needs nothing after a load:
    parameters, including the distributed optimizer's buffers, are loaded in place.
    """
    from megatron.core import dist_checkpointing

    it = latest_iteration(run_dir)
    if not it:
        return None
    ckpt = resolve_checkpoint(run_dir)
    meta = read_training_metadata(ckpt)
    if int(meta["step"]) != it:
        raise CheckpointError(f"{ckpt}: holds step {meta['step']} but the tracker names iteration {it}")
    check_model_checkpoint(student_chunks, ckpt)

    layout = current_layout()
    same_layout = meta["layout"] == layout
    kind = optimizer_kind(optimizer)
    saved_kind = meta["optimizer_kind"]
    if load_optimizer and saved_kind != kind and (saved_kind, kind) not in CONVERTIBLE:
        raise CheckpointError(
            f"{ckpt}: its optimizer state was written by the {saved_kind!r} optimizer (layout {meta['layout']}), "
            f"this run uses the {kind!r} one (layout {layout}): the stored state does not map onto it (the "
            "parameter dtype changed). Resume with checkpoint.load_optimizer=false (load_optimizer=False: fresh "
            "Adam moments; the checkpoint's weights, LR-schedule and data positions)"
        )

    model_sd = model_sharded_state_dict(student_chunks)
    request = dict(model_sd)
    separate = {}
    if load_optimizer:
        materialize_optimizer_state(optimizer)
        opt_req = optimizer.sharded_state_dict(model_sd["model"], is_loading=True, metadata=dict(OPTIMIZER_METADATA))
        opt_sharded, opt_common = split_sharded(opt_req)
        if saved_kind == kind:
            request[OPTIMIZER_KEY], request[OPTIMIZER_COMMON_KEY] = opt_sharded, opt_common
        else:
            separate = retarget_main_params(opt_sharded, saved_kind, kind)
            request[OPTIMIZER_KEY] = opt_sharded
    if same_layout:
        request[RANK_STATE_KEY] = _rank_state_object(None)
    loaded = dist_checkpointing.load(request, str(ckpt))

    student_chunks[0].load_state_dict(loaded["model"], strict=True)
    if load_optimizer:
        if saved_kind == kind:
            common = loaded[OPTIMIZER_COMMON_KEY]
        else:  # the current optimizer's own structure, with the checkpoint's Adam step count
            common = unwrap_local(opt_common)
            set_adam_step(common, kind, adam_step(loaded[OPTIMIZER_COMMON_KEY]))
        opt_loaded = loaded.get(OPTIMIZER_KEY, {})
        if separate:  # fp32 main weights from the fp32 optimizer's model weights (a second read)
            paths = list(separate)
            mains = dist_checkpointing.load({"main": {i: separate[p] for i, p in enumerate(paths)}}, str(ckpt))["main"]
            for i, path in enumerate(paths):
                parent = opt_loaded
                for k in path[:-1]:
                    parent = parent.setdefault(k, {})
                parent[path[-1]] = mains[i]
        optimizer.load_state_dict(merge_split(opt_loaded, common))
    else:
        optimizer.reload_model_params()  # fp32 main weights (if any) from the loaded model weights
    _load_scheduler(scheduler, meta["scheduler"])

    if same_layout:
        rank_state = loaded[RANK_STATE_KEY]
        set_rng_state(rank_state["rng"])
        ts = rank_state["train_state"]
    else:
        if _rank() == 0:
            warnings.warn(f"resuming at layout {layout} from a checkpoint written at {meta['layout']}: model"
                          f"{' and optimizer' if load_optimizer else ''} state loaded; RNG streams stay as seeded "
                          "and every rank takes rank 0's loader state")
        ts = meta["train_state"]
    return TrainState(step=ts["step"], loader=ts.get("loader", {}))
