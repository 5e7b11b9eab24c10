"""ViGOS recipes for Qwen2.5-VL 3B / 7B / 32B / 72B: full-parameter training, model card settings.

Each recipe function returns a validated :class:`~vigos_megatron.config.train.PretrainConfig`
for ``num_gpus`` 80 GB GPUs (A100/H100), with the layout (``parallel.tp``, ``parallel.pp``) and
the rollout batch (``sampling.max_batch_size``) chosen by the memory estimate
(:func:`vigos_megatron.recipes.memory.choose_layout`) at the model card's lengths: prompts up to
32,768 tokens (images up to qwen-vl-utils' 16,384 tokens), completions up to 4,096 tokens.

The model card's recipe (``../shared/METHOD.md`` section 2): one epoch of Vision-SR1-47K at 32
prompts per optimizer step, AdamW (decoupled weight decay 0) at 5e-6 with a linear decay and no
warmup, max gradient norm 0.1, bf16, rollouts at temperature 1.1 / top-p 0.95 / top-k 20,
ViGOS weights 1 / 1 / 2 with the 0.05 KL clip. Full recomputation of the language layers (and
checkpointed vision blocks) is what makes 36,864-token streams fit; no sequence parallelism.

Smallest GPU count and the layout at larger counts (``tp x pp x dp``, rollout batch), as the
estimate gives them (:data:`STATED_LAYOUTS`; a test recomputes them):

=============  ====  ===================================================================
recipe         min   layouts
=============  ====  ===================================================================
qwen2_5_vl_3b  4     4: 2x1x2 (8); 8: 2x1x4 (8); 16: 2x1x8 (4); 32: 2x1x16 (2); 64: 2x1x32 (1)
qwen2_5_vl_7b  8     8: 4x1x2 (8); 16: 4x1x4 (8); 32: 4x1x8 (4); 64: 4x1x16 (2); 128: 4x1x32 (1)
qwen2_5_vl_32b 64    64: 8x2x4 (8); 128: 8x2x8 (4); 256: 8x2x16 (2); 512: 8x2x32 (1)
qwen2_5_vl_72b 512   512: 8x4x16 (2); 1024: 8x4x32 (1)
=============  ====  ===================================================================

What sets these numbers (see each estimate's table): for 3B and 7B the rollout prefill of a
32,768-token prompt with the rollout engine's unfused local attention (``4 a/tp S^2`` bytes of
scores and probabilities per layer); for 32B and 72B the layer inputs kept by full recomputation
(``2 H S`` bytes per layer per in-flight micro-batch: without sequence parallelism TP does not
split them) and the checkpointed vision tower of a 16,384-token image. Shorter caps
(``data.context.max_prompt_tokens``, ``data.context.max_pixels``) need fewer GPUs: the launcher
re-runs the estimate after ``key=value`` overrides.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from vigos_megatron.config.data import ContextConfig, DataConfig, LoaderConfig
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
    PIXELS_PER_IMAGE_TOKEN,
    WORLD_SIZES,
    MemoryEstimate,
    Workload,
    choose_layout,
    estimate_memory,
)

#: rows of the Vision-SR1-47K train split (about 47.6k); a shard manifest's count replaces it
VISION_SR1_47K_ROWS = 47_600
GLOBAL_BATCH_SIZE = 32

#: recipe name -> (model size, HF repository id)
MODELS = {
    "qwen2_5_vl_3b": ("3b", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2_5_vl_7b": ("7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
    "qwen2_5_vl_32b": ("32b", "Qwen/Qwen2.5-VL-32B-Instruct"),
    "qwen2_5_vl_72b": ("72b", "Qwen/Qwen2.5-VL-72B-Instruct"),
}

#: what each recipe states: GPU count -> (tp, pp, dp, rollout batch); the smallest key fits first
STATED_LAYOUTS = {
    "qwen2_5_vl_3b": {4: (2, 1, 2, 8), 8: (2, 1, 4, 8), 16: (2, 1, 8, 4), 32: (2, 1, 16, 2), 64: (2, 1, 32, 1)},
    "qwen2_5_vl_7b": {8: (4, 1, 2, 8), 16: (4, 1, 4, 8), 32: (4, 1, 8, 4), 64: (4, 1, 16, 2), 128: (4, 1, 32, 1)},
    "qwen2_5_vl_32b": {64: (8, 2, 4, 8), 128: (8, 2, 8, 4), 256: (8, 2, 16, 2), 512: (8, 2, 32, 1)},
    "qwen2_5_vl_72b": {512: (8, 4, 16, 2), 1024: (8, 4, 32, 1)},
}


def _check_name(name: str) -> str:
    if name not in MODELS:
        raise ConfigError(f"recipe: unknown recipe {name!r}; known: {', '.join(MODELS)}")
    return name


def min_gpus(name: str) -> int:
    """The smallest GPU count the recipe states it fits on (80 GB cards)."""
    return min(STATED_LAYOUTS[_check_name(name)])


def dataset_rows(shards_dir: str) -> int:
    """Converted samples in ``<shards_dir>/manifest.json`` when readable, else :data:`VISION_SR1_47K_ROWS`."""
    manifest = Path(shards_dir) / "manifest.json"
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text())["counts"]["converted"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{manifest}: cannot read counts.converted ({e})") from None
    return VISION_SR1_47K_ROWS


def base_config(name: str, *, hf_path: str, run_dir: str, shards_dir: str, processor_path: str = "",
                steps: int = 1) -> PretrainConfig:
    """The model card's settings with a placeholder layout (tp = pp = 1)."""
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
                                  max_prompt_tokens=32768),
        ),
        checkpoint=CheckpointConfig(save_interval=100),
        logging=LoggingConfig(tensorboard=True, progress_interval=1),
    )


