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

Complete or ignored (:mod:`vigos_megatron.training.checkpoint_files` for the files): everything
above is written by ONE ``dist_checkpointing.save`` call; the HF files follow; rank 0 then checks
the directory (``checkpoint_resume.verify_checkpoint``: every file that ``.metadata`` lists, at the
size written), writes the manifest ``vigos_complete.json`` (files, sizes, the run's settings) and
last, atomically, the tracker. A crash, a kill or a full disk mid-save leaves the previous
checkpoint the latest and a directory without manifest, which the next launch names and moves
into ``RUN/abandoned/`` (``checkpoint_resume.select_checkpoint``). With ``checkpoint.async_save`` the
same save is written by a forked writer per rank while training goes on, and the steps after the
tensors (``.metadata``, HF files, verification, manifest, tracker) run when the training loop
finalizes it (:class:`BackgroundSaves`). At resume the newest complete checkpoint is
checked again before it is read; one that fails (a truncated or missing file, an unreadable
``.metadata``, an error while reading) is reported in one line naming the file, and
``checkpoint.on_corrupt`` decides: ``fallback`` moves it aside and resumes from the newest complete
older one (saying which, and the steps repeated; exit 2 when none is left), ``stop`` exits 2 and
touches nothing. ``checkpoint.keep_last`` bounds the directory.

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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vigos_megatron.convert.megatron_checkpoint import (
    check_model_checkpoint,
    iter_dir_name,
    model_sharded_state_dict,
    resolve_checkpoint,
    save_model_checkpoint,
    start_model_checkpoint,
)
from vigos_megatron.models.hf_checkpoint import CheckpointError
from vigos_megatron.training import checkpoint_files as cf
from vigos_megatron.training.checkpoint_resume import (
    Unreadable,
    _barrier,
    _dist,
    _rank,
    read_errors,
    verify_checkpoint,
)
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
    tracker = cf.read_tracker(run_dir)
    if tracker.problem:
        raise CheckpointError(tracker.problem)
    return tracker.value


def _prepare_iteration_dir(run: Path, iteration: int) -> None:
    """Refuse to overwrite the latest (or an older) complete checkpoint; move a partial one aside."""
    latest = latest_iteration(run)  # every rank reads the same file: they all agree
    target = run / iter_dir_name(iteration)
    if latest is not None and iteration <= latest:
        raise CheckpointError(
            f"{target}: step {iteration} is not after the latest complete checkpoint (iteration {latest}); "
            "refusing to overwrite it"
        )
    if _rank() == 0 and target.exists():
        moved = cf.move_aside(target, run)
        warnings.warn(f"{target}: an incomplete checkpoint left by an interrupted save, moved to {moved}")
    _barrier()


# ----------------------------------------------------------------------------- save


def disk_note(run_dir, last_step: int) -> str:
    """`` (RUN has 0.3 MiB free, less than a checkpoint: a full disk)`` when that is so, else ``""``."""
    import shutil

    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return ""
    need = 0
    if last_step:
        manifest = cf.read_manifest(Path(run_dir) / iter_dir_name(last_step))[0]
        need = sum(int(v) for v in (manifest or {}).get("files", {}).values())
    if free < max(need, 1 << 20):
        return f" ({run_dir} has {free / 2**20:.1f} MiB free, less than a checkpoint: a full disk)"
    return ""


def start_checkpoint_writer() -> None:
    """Start megatron's checkpoint-writer helper now, shielded from stop signals.

    megatron-core's ``torch_dist`` save collects its write results through a
    ``multiprocessing.Manager`` queue, a server process started at the first save and reused. A
    stop signal sent to the rank's process group (torchrun, the launcher) or to every process of a
    job step (Slurm) would kill that server, and the save that the signal asks for would then fail
    (``BrokenPipeError``). The server is spawned while SIGTERM and SIGINT are BLOCKED in this thread:
    a child inherits the blocking thread's signal mask across ``fork`` and ``exec``, so they stay
    blocked in the server for good (pending, never acted on; SIGKILL still ends it).

    Only the mask changes, never the handlers: a signal that arrives meanwhile is delivered to
    another thread of this process (the rank has several), where the stop handler records it, or
    stays pending until the mask is restored. (Setting the signals to ``SIG_IGN`` here instead
    would discard a stop that arrives during the server's start, a second or more: a preemption
    right after a resume would then reach no rank.)

    A server that no stop signal ends must not outlive its rank: when the rank is killed (SIGKILL,
    an out-of-memory kill) it is not shut down, and nothing else would end it. On Linux a
    watchdog (:data:`_WATCHDOG`, a small interpreter started with the same mask) holds a pidfd of
    the server and the read end of a pipe whose write end only this rank holds (and a child forked
    from it without ``exec``, while it runs); the kernel closes that end when the rank ends,
    however it ends, and the watchdog then kills the server."""
    import multiprocessing
    import signal
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    # multiprocessing's resource tracker UNBLOCKS SIGTERM and SIGINT after it starts: start it first
    resource_tracker.ensure_running()
    before = set(multiprocessing.active_children())
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        filesystem_async.get_write_results_queue()
        for server in set(multiprocessing.active_children()) - before:
            _watch_server(server.pid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


#: the watchdog of a write-results server: pidfd of the server (argv[1]) first, then wait for the
#: end of stdin (the rank's end of the pipe closes with the rank) and kill the server
_WATCHDOG = """import os, signal, sys
try:
    fd = os.pidfd_open(int(sys.argv[1]))
except OSError:  # a kernel without pidfds (< 5.3), or the server is gone already
    sys.exit(0)
sys.stdin.buffer.read()
try:
    signal.pidfd_send_signal(fd, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


#: the watchdogs started by this process (kept so that they are never collected while running)
_WATCHDOGS: list = []


def _watch_server(pid: int) -> None:
    """Start the watchdog of server ``pid`` (Linux: pidfds; elsewhere nothing). The pipe's write end
    stays open for the life of this process (it is not inherited by exec'd children)."""
    import os
    import subprocess
    import sys

    if not (hasattr(os, "pidfd_open") and sys.platform.startswith("linux")):
        return
    read_end, write_end = os.pipe()
    try:
        _WATCHDOGS.append(subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(pid)], stdin=read_end,
                                           stdout=subprocess.DEVNULL, close_fds=True))
    except OSError as exc:  # saves still work; only the clean-up after a killed rank is lost
        os.close(write_end)
        warnings.warn(f"checkpoint writer: no watchdog for its server (pid {pid}): {exc}", stacklevel=2)
    finally:
        os.close(read_end)


def save_training_checkpoint(run_dir, state: TrainState, *, student_chunks: list, model: list, optimizer, scheduler,
                             hf_source_dir, settings: dict | None = None, keep_last: int = 0, log=None,
                             background: "BackgroundSaves | None" = None) -> Path:
    """Collectively write ``RUN/iter_<state.step>`` (every rank calls it). Returns the directory.

    The tracker moves only after rank 0 verified the directory and wrote its manifest (module
    docstring); then, with ``keep_last > 0``, complete checkpoints older than the newest
    ``keep_last`` are removed. With ``background`` (``checkpoint.async_save``) the tensors are
    written by a forked writer and all of that happens when ``background`` finalizes the save
    (:class:`BackgroundSaves`): the directory returned is not complete yet.

    Args:
        run_dir: the run directory (created if needed).
        state: this rank's :class:`TrainState`; ``state.step >= 1``.
        student_chunks: the student's unwrapped chunks (``[Qwen25VLModel]``): the "model" entries.
        model: the DDP-wrapped stage chunks (their parameters are gathered first if a gather is pending).
        optimizer, scheduler: from :func:`~vigos_megatron.training.optimizer.build_optimizer`.
        hf_source_dir: HF config / tokenizer / processor files copied into ``iter_*/hf``.
        settings: :func:`~vigos_megatron.training.checkpoint_files.run_settings` of the run, stored in
            the manifest and compared at resume.
        keep_last: see ``checkpoint.keep_last``.
        log: where rank 0 reports removals (default: nowhere).
        background: where the save goes on in the background (None: it is complete on return).
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

    def complete(ckpt: Path) -> None:  # rank 0, after every rank's files are written
        files, problem = verify_checkpoint(ckpt)
        if problem:
            raise CheckpointError(f"{ckpt}: the save is incomplete: {problem}")
        cf.write_manifest(ckpt, step=int(state.step), files=files, settings=settings)

    def bound() -> None:  # every rank, once the save is complete
        if keep_last > 0 and _rank() == 0:
            cf.prune(run, keep_last, log=log)
        _barrier()

    if background is not None:
        ckpt, request = start_model_checkpoint(student_chunks, run, int(state.step), hf_source_dir=hf_source_dir,
                                               extra_sharded_state=extra, before_tracker=complete)
        request.add_finalize_fn(bound)
        background.submit(int(state.step), ckpt, request)
        return ckpt
    ckpt = save_model_checkpoint(student_chunks, run, int(state.step), hf_source_dir=hf_source_dir,
                                 extra_sharded_state=extra, before_tracker=complete)
    bound()
    return ckpt


class BackgroundSaves:
    """At most one checkpoint written in the background (``checkpoint.async_save``): megatron-core's
    ``AsyncCallsQueue`` with a forked writer per rank (``TemporalAsyncCaller``; the fork holds a
    copy-on-write snapshot of the tensors, so training goes on at once and changes nothing in it).

    :meth:`finish` is collective (every rank calls it at the same point: once per step, before a new
    save, at the end of a launch); it runs the save's finalize functions once every rank's writer has
    exited: ``.metadata``, the HF files, the verification and manifest, the tracker, ``keep_last``.
    :meth:`abandon` kills the writer (a stop at once: the directory stays incomplete and the next
    launch moves it aside).
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        #: ``(step, directory)`` of the save being written
        self.pending: tuple[int, Path] | None = None

    def submit(self, step: int, ckpt: Path, request) -> None:
        if self.pending is not None:
            raise RuntimeError(f"a save of step {self.pending[0]} is still pending (finish it first)")
        self._queue.schedule_async_request(request)
        self.pending = (step, ckpt)

    def finish(self, *, wait: bool) -> tuple[int, Path] | None:
        """``(step, directory)`` of the save completed now, or None (none pending, or not written yet and
        ``wait`` is False). A failed write or verification raises on every rank."""
        if self.pending is None:
            return None
        if not self._queue.maybe_finalize_async_calls(blocking=wait):
            return None
        done, self.pending = self.pending, None
        return done

    def abandon(self) -> None:
        for call in self._queue.async_calls:
            call.async_caller.close(abort=True)  # kills the forked writer
        self._queue.async_calls.clear()
        self.pending = None


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
                             load_optimizer: bool = True, ckpt=None) -> TrainState | None:
    """Resume from the latest checkpoint of ``run_dir`` (collective), or from ``ckpt`` (one of its
    ``iter_*`` directories) when given. Returns its :class:`TrainState`, or None for a fresh start (no
    tracker, or iteration 0: the converter's initial weights, which the caller loads as the initial
    model). A read error raises :class:`Unreadable`; a checkpoint that does not fit the model or
    the optimizer raises :class:`CheckpointError`.

    Loads the student's weights into ``student_chunks`` (any TP/PP), the optimizer state
    (``load_optimizer``, config ``checkpoint.load_optimizer``; see the module docstring for the
    layouts and optimizer kinds), the LR schedule position, and at the same layout the RNG
    streams and this rank's TrainState. ``load_optimizer=False`` keeps fresh Adam moments and
    sets the fp32 main weights (if any) from the loaded model weights (bf16 on GPU: the fp32
    digits beyond bf16 are lost). ``model`` (the DDP-wrapped stage) needs nothing after a load:
    parameters, including the distributed optimizer's buffers, are loaded in place.
    """
    from megatron.core import dist_checkpointing

    if ckpt is None:
        it = latest_iteration(run_dir)
        if not it:
            return None
        ckpt = resolve_checkpoint(run_dir)
    else:
        ckpt = Path(ckpt)
        it = int(ckpt.name.split("_")[-1])
    try:
        meta = read_training_metadata(ckpt)
    except CheckpointError:
        raise
    except read_errors() as e:  # a file that does not read
        raise Unreadable(ckpt, e) from e
    if int(meta["step"]) != it:
        raise CheckpointError(f"{ckpt}: holds step {meta['step']} but its name (or the tracker) says iteration {it}")
    try:
        check_model_checkpoint(student_chunks, ckpt)
    except CheckpointError:
        raise
    except read_errors() as e:
        raise Unreadable(ckpt, e) from e

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
    try:
        loaded = dist_checkpointing.load(request, str(ckpt))
    except read_errors() as e:  # every rank sees the read error (torch DCP gathers them)
        raise Unreadable(ckpt, e) from e

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
            try:
                mains = dist_checkpointing.load({"main": {i: separate[p] for i, p in enumerate(paths)}},
                                                str(ckpt))["main"]
            except read_errors() as e:
                raise Unreadable(ckpt, e) from e
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
