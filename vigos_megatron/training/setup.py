"""Build what a training run holds on this rank: the student stage, its frozen teacher, DDP.

Order matters (the teacher is a copy of the INITIAL student, never of a resumed one):

1. the student's chunks are built and loaded from the initial weights (``model.init_checkpoint``,
   a run / ``iter_*`` directory of ``tools/convert_hf_to_megatron.py``, else the HF directory
   ``model.hf_path``);
2. the teacher: a frozen replica of those shards (bf16 on GPU, no fp32 copy, no gradient
   buffer, no optimizer state), or a checkpoint of its own (``model.teacher``, of any size that
   :func:`vigos_megatron.config.teacher.check_pair` accepts, split over the student's stages);
3. :class:`~vigos_megatron.schedule.stage.StudentTeacherStage` wraps both (sharing the teacher's
   vision-tower features with the student when ``model.freeze_vision`` keeps the student's tower
   equal to the teacher's), megatron DDP wraps the stage (buffers for the student's trainable
   parameters only);
4. the caller then builds the optimizer and may load a training checkpoint into the student.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vigos_megatron.training.checkpoint_files import ResumeRefused

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from transformers import PreTrainedTokenizerBase

    from vigos_megatron.config.train import Layout, PretrainConfig
    from vigos_megatron.data.contexts import PrefixCut
    from vigos_megatron.data.loader import StreamingLoader
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.rollout.engine import MegatronRolloutEngine


@dataclass
class TrainingModels:
    """This rank's models. ``model`` is what megatron's schedule and optimizer take."""

    builder: "QwenVLBuilder"
    #: the student's chunks (unwrapped ``Qwen25VLModel``; the rollout engine samples from them)
    student: list
    #: the frozen teacher's chunks (same layer split)
    teacher: list
    #: ``[DistributedDataParallel(StudentTeacherStage)]``
    model: list
    #: HF config / tokenizer / processor files of the initial checkpoint (copied into every save)
    hf_files: Path
    #: one line describing the teacher (what it is, its size, its memory on this rank)
    teacher_line: str = ""


def initial_hf_files(model_cfg) -> Path:
    """The HF directory describing the initial model (its config.json rebuilds it)."""
    if model_cfg.init_checkpoint:
        from vigos_megatron.convert.megatron_checkpoint import hf_dir_of, resolve_checkpoint

        return hf_dir_of(resolve_checkpoint(model_cfg.init_checkpoint))
    return Path(model_cfg.hf_path)


def load_initial_weights(builder, chunks: list, model_cfg) -> None:
    if model_cfg.init_checkpoint:
        from vigos_megatron.convert.megatron_checkpoint import load_model_checkpoint, resolve_checkpoint

        load_model_checkpoint(chunks, resolve_checkpoint(model_cfg.init_checkpoint))
    else:
        builder.load_hf_weights(chunks, model_cfg.hf_path)


def build_teacher(cfg: "PretrainConfig", builder: "QwenVLBuilder", student: list, student_hf: Path, *,
                  dtype: torch.dtype):
    """The frozen teacher of ``cfg.model.teacher`` (a :class:`~vigos_megatron.models.teacher.FrozenTeacher`):
    the replica of ``student`` (its initial weights), or a checkpoint of its own checked against the
    student's files ``student_hf``."""
    from vigos_megatron.config.teacher import check_pair, teacher_hf_dir
    from vigos_megatron.models.teacher import build_teacher_replica, load_teacher

    tc = cfg.model.teacher
    if not tc.separate:
        return build_teacher_replica(builder, student)
    hf_dir = teacher_hf_dir(tc)
    option = "model.teacher.hf_path" if tc.hf_path else "model.teacher.init_checkpoint"
    counts = check_pair(student_hf, hf_dir, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                        pipeline_layers=tc.pipeline_layers, option=option)
    return load_teacher(hf_dir, tc.init_checkpoint or hf_dir, pipeline_layers=counts,
                        tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=cfg.parallel.pp,
                        dtype=dtype, transformer_impl=cfg.model.transformer_impl)