def plan(name: str, num_gpus: int, cfg: PretrainConfig | None = None, *,
         tune_rollout_batch: bool = True) -> MemoryEstimate | None:
    """The layout the recipe picks on ``num_gpus`` GPUs for ``cfg``'s workload (None: it does not fit)."""
    size, _ = MODELS[_check_name(name)]
    if cfg is None:
        cfg = base_config(name, hf_path="unused", run_dir="unused", shards_dir="unused")
    return choose_layout(size, num_gpus, Workload.from_config(cfg), tune_rollout_batch=tune_rollout_batch)


def apply_overrides(cfg: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """``cfg`` with ``key=value`` overrides applied and validated (the loader's rules and messages)."""
    if not overrides:
        return cfg
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(to_yaml(cfg))
        return load_config(PretrainConfig, path, list(overrides))


def build_recipe(name: str, num_gpus: int = 8, *, hf_path: str = "", run_dir: str = "", shards_dir: str = "",
                 processor_path: str = "", epochs: int = 1, dataset_size: int | None = None,
                 overrides: Sequence[str] = (), check_memory: bool = True) -> PretrainConfig:
    """A validated config of recipe ``name`` for ``num_gpus`` 80 GB GPUs.

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
    size, repo = MODELS[_check_name(name)]
    hf_path = hf_path or f"checkpoints/{repo.split('/')[-1]}"
    shards_dir = shards_dir or "data/vision_sr1_47k_shards"
    if epochs < 1:
        raise ConfigError(f"epochs: must be >= 1, got {epochs}")
    if num_gpus < 1:
        raise ConfigError(f"num_gpus: must be >= 1, got {num_gpus}")
    rows = dataset_rows(shards_dir) if dataset_size is None else int(dataset_size)
    steps = max(1, epochs * rows // GLOBAL_BATCH_SIZE)
    cfg = base_config(name, hf_path=hf_path, run_dir=run_dir or f"runs/{name}", shards_dir=shards_dir,
                      processor_path=processor_path, steps=steps)
    cfg = apply_overrides(cfg, overrides)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    lengths = (f"prompt {cfg.data.context.max_prompt_tokens} + completion {cfg.sampling.max_new_tokens} tokens, "
               f"images up to {cfg.data.context.max_pixels // PIXELS_PER_IMAGE_TOKEN} tokens")
    if keys & {"parallel.tp", "parallel.pp"}:
        layout = validate_layout(cfg, num_gpus)
        est = estimate_memory(size, tp=layout.tp, pp=layout.pp, dp=layout.dp, workload=Workload.from_config(cfg))
        if check_memory and not est.fits():
            raise ConfigError(f"parallel: tp={layout.tp} pp={layout.pp} dp={layout.dp} needs about {est.peak_gib:.1f} GiB "
                              f"per GPU at {lengths} (memory estimate; 80 GB cards allow "
                              f"{GPU_80GB_GIB - DEFAULT_RESERVE_GIB:.0f}):\n{est.table()}")
    else:
        est = plan(name, num_gpus, cfg, tune_rollout_batch="sampling.max_batch_size" not in keys)
        if est is None:
            smallest = next((n for n in WORLD_SIZES if n > num_gpus and plan(name, n, cfg) is not None), None)
            hint = f"; the smallest count that fits is {smallest}" if smallest else ""
            raise ConfigError(f"{name}: does not fit on {num_gpus} x 80 GB GPUs at {lengths} (memory estimate){hint}")
        cfg.parallel = ParallelConfig(tp=est.tp, pp=est.pp)
        cfg.sampling.max_batch_size = est.workload.rollout_batch_size
    if "data.loader.batch_size" not in keys:
        cfg.data.loader.batch_size = cfg.train.global_batch_size // est.dp
    _validate_tree(cfg)
    validate_layout(cfg, num_gpus)
    return cfg


def _recipe(name: str) -> Callable[..., PretrainConfig]:
    size, repo = MODELS[name]

    def recipe(num_gpus: int = 8, **kwargs) -> PretrainConfig:
        return build_recipe(name, num_gpus, **kwargs)

    recipe.__name__ = recipe.__qualname__ = name
    layouts = "; ".join(f"{n} GPUs: tp={t} pp={p} dp={d}, rollout batch {b}"
                        for n, (t, p, d, b) in STATED_LAYOUTS[name].items())
    recipe.__doc__ = (
        f"ViGOS on {repo} (full parameters), the model card's recipe, for ``num_gpus`` 80 GB GPUs.\n\n"
        f"Fits on {min_gpus(name)} GPUs at the smallest; {layouts}.\n"
        f"Keyword arguments: see :func:`build_recipe`. Returns a validated ``PretrainConfig``."
    )
    return recipe


qwen2_5_vl_3b = _recipe("qwen2_5_vl_3b")
qwen2_5_vl_7b = _recipe("qwen2_5_vl_7b")
qwen2_5_vl_32b = _recipe("qwen2_5_vl_32b")
qwen2_5_vl_72b = _recipe("qwen2_5_vl_72b")

#: recipe name -> recipe function
RECIPES: dict[str, Callable[..., PretrainConfig]] = {
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "qwen2_5_vl_7b": qwen2_5_vl_7b,
    "qwen2_5_vl_32b": qwen2_5_vl_32b,
    "qwen2_5_vl_72b": qwen2_5_vl_72b,
}


def get_recipe(name: str) -> Callable[..., PretrainConfig]:
    """The recipe function called ``name`` (``ConfigError`` listing the known names otherwise)."""
    return RECIPES[_check_name(name)]
