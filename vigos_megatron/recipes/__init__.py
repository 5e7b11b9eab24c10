"""Training recipes for Qwen2.5-VL 3B / 7B / 32B / 72B and the per-GPU memory estimate behind them.

* :mod:`.memory`     - :func:`estimate_memory` (any layout and workload), :func:`estimate_for_config`,
  :func:`choose_layout` / :func:`smallest_world_size` (layout search on 80 GB cards)
* :mod:`.qwen2_5_vl` - recipe functions returning a validated
  :class:`~vigos_megatron.config.train.PretrainConfig`, and :data:`RECIPES` / :func:`get_recipe` by name
"""

from vigos_megatron.recipes.memory import (
    LayoutError,
    MemoryEstimate,
    ModelShape,
    Workload,
    choose_layout,
    estimate_for_config,
    estimate_memory,
    smallest_world_size,
)
from vigos_megatron.recipes.qwen2_5_vl import (
    RECIPES,
    STATED_LAYOUTS,
    build_recipe,
    get_recipe,
    min_gpus,
    qwen2_5_vl_3b,
    qwen2_5_vl_7b,
    qwen2_5_vl_32b,
    qwen2_5_vl_72b,
)

__all__ = [
    "LayoutError", "MemoryEstimate", "ModelShape", "Workload", "choose_layout", "estimate_for_config",
    "estimate_memory", "smallest_world_size", "RECIPES", "STATED_LAYOUTS", "build_recipe", "get_recipe",
    "min_gpus", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b",
]
