"""Build what a training run holds on this rank: the student stage, its frozen teacher, DDP.

Order matters (the teacher is a copy of the INITIAL student, never of a resumed one):

1. the student's chunks are built and loaded from the initial weights (``model.init_checkpoint``,
   a run / ``iter_*`` directory of ``tools/convert_hf_to_megatron.py``, else the HF directory
   ``model.hf_path``);
2. the teacher: a frozen replica of those shards (bf16 on GPU, no fp32 copy, no gradient
   buffer, no optimizer state), or the separate checkpoint ``model.teacher_hf_path``;
3. :class:`~vigos_megatron.schedule.stage.StudentTeacherStage` wraps both (sharing the teacher's
   vision-tower features with the student when ``model.freeze_vision`` keeps the student's tower
   equal to the teacher's), megatron DDP wraps the stage (buffers for the student's trainable
   parameters only);
4. the caller then builds the optimizer and may load a training checkpoint into the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TrainingModels:
    """This rank's models. ``model`` is what megatron's schedule and optimizer take."""

    builder: object
    #: the student's chunks (unwrapped ``Qwen25VLModel``; the rollout engine samples from them)
    student: list
    #: the frozen teacher's chunks (same layer split)
    teacher: list
    #: ``[DistributedDataParallel(StudentTeacherStage)]``
    model: list
    #: HF config / tokenizer / processor files of the initial checkpoint (copied into every save)
    hf_files: Path


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


def build_training_models(cfg, *, dtype: torch.dtype, ddp_config) -> TrainingModels:
    """``cfg``: :class:`~vigos_megatron.config.train.PretrainConfig`; parallel state must be initialised."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    from vigos_megatron.models.qwen2_5_vl import QwenVLBuilder
    from vigos_megatron.models.teacher import build_teacher_replica, freeze_
    from vigos_megatron.schedule.stage import StudentTeacherStage

    hf_files = initial_hf_files(cfg.model)
    builder = QwenVLBuilder.from_hf(
        hf_files, tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=cfg.parallel.pp,
        dtype=dtype, transformer_impl=cfg.model.transformer_impl, recompute=cfg.model.recompute,
    )
    student = builder.build(init_weights=False)
    load_initial_weights(builder, student, cfg.model)
    if cfg.model.teacher_hf_path:
        teacher = builder.build_from_hf(cfg.model.teacher_hf_path)
        freeze_(teacher)
    else:
        teacher = build_teacher_replica(builder, student).chunks
    if cfg.model.recompute == "full" and student[0].pre_process:
        # the HF vision tower is outside megatron's recompute: its own activation checkpointing
        student[0].visual.gradient_checkpointing_enable()
    if cfg.model.freeze_vision and student[0].pre_process:
        student[0].freeze(freeze_language_model=False, freeze_vision_model=True, freeze_vision_projection=True)
    # a frozen student tower that is still the teacher's: one vision-tower pass per image serves both
    share_vision = bool(cfg.model.freeze_vision and not cfg.model.teacher_hf_path)
    stage = StudentTeacherStage(student[0], teacher[0], share_vision=share_vision)
    config = stage.config
    config.calculate_per_token_loss = True  # the objectives fold their normalisation into the loss
    config.finalize_model_grads_func = finalize_model_grads
    model = [DistributedDataParallel(config, ddp_config, stage)]
    return TrainingModels(builder=builder, student=student, teacher=teacher, model=model, hf_files=hf_files)