def build_training_models(cfg: "PretrainConfig", *, dtype: torch.dtype, ddp_config) -> TrainingModels:
    """``cfg``: :class:`~vigos_megatron.config.train.PretrainConfig`; parallel state must be initialised."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.models.family import family_of
    from vigos_megatron.schedule.stage import StudentTeacherStage

    hf_files = initial_hf_files(cfg.model)
    builder = QwenVLBuilder.from_hf(
        hf_files, tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=cfg.parallel.pp,
        dtype=dtype, transformer_impl=cfg.model.transformer_impl, recompute=cfg.model.recompute,
    )
    student = builder.build(init_weights=False)
    load_initial_weights(builder, student, cfg.model)
    frozen = build_teacher(cfg, builder, student, hf_files, dtype=dtype)
    teacher = frozen.chunks
    if cfg.model.recompute == "full" and student[0].pre_process:
        family_of(student[0]).recompute_vision(student[0])
    if cfg.model.freeze_vision and student[0].pre_process:
        student[0].freeze(freeze_language_model=False, freeze_vision_model=True, freeze_vision_projection=True)
    # a frozen student tower that is still the teacher's: one vision-tower pass per image serves both
    share_vision = bool(cfg.model.freeze_vision and not cfg.model.teacher.separate)
    stage = StudentTeacherStage(student[0], teacher[0], share_vision=share_vision, from_hidden=cfg.loss.from_hidden,
                                fp32_logits=cfg.loss.logits_dtype == "float32")
    config = stage.config
    config.calculate_per_token_loss = True  # the objectives fold their normalisation into the loss
    config.finalize_model_grads_func = finalize_model_grads
    model = [DistributedDataParallel(config, ddp_config, stage)]
    tc = cfg.model.teacher
    what = f"{tc.init_checkpoint or tc.hf_path}" if tc.separate else "the replica of the initial student"
    text = teacher[0].config
    line = (f"[vigos] teacher: {what}; hidden {text.hidden_size}, {text.num_layers} layers, "
            f"{text.num_attention_heads} heads; {frozen.local_param_count:,} parameters "
            f"({frozen.local_param_bytes / 2**20:.1f} MiB) on this rank, frozen: no gradient buffer, no optimizer state")
    return TrainingModels(builder=builder, student=student, teacher=teacher, model=model, hf_files=hf_files,
                          teacher_line=line)


# --------------------------------------------------------------------------- a launch's run context


@dataclass
class RunContext:
    """What the loop needs besides the config, built once per launch."""

    models: TrainingModels
    optimizer: "MegatronOptimizer"
    scheduler: "OptimizerParamScheduler"
    loader: "StreamingLoader"
    engine: "MegatronRolloutEngine"
    tokenizer: "PreTrainedTokenizerBase"
    pad_id: int
    #: the tokenizer's PrefixCut: byte-exact teacher contexts
    cut: "PrefixCut"
    #: what the run is trained with (checkpoint_files.run_settings), stored with every checkpoint
    settings: dict | None = None


# --------------------------------------------------------------------------- set-up


def check_resume_settings(selection, settings: dict, *, allow_changes: bool, log=print) -> None:
    """Refuse (:class:`ResumeRefused`, one line listing the differences) or report what changed since the
    checkpoint ``selection`` resumes from (:class:`~vigos_megatron.training.checkpoint.Selection`, or any
    object with ``candidates`` and ``settings``)."""
    from vigos_megatron.training import checkpoint_files as cf

    if not selection.candidates:
        return
    ckpt = selection.candidates[0][1]
    if selection.settings is None:
        log(f"[vigos] {ckpt} stores no run settings (written by an older version): the objective, model, data and "
            "optimizer settings are not compared")
        return
    changes = cf.settings_changes(selection.settings, settings)
    line = cf.refusal(ckpt, changes)
    if line and not allow_changes:
        raise ResumeRefused(line)
    if cf.LAYOUT in changes:
        log(f"[vigos] layout changed since {ckpt.name}: {', '.join(changes[cf.LAYOUT])} (the checkpoint reshards)")
    if line:
        others = [g for g in cf.GROUPS if g != cf.LAYOUT]
        log(f"[vigos] checkpoint.allow_changes=true: resuming {ckpt.name} with other settings: "
            f"{cf.describe_changes(changes, others)}")


def make_loader(cfg: "PretrainConfig", layout: "Layout", ps, loader_state: dict | None, *, log=print):
    from vigos_megatron.config.train import context_pixel_bounds
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.loader import StreamingLoader

    lc = cfg.data.loader
    min_pixels, max_pixels = context_pixel_bounds(cfg)
    context = dataclasses.replace(cfg.data.context, min_pixels=min_pixels, max_pixels=max_pixels)
    loader = StreamingLoader(
        lc.shards_dir, rank=ps.get_data_parallel_rank(), world_size=layout.dp, batch_size=layout.prompts_per_rank,
        seed=lc.seed, num_workers=lc.num_workers, shuffle_shards=lc.shuffle_shards, shuffle_buffer=lc.shuffle_buffer,
        prefetch_factor=lc.prefetch_factor, encode=ContextEncoder.from_config(context),
    )
    if loader_state:
        try:
            loader.load_state_dict(loader_state)
        except ValueError as e:
            if not cfg.checkpoint.allow_changes:
                raise ResumeRefused(f"data.loader: the checkpoint's data stream does not continue here: {e}") from None
            log(f"[vigos] checkpoint.allow_changes=true: {e}; the loader starts the new stream from its beginning")
    return loader


def build_run(cfg: "PretrainConfig", layout: "Layout", *, log=print) -> tuple[RunContext, object]:
    """Models, optimizer, resume state, loader and engine of this launch. Returns ``(ctx, state)``.

    Before any model is built: the checkpoint to resume from is chosen (incomplete directories
    moved aside, a corrupt newest one reported; :func:`~vigos_megatron.training.checkpoint.select_checkpoint`)
    and the settings stored with it are compared with this run's (:func:`check_resume_settings`).
    ``log``: rank 0's lines (a no-op elsewhere)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from vigos_megatron.data.contexts import PrefixCut
    from vigos_megatron.rollout.engine import MegatronRolloutEngine
    from vigos_megatron.rollout.segments import stop_token_ids
    from vigos_megatron.runtime import use_cuda
    from vigos_megatron.training import checkpoint_files as cf
    from vigos_megatron.training.checkpoint_resume import resume_training, select_checkpoint
    from vigos_megatron.training.optimizer import build_optimizer, ddp_config

    ck = cfg.checkpoint
    selection = select_checkpoint(cfg.run_dir, on_corrupt=ck.on_corrupt, log=log)
    settings = cf.run_settings(cfg, layout)
    check_resume_settings(selection, settings, allow_changes=ck.allow_changes, log=log)
    dtype = cfg.model.torch_dtype(use_cuda())
    models = build_training_models(cfg, dtype=dtype, ddp_config=ddp_config(cfg.optimizer, dp_size=layout.dp))
    log(models.teacher_line)
    optimizer, scheduler = build_optimizer(cfg.optimizer, models.model, total_steps=cfg.train.steps, dp_size=layout.dp)
    state = resume_training(selection, run_dir=cfg.run_dir, on_corrupt=ck.on_corrupt, log=log,
                            student_chunks=models.student, model=models.model, optimizer=optimizer,
                            scheduler=scheduler, load_optimizer=ck.load_optimizer)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.context.processor_path)
    engine = MegatronRolloutEngine(models.student, hf_config=models.builder.hf_config,
                                   stop_token_ids=stop_token_ids(tokenizer), pad_token_id=int(tokenizer.pad_token_id))
    loader = make_loader(cfg, layout, ps, state.loader if state is not None else None, log=log)
    ctx = RunContext(models=models, optimizer=optimizer, scheduler=scheduler, loader=loader, engine=engine,
                     tokenizer=tokenizer, pad_id=int(tokenizer.pad_token_id), cut=PrefixCut(tokenizer),
                     settings=settings)
    return ctx, state
