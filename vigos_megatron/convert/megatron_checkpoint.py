"""The project's Megatron checkpoint layout (megatron-core ``dist_checkpointing``).

Run directory (written by ``tools/convert_hf_to_megatron.py`` with iteration 0, and by
training at every save)::

    RUN/
      latest_checkpointed_iteration.txt   # the latest complete iteration, e.g. "10"
      iter_0000010/                        # one dist_checkpointing checkpoint (loads at any TP/PP)
        metadata.json, common.pt, *.distcp # sharded tensors: "model" entries (+ "optimizer" ones in training)
        hf/                                # what rebuilds the model: HF config.json (+ tokenizer,
                                           # processor and generation files when the source had them,
                                           # key_layout.json: the HF tensor-name layout to export in)
        vigos_checkpoint.json              # iteration, TP/PP it was written at, format version

Tensor keys are megatron-core's global names (``language_model.decoder.layers.1...``,
``visual.blocks.0...``); layer indices are global, so the checkpoint is independent of
the TP/PP layout that wrote it. Only the "model" entries are read back: optimizer state,
when present, is ignored by :func:`load_model_checkpoint`.

``--checkpoint`` arguments accept either ``RUN`` (its latest iteration is used) or an
``iter_*`` directory itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from vigos_megatron.models.hf_checkpoint import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
HF_SUBDIR = "hf"
INFO_FILE = "vigos_checkpoint.json"
FORMAT_VERSION = 1


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def write_tracker(run_dir, iteration: int) -> None:
    """Point ``RUN/latest_checkpointed_iteration.txt`` at ``iteration`` atomically (temp file,
    fsync, rename): a crash leaves either the previous or the new number, never a torn file."""
    import os

    run = Path(run_dir)
    tmp = run / f".{TRACKER_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run / TRACKER_FILE)


def resolve_checkpoint(path) -> Path:
    """``RUN`` (tracker file) or ``RUN/iter_*`` -> the checkpoint directory, or a clear error."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        text = tracker.read_text().strip()
        try:
            iteration = int(text)
        except ValueError:
            raise CheckpointError(f"{tracker}: expected an iteration number, got {text!r}") from None
        ckpt = p / iter_dir_name(iteration)
        if not ckpt.is_dir():
            raise CheckpointError(f"{tracker} names iteration {iteration} but {ckpt} does not exist")
    else:
        ckpt = p
    if not (ckpt / "metadata.json").is_file():
        raise CheckpointError(
            f"{ckpt}: not a Megatron distributed checkpoint (no metadata.json) and no {TRACKER_FILE} "
            "(expected a run directory or one of its iter_* directories)"
        )
    if not (ckpt / HF_SUBDIR / "config.json").is_file():
        raise CheckpointError(f"{ckpt}: missing {HF_SUBDIR}/config.json (the HF config that rebuilds the model)")
    return ckpt


def hf_dir_of(ckpt_dir) -> Path:
    return Path(ckpt_dir) / HF_SUBDIR


def model_sharded_state_dict(chunks: list) -> dict:
    """``{"model": ...}`` for one chunk (no virtual pipeline), megatron-core global keys."""
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline parallelism (several chunks per rank) is not supported")
    return {"model": chunks[0].sharded_state_dict()}


def save_model_checkpoint(
    chunks: list, run_dir, iteration: int, *, hf_source_dir, extra_sharded_state: dict | None = None,
    before_tracker=None,
) -> Path:
    """Collectively save ``chunks`` (+ e.g. optimizer state) as ``RUN/iter_<iteration>``.

    All ranks call it. Rank 0 copies the HF config (+ tokenizer/processor files) from
    ``hf_source_dir`` into ``iter_*/hf``, calls ``before_tracker(ckpt_dir)`` when given (training
    verifies the checkpoint and writes its manifest there), and updates the tracker, after the save
    completed. An error in rank 0's part is raised on every rank (no rank waits for a barrier that
    rank 0 never reaches).
    """
    from megatron.core import dist_checkpointing

    ckpt, state = _begin_save(chunks, run_dir, iteration, extra_sharded_state)
    dist_checkpointing.save(state, str(ckpt))
    complete_model_checkpoint(ckpt, iteration, hf_source_dir=hf_source_dir, before_tracker=before_tracker)
    return ckpt


