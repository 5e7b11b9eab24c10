"""What every ViGOS recipe shares: the model card's settings (:func:`base_config`), the layout
search on 80 GB GPUs (:func:`plan`) and the validated build (:func:`build_recipe`), for one
:class:`RecipeModel`. The family modules (:mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`) list their models
and the layouts they state; :mod:`.registry` finds a recipe by name.

The model card's recipe (``../shared/METHOD.md`` section 2): one epoch of Vision-SR1-47K at 32
prompts per optimizer step, AdamW (decoupled weight decay 0) at 5e-6 with a linear decay and no
warmup, max gradient norm 0.1, bf16, rollouts at temperature 1.1 / top-p 0.95 / top-k 20,
ViGOS weights 1 / 1 / 2 with the 0.05 KL clip, prompts up to 32,768 tokens and completions up to
4,096. Full recomputation of the language layers (and checkpointed vision blocks) is what makes
36,864-token streams fit; no sequence parallelism.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from vigos_megatron.config.data import DEFAULT_MAX_IMAGE_TOKENS, DEFAULT_MIN_IMAGE_TOKENS, ContextConfig, DataConfig, LoaderConfig
from vigos_megatron.config.loader import ConfigError, _validate_tree, load_config, to_yaml
from vigos_megatron.config.loss import LossConfig
from vigos_megatron.config.model import ModelConfig
from vigos_megatron.config.sampling import SamplingConfig
from vigos_megatron.config.train import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    PretrainConfig,
    TrainConfig,
    validate_layout,
)
from vigos_megatron.recipes.memory import (
    DEFAULT_RESERVE_GIB,
    GPU_80GB_GIB,
    WORLD_SIZES,
    MemoryEstimate,
    Workload,
    as_model_shape,
    choose_layout,
    estimate_memory,
)

#: rows of the Vision-SR1-47K train split (about 47.6k); a shard manifest's count replaces it
VISION_SR1_47K_ROWS = 47_600
GLOBAL_BATCH_SIZE = 32


@dataclass(frozen=True)
class RecipeModel:
    """One recipe's model: ``model`` is a name :meth:`~vigos_megatron.recipes.memory.ModelShape.from_hf`
    knows (``"qwen3_vl_8b"``), ``repo`` its HF repository, ``layouts`` what the recipe states:
    GPU count -> ``(tp, pp, dp, rollout batch)``, the smallest key fitting first (a test recomputes them)."""

    name: str
    model: str
    repo: str
    layouts: dict

    @property
    def pixel_unit(self) -> int:
        """Side in pixels of one LM image token (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
        return as_model_shape(self.model).vision.pixel_unit

    @property
    def min_gpus(self) -> int:
        return min(self.layouts)


def dataset_rows(shards_dir: str) -> int:
    """Converted samples in ``<shards_dir>/manifest.json`` when readable, else :data:`VISION_SR1_47K_ROWS`."""
    manifest = Path(shards_dir) / "manifest.json"
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text())["counts"]["converted"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{manifest}: cannot read counts.converted ({e})") from None
    return VISION_SR1_47K_ROWS


def base_config(rm: RecipeModel, *, hf_path: str, run_dir: str, shards_dir: str, processor_path: str = "",
                steps: int = 1) -> PretrainConfig:
    """The model card's settings with a placeholder layout (tp = pp = 1); image bounds in the
    model's own pixel unit."""
    unit2 = rm.pixel_unit**2
    return PretrainConfig(
        run_dir=run_dir,
        parallel=ParallelConfig(tp=1, pp=1),
        model=ModelConfig(hf_path=hf_path, dtype="bfloat16", transformer_impl="auto", recompute="full",
                          freeze_vision=False),
        train=TrainConfig(steps=steps, global_batch_size=GLOBAL_BATCH_SIZE, micro_batch_size=1, seq_multiple=64,
                          seed=1234, on_nonfinite="skip"),
        optimizer=OptimizerConfig(lr=5e-6, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                                  adam_eps=1e-8, clip_grad=0.1, warmup_steps=0, decay_style="linear",
                                  distributed_optimizer=True),
        loss=LossConfig(objective="vigos"),
        sampling=SamplingConfig(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=4096, greedy=False,
                                seed=1234, max_batch_size=32),
        data=DataConfig(
            loader=LoaderConfig(shards_dir=shards_dir, batch_size=1, num_workers=2, prefetch_factor=2, seed=1234,
                                shuffle_shards=True, shuffle_buffer=1000),
            context=ContextConfig(processor_path=processor_path or hf_path, prompts_path="conf/prompts/vigos.yaml",
                                  min_pixels=DEFAULT_MIN_IMAGE_TOKENS * unit2,
                                  max_pixels=DEFAULT_MAX_IMAGE_TOKENS * unit2,
                                  max_prompt_tokens=32768),
        ),
        checkpoint=CheckpointConfig(save_interval=100),
        logging=LoggingConfig(tensorboard=True, progress_interval=1),
    )


def plan(rm: RecipeModel, num_gpus: int, cfg: PretrainConfig | None = None, *,
         tune_rollout_batch: bool = True) -> MemoryEstimate | None:
    """The layout the recipe picks on ``num_gpus`` GPUs for ``cfg``'s workload (None: it does not fit)."""
    if cfg is None:
        cfg = base_config(rm, hf_path="unused", run_dir="unused", shards_dir="unused")
    return choose_layout(rm.model, num_gpus, Workload.from_config(cfg, rm.model), tune_rollout_batch=tune_rollout_batch)


def apply_overrides(cfg: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """``cfg`` with ``key=value`` overrides applied and validated (the loader's rules and messages)."""
    if not overrides:
        return cfg
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(to_yaml(cfg))
        return load_config(PretrainConfig, path, list(overrides))


def build_recipe(rm: RecipeModel, num_gpus: int = 8, *, hf_path: str = "", run_dir: str = "", shards_dir: str = "",
                 processor_path: str = "", epochs: int = 1, dataset_size: int | None = None,
                 overrides: Sequence[str] = (), check_memory: bool = True) -> PretrainConfig:
    """A validated config of recipe ``rm`` for ``num_gpus`` 80 GB GPUs.

    Args:
        hf_path: local HF directory of the model (default ``checkpoints/<repository name>``).
        run_dir: default ``runs/<name>``. shards_dir: ``tools/make_webdataset.py`` output
            (default ``data/vision_sr1_47k_shards``). processor_path: default ``hf_path``.
        epochs, dataset_size: ``train.steps = epochs * dataset_size // 32`` (``dataset_size`` default:
            the shards' manifest count, else 47,600).
        overrides: ``key=value`` config overrides, applied before the layout is chosen. With
            ``parallel.tp`` / ``parallel.pp`` among them the layout is the user's (checked against
            the estimate); with ``sampling.max_batch_size`` the rollout batch is kept.
        check_memory: refuse a layout the estimate says does not fit (user layouts only).

    Raises:
        ConfigError: the model does not fit on ``num_gpus`` GPUs (the message gives the smallest
            count that does), or an invalid option.
    """
    hf_path = hf_path or f"checkpoints/{rm.repo.split('/')[-1]}"
    shards_dir = shards_dir or "data/vision_sr1_47k_shards"
    if epochs < 1:
        raise ConfigError(f"epochs: must be >= 1, got {epochs}")
    if num_gpus < 1:
        raise ConfigError(f"num_gpus: must be >= 1, got {num_gpus}")
    rows = dataset_rows(shards_dir) if dataset_size is None else int(dataset_size)
    steps = max(1, epochs * rows // GLOBAL_BATCH_SIZE)
    cfg = base_config(rm, hf_path=hf_path, run_dir=run_dir or f"runs/{rm.name}", shards_dir=shards_dir,
                      processor_path=processor_path, steps=steps)
    cfg = apply_overrides(cfg, overrides)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    lengths = (f"prompt {cfg.data.context.max_prompt_tokens} + completion {cfg.sampling.max_new_tokens} tokens, "
               f"images up to {cfg.data.context.pixel_bounds(rm.pixel_unit)[1] // rm.pixel_unit**2} tokens")
    if keys & {"parallel.tp", "parallel.pp"}:
        layout = validate_layout(cfg, num_gpus)
        est = estimate_memory(rm.model, tp=layout.tp, pp=layout.pp, dp=layout.dp,
                              workload=Workload.from_config(cfg, rm.model))
        if check_memory and not est.fits():
            raise ConfigError(f"parallel: tp={layout.tp} pp={layout.pp} dp={layout.dp} needs about {est.peak_gib:.1f} GiB "
                              f"per GPU at {lengths} (memory estimate; 80 GB cards allow "
                              f"{GPU_80GB_GIB - DEFAULT_RESERVE_GIB:.0f}):\n{est.table()}")
    else:
        est = plan(rm, num_gpus, cfg, tune_rollout_batch="sampling.max_batch_size" not in keys)
        if est is None:
            smallest = next((n for n in WORLD_SIZES if n > num_gpus and plan(rm, n, cfg) is not None), None)
            hint = f"; the smallest count that fits is {smallest}" if smallest else ""
            raise ConfigError(f"{rm.name}: does not fit on {num_gpus} x 80 GB GPUs at {lengths} (memory estimate){hint}")
        cfg.parallel = ParallelConfig(tp=est.tp, pp=est.pp)
        cfg.sampling.max_batch_size = est.workload.rollout_batch_size
    if "data.loader.batch_size" not in keys:
        cfg.data.loader.batch_size = cfg.train.global_batch_size // est.dp
    _validate_tree(cfg)
    validate_layout(cfg, num_gpus)
    return cfg


def recipe_function(rm: RecipeModel) -> Callable[..., PretrainConfig]:
    """The public recipe function of ``rm``: ``fn(num_gpus=8, **kwargs)`` -> :func:`build_recipe`."""

    def recipe(num_gpus: int = 8, **kwargs) -> PretrainConfig:
        return build_recipe(rm, num_gpus, **kwargs)

    recipe.__name__ = recipe.__qualname__ = rm.name
    layouts = "; ".join(f"{n} GPUs: tp={t} pp={p} dp={d}, rollout batch {b}" for n, (t, p, d, b) in rm.layouts.items())
    recipe.__doc__ = (
        f"ViGOS on {rm.repo} (full parameters), the model card's recipe, for ``num_gpus`` 80 GB GPUs.\n\n"
        f"Fits on {rm.min_gpus} GPUs at the smallest; {layouts}.\n"
        f"Keyword arguments: see :func:`vigos_megatron.recipes.common.build_recipe`. Returns a validated "
        f"``PretrainConfig``."
    )
    return recipe
