"""Configuration of a ViGOS training run (``examples/pretrain_vigos.py --config conf/X.yaml``).

A training YAML composes the model / loss / data pieces of ``conf/`` (``compose:``, see
:mod:`vigos_megatron.config.loader`) and sets the rest. :func:`validate_layout` checks everything
that can be checked without a process group (recipes and tools call it too); the entry point
calls it before ``init_process_group``.

Batch accounting: ``train.global_batch_size`` prompts per optimizer step over all data-parallel
ranks; each DP rank draws ``global_batch_size / dp`` of them, generates one rollout per prompt,
and scores them in micro-batches of ``train.micro_batch_size`` rollouts (a micro-batch is one
stream of ``(Ks + Kt) * micro_batch_size`` rows through the student+teacher stages).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vigos_megatron.config.data import DataConfig
from vigos_megatron.errors import ConfigError, require_at_least, require_one_of, require_positive
from vigos_megatron.config.loss import LossConfig
from vigos_megatron.config.model import ModelConfig
from vigos_megatron.config.sampling import SamplingConfig
from vigos_megatron.models.family import pixel_unit_of, vision_layout_problem

NONFINITE_ACTIONS = ("skip", "stop")
CORRUPT_ACTIONS = ("fallback", "stop")
DECAY_STYLES = ("linear", "cosine", "constant")

@dataclass
class ParallelConfig:
    """The one place where the layout is set; data parallelism = world size / (tp * pp)."""

    tp: int = 1
    pp: int = 1

    def validate(self) -> None:
        require_at_least(self, 1, "tp", "pp")


@dataclass
class TrainConfig:
    #: total optimizer steps of the run (also sets the LR schedule)
    steps: int = 1
    #: stop after this many steps of the current launch, save, exit 0 (0: run to ``steps``)
    exit_after: int = 0
    #: prompts per optimizer step over all data-parallel ranks (model card: 32)
    global_batch_size: int = 32
    #: rollouts per micro-batch of the scoring/update schedule
    micro_batch_size: int = 1
    #: a micro-batch's rows (each slot's) are its longest one rounded up to this
    seq_multiple: int = 64
    #: micro-batches of rollouts of similar length (less padding; the loss is the same)
    group_by_length: bool = True
    seed: int = 1234
    #: a step whose loss or gradient norm is not finite: "skip" it (no update) or "stop" the run
    on_nonfinite: str = "skip"

    def validate(self) -> None:
        require_at_least(self, 1, "steps")
        require_at_least(self, 0, "exit_after")
        require_at_least(self, 1, "global_batch_size", "micro_batch_size", "seq_multiple")
        require_one_of(self, "on_nonfinite", NONFINITE_ACTIONS)


@dataclass
class OptimizerConfig:
    """megatron-core Adam (decoupled weight decay = AdamW) with fp32 main weights on GPU."""

    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    #: max global gradient norm (model card: 0.1); <= 0 disables clipping
    clip_grad: float = 0.1
    #: linear warmup steps, clamped to train.steps
    warmup_steps: int = 0
    decay_style: str = "linear"
    #: shard optimizer state over data-parallel ranks when DP > 1
    distributed_optimizer: bool = True
    #: distributed optimizer only (needs distributed_optimizer=true and DP > 1): the parameter
    #: all-gather leaves optimizer.step() and runs at the next forward (megatron DDP's forward
    #: pre-hooks); the loop forces it before every rollout and checkpoint
    #: (training.optimizer.ensure_params_gathered). Megatron gives every trainable parameter
    #: one bucket here (no overlapped gradient reduction), so this moves the gather, it does not
    #: hide it behind compute.
    overlap_param_gather: bool = False

    def validate(self) -> None:
        require_positive(self, "lr")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        require_at_least(self, 0, "weight_decay")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        require_at_least(self, 0, "warmup_steps")
        require_one_of(self, "decay_style", DECAY_STYLES)
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError("overlap_param_gather: only the distributed optimizer gathers parameters; "
                              "set optimizer.distributed_optimizer=true or overlap_param_gather=false")


@dataclass
class CheckpointConfig:
    #: save every this many steps (0: only when the launch ends: train.steps, exit_after, SIGTERM)
    save_interval: int = 0
    #: resume with the checkpoint's optimizer state (false: its weights, LR-schedule and data
    #: positions with fresh Adam moments, e.g. after changing the parameter dtype)
    load_optimizer: bool = True
    #: keep the newest N complete checkpoints; older ones are removed once a newer one is complete
    #: (0: keep every checkpoint)
    keep_last: int = 3
    #: the newest checkpoint fails to read at resume: "fallback" to the newest complete older one
    #: (named, with the steps repeated; exit 2 when none is left) or "stop" (exit 2, nothing touched)
    on_corrupt: str = "fallback"
    #: resume although the objective, its weights, the model, the data stream or the optimizer
    #: settings differ from those stored with the checkpoint (a layout change never needs it)
    allow_changes: bool = False
    #: write the interval checkpoints in the background (megatron-core's asynchronous dist-checkpoint
    #: save, a forked writer per rank) while training goes on; the tracker moves once the save is
    #: complete and verified; a stop signal and the end of the launch wait for it
    async_save: bool = False

    def validate(self) -> None:
        require_at_least(self, 0, "save_interval", "keep_last")
        require_one_of(self, "on_corrupt", CORRUPT_ACTIONS)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    #: print a progress line every this many steps (rank 0)
    progress_interval: int = 1
    #: write the first N rollouts of each step (data-parallel rank 0) to ``run_dir/rollouts.jsonl``:
    #: prompt, completion, validity, answer, and the exact text each teacher read (0: off)
    dump_rollouts: int = 0

    def validate(self) -> None:
        require_at_least(self, 1, "progress_interval")
        require_at_least(self, 0, "dump_rollouts")


#: ``tiny.teacher`` choices
TINY_TEACHERS = ("none", "larger")


@dataclass
class TinyDemoConfig:
    """The embedded default: a tiny Qwen2.5-VL (or Qwen3-VL) taught the completion format and synthetic
    shards, built once per setting in a cache (:mod:`vigos_megatron.training.tiny_demo`); fixed seeds."""

    enabled: bool = False
    #: the tiny model's family (HF model type): ``qwen2_5_vl`` or ``qwen3_vl``
    family: str = "qwen2_5_vl"
    samples: int = 32
    seed: int = 0
    #: teacher-forced steps that teach the random checkpoint the completion format before the run
    #: (:mod:`vigos_megatron.testing.format_prior`), and the size of each further round when the
    #: self-check falls short; 0: a purely random model (malformed rollouts) and no self-check
    format_prior_steps: int = 0
    #: the warm start stops with an error past this many steps
    format_prior_max_steps: int = 480
    #: the self-check samples the student prompts of this many samples (at most ``samples``)...
    check_prompts: int = 16
    #: ... and needs at least this fraction of valid completions
    min_valid_rate: float = 0.7
    #: "larger": a teacher of its own beside the student (hidden 96 vs 64, more layers and heads; the
    #: same tokenizer), given the student's warm start, written with the assets and used as
    #: ``model.teacher.hf_path``; "none": the teacher is the replica of the student (or ``model.teacher``)
    teacher: str = "none"

    def validate(self) -> None:
        from vigos_megatron.models.family import supported_model_types

        require_one_of(self, "family", supported_model_types())
        require_one_of(self, "teacher", TINY_TEACHERS)
        require_at_least(self, 1, "samples")
        require_at_least(self, 0, "format_prior_steps")
        if self.format_prior_max_steps < self.format_prior_steps:
            raise ConfigError(f"format_prior_max_steps: {self.format_prior_max_steps} is below "
                              f"format_prior_steps={self.format_prior_steps}")
        if not 1 <= self.check_prompts <= self.samples:
            raise ConfigError(f"check_prompts: must be in [1, samples={self.samples}], got {self.check_prompts}")
        if not 0.0 <= self.min_valid_rate <= 1.0:
            raise ConfigError(f"min_valid_rate: must be in [0, 1], got {self.min_valid_rate}")


@dataclass
class PretrainConfig:
    run_dir: str = ""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tiny: TinyDemoConfig = field(default_factory=TinyDemoConfig)

    @property
    def own_teacher(self) -> bool:
        """The teacher is a checkpoint of its own (``model.teacher``, or the demo's ``tiny.teacher``), not the
        replica of the initial student."""
        return self.model.teacher.separate or (self.tiny.enabled and self.tiny.teacher != "none")

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir: must be set (checkpoints, metrics and logs go there)")
        if self.train.exit_after > self.train.steps:
            raise ConfigError(f"train.exit_after: {self.train.exit_after} exceeds train.steps={self.train.steps}")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError(f"train.micro_batch_size: {self.train.micro_batch_size} does not divide "
                              f"train.global_batch_size={self.train.global_batch_size}")
        from vigos_megatron import objectives

        objective = objectives.get(self.loss.objective)
        needed = objective.contexts(self)
        missing = [c for c in needed if c not in self.data.context.contexts]
        if missing:
            raise ConfigError(f"data.context.contexts: objective {self.loss.objective!r} needs the contexts {missing}")
        if self.tiny.teacher != "none" and self.model.teacher.separate:
            raise ConfigError("tiny.teacher: the demo writes its own teacher; unset model.teacher or tiny.teacher")
        _check_prompt_template(self, objective)
        if not self.tiny.enabled:
            if not (self.model.hf_path or self.model.init_checkpoint):
                raise ConfigError("model.hf_path: set it (or model.init_checkpoint, or tiny.enabled=true)")


def _check_prompt_template(cfg: PretrainConfig, objective) -> None:
    """The template at ``data.context.prompts_path`` defines every ``data.context.contexts`` and asks for
    a completion format the objective trains on (a missing file is :func:`~vigos_megatron.config.paths.check_paths`'s)."""
    from vigos_megatron.data.prompts import load_templates

    path = cfg.data.context.prompts_path
    if not Path(path).is_file():
        return
    templates = load_templates(path)
    if objective.completion_formats is not None and templates.format not in objective.completion_formats:
        raise ConfigError(f"loss.objective: {objective.name!r} needs completions in the "
                          f"{'/'.join(objective.completion_formats)} format (its segments), but "
                          f"data.context.prompts_path={path} asks for the {templates.format!r} format; "
                          f"choose another objective or a {objective.completion_formats[0]!r} template")
    undefined = [c for c in cfg.data.context.contexts if c not in templates.contexts]
    if undefined:
        raise ConfigError(f"data.context.contexts: {undefined} are not defined by data.context.prompts_path={path} "
                          f"(it defines {sorted(templates.contexts)})")


def _validate_data_paths(cfg) -> None:
    """Skipped by ``PretrainConfig.validate`` when the tiny demo writes them; checked here otherwise."""
    if not cfg.data.loader.shards_dir:
        raise ConfigError("data.loader.shards_dir: must be set")
    if not cfg.data.context.processor_path:
        raise ConfigError("data.context.processor_path: must be set")


@dataclass(frozen=True)
class Layout:
    """The process layout of a run: ``world = tp * pp * dp``."""

    tp: int
    pp: int
    dp: int
    prompts_per_rank: int
    micro_batches: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def _hf_config_json(cfg: PretrainConfig) -> dict | None:
    """The text config of the model to build, when it can be read without loading weights."""
    candidates = []
    if cfg.model.init_checkpoint:
        p = Path(cfg.model.init_checkpoint)
        candidates += [p / "hf" / "config.json", *sorted(p.glob("iter_*/hf/config.json"))[:1]]
    if cfg.model.hf_path:
        candidates.append(Path(cfg.model.hf_path) / "config.json")
    for c in candidates:
        if c.is_file():
            try:
                return json.loads(c.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{c}: invalid JSON ({e})") from None
    return None


def _student_hf_dir(cfg: PretrainConfig) -> Path | None:
    """The student's HF directory when it exists already (not the tiny demo's, written at launch)."""
    if cfg.model.init_checkpoint:
        from vigos_megatron.convert.megatron_checkpoint import hf_dir_of, resolve_checkpoint
        from vigos_megatron.models.hf_checkpoint import CheckpointError

        try:
            return hf_dir_of(resolve_checkpoint(cfg.model.init_checkpoint))
        except CheckpointError:  # reported by the path checks, naming the option
            return None
    return Path(cfg.model.hf_path) if cfg.model.hf_path and Path(cfg.model.hf_path).is_dir() else None


def _check_teacher(cfg: PretrainConfig, tp: int, pp: int) -> None:
    """A teacher of its own against the student (:func:`vigos_megatron.config.teacher.check_pair`)."""
    teacher = cfg.model.teacher
    student = _student_hf_dir(cfg)
    if not teacher.separate or student is None:
        return
    from vigos_megatron.config.teacher import check_pair, teacher_hf_dir

    option = "model.teacher.hf_path" if teacher.hf_path else "model.teacher.init_checkpoint"
    check_pair(student, teacher_hf_dir(teacher), tp=tp, pp=pp, pipeline_layers=teacher.pipeline_layers, option=option)


def context_pixel_bounds(cfg: PretrainConfig, raw: dict | None = None) -> tuple[int, int]:
    """``data.context``'s ``(min_pixels, max_pixels)`` in the unit of the model to build (its
    ``config.json``, or ``raw``), defaults resolved (:meth:`~vigos_megatron.config.data.ContextConfig.pixel_bounds`)."""
    raw = raw if raw is not None else _hf_config_json(cfg)
    if not (raw or {}).get("vision_config"):
        raise ConfigError("model.hf_path: no readable config.json with a vision_config (data.context's pixel "
                          "bounds are in the model's unit)")
    try:
        unit = pixel_unit_of(raw["vision_config"])
    except KeyError as e:
        raise ConfigError(f"model.hf_path: config.json's vision_config has no {e} (needed for data.context's "
                          "pixel bounds)") from None
    return cfg.data.context.pixel_bounds(unit)


def validate_layout(cfg: PretrainConfig, world_size: int) -> Layout:
    """Check ``cfg`` against ``world_size`` processes; no process group needed. Returns the layout.

    Raises :class:`ConfigError` naming the option for: a world size that ``tp * pp`` does not
    divide, a global batch that data parallelism or the micro-batch size does not divide, and
    (when the model's ``config.json`` is readable) a vocabulary or head count that ``tp`` does
    not divide, a layer count that ``pp`` does not divide, a first stage too short for the
    deepstack layers, or ``data.context`` pixel bounds out of the model's unit.
    """
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size % (tp * pp):
        raise ConfigError(f"parallel.tp * parallel.pp = {tp * pp} does not divide the world size {world_size} "
                          "(the ranks started: --nproc-per-node, or torchrun's --nproc_per_node)")
    dp = world_size // (tp * pp)
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs % dp:
        raise ConfigError(f"train.global_batch_size: {gbs} prompts do not split over {dp} data-parallel ranks "
                          f"(world {world_size} / (tp {tp} * pp {pp}))")
    per_rank = gbs // dp
    if per_rank % mbs:
        raise ConfigError(f"train.micro_batch_size: {mbs} does not divide the {per_rank} prompts per data-parallel rank")
    if cfg.optimizer.overlap_param_gather and dp == 1:
        raise ConfigError(f"optimizer.overlap_param_gather: needs data parallelism (DP > 1) for the distributed "
                          f"optimizer, got DP=1 (world {world_size} / (tp {tp} * pp {pp}))")
    if not cfg.tiny.enabled:
        _validate_data_paths(cfg)
    raw = _hf_config_json(cfg)
    if raw is not None:
        text = raw.get("text_config", raw)
        for key, div, opt in (("vocab_size", tp, "parallel.tp"), ("num_attention_heads", tp, "parallel.tp"),
                              ("num_key_value_heads", tp, "parallel.tp"), ("num_hidden_layers", pp, "parallel.pp")):
            n = text.get(key, raw.get(key))
            if n is not None and n % div:
                raise ConfigError(f"{opt}: {div} does not divide the model's {key}={n}")
        if raw.get("vision_config"):
            context_pixel_bounds(cfg, raw)
        layers = text.get("num_hidden_layers", raw.get("num_hidden_layers"))
        deepstack = (raw.get("vision_config") or {}).get("deepstack_visual_indexes") or ()
        problem = layers and vision_layout_problem(tp=tp, pp=pp, num_layers=layers, deepstack_layers=len(deepstack))
        if problem:
            raise ConfigError(problem)
    _check_teacher(cfg, tp, pp)
    return Layout(tp=tp, pp=pp, dp=dp, prompts_per_rank=per_rank, micro_batches=per_rank // mbs)