def start_model_checkpoint(
    chunks: list, run_dir, iteration: int, *, hf_source_dir, extra_sharded_state: dict | None = None,
    before_tracker=None,
):
    """:func:`save_model_checkpoint` with the tensors written by megatron-core's asynchronous save.

    Returns ``(ckpt_dir, request)``: the caller schedules the ``AsyncRequest`` on megatron's
    ``AsyncCallsQueue`` (a forked writer per rank, holding a copy-on-write snapshot of the tensors);
    its finalize functions, run on every rank when the queue finalizes it, write ``.metadata`` and
    ``metadata.json`` and then do :func:`complete_model_checkpoint` (HF files, ``before_tracker``,
    the tracker). Until then the directory is incomplete.
    """
    import functools

    from megatron.core import dist_checkpointing

    ckpt, state = _begin_save(chunks, run_dir, iteration, extra_sharded_state)
    # "mcore": megatron-core's own writer (the default, "nvrx", needs nvidia-resiliency-ext)
    request = dist_checkpointing.save(state, str(ckpt), async_sharded_save=True, async_strategy="mcore")
    request.add_finalize_fn(functools.partial(complete_model_checkpoint, ckpt, iteration,
                                              hf_source_dir=hf_source_dir, before_tracker=before_tracker))
    return ckpt, request


def _begin_save(chunks: list, run_dir, iteration: int, extra_sharded_state: dict | None):
    """``RUN/iter_<iteration>`` created by rank 0 (collective) and the sharded state to write there."""
    import torch.distributed as dist

    ckpt = Path(run_dir) / iter_dir_name(iteration)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    state = model_sharded_state_dict(chunks)
    if extra_sharded_state:
        overlap = set(state) & set(extra_sharded_state)
        if overlap:
            raise ValueError(f"extra_sharded_state must not redefine {sorted(overlap)}")
        state.update(extra_sharded_state)
    return ckpt, state


def complete_model_checkpoint(ckpt: Path, iteration: int, *, hf_source_dir, before_tracker=None) -> None:
    """After every rank's tensors are written (collective): rank 0 stores the HF files and the layout
    record, calls ``before_tracker(ckpt)`` and moves the tracker; its error is raised on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from vigos_megatron.models.hf_checkpoint import copy_tokenizer_processor_files, record_key_layout

    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.barrier()
    failure, error = None, None
    if rank == 0:
        try:
            hf = ckpt / HF_SUBDIR
            hf.mkdir(exist_ok=True)
            src = Path(hf_source_dir)
            if not (src / "config.json").is_file():
                raise CheckpointError(f"{src}: no config.json to store with the checkpoint")
            (hf / "config.json").write_text((src / "config.json").read_text())
            copy_tokenizer_processor_files(src, hf)
            record_key_layout(src, hf)
            info = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "written_at": {
                    "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                    "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                },
            }
            (ckpt / INFO_FILE).write_text(json.dumps(info, indent=2))
            if before_tracker is not None:
                before_tracker(ckpt)
            write_tracker(ckpt.parent, iteration)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error, failure = e, f"{type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if error is not None:
        raise error
    if failure is not None:
        raise CheckpointError(f"{ckpt}: rank 0 could not complete the save: {failure}")
    if dist.is_initialized():
        dist.barrier()


def check_model_checkpoint(chunks: list, ckpt_dir) -> None:
    """Refuse a checkpoint lacking a tensor this model needs, or storing it with another shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron.core.dist_checkpointing.mapping import apply_factories

    stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    expected = model_sharded_state_dict(chunks)
    apply_factories(expected)  # e.g. the gated-MLP fc1 factory -> its stored ShardedTensors
    problems = []
    for sh in nested_values(expected):
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in stored:
            problems.append(f"missing tensor {sh.key} (expected global shape {list(sh.global_shape)})")
        elif tuple(stored[sh.key].global_shape) != tuple(sh.global_shape):
            problems.append(
                f"shape mismatch for {sh.key}: stored {list(stored[sh.key].global_shape)}, "
                f"model (from {HF_SUBDIR}/config.json) needs {list(sh.global_shape)}"
            )
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not match the model:\n  {head}{more}")


def load_model_checkpoint(chunks: list, ckpt_dir) -> None:
    """Load the "model" entries of ``ckpt_dir`` into ``chunks`` (any TP/PP; other entries ignored)."""
    from megatron.core import dist_checkpointing

    check_model_checkpoint(chunks, ckpt_dir)
    state = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    chunks[0].load_state_dict(loaded["model"], strict=True)
