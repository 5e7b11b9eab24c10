"""Training recipes for Qwen2.5-VL 3B / 7B / 32B / 72B and Qwen3-VL 2B / 4B / 8B / 32B, and the
per-GPU memory estimate behind them.

* :mod:`.memory`     - :func:`estimate_memory` (any layout and workload), :func:`estimate_for_config`,
  :func:`choose_layout` / :func:`smallest_world_size` (layout search on 80 GB cards)
* :mod:`.shapes`     - :class:`ModelShape`: parameter counts and activation bytes per family
* :mod:`.common`     - the model card's settings, the layout choice and the validated build
* :mod:`.qwen2_5_vl`, :mod:`.qwen3_vl` - the recipe functions of each family and their stated layouts
* :mod:`.registry`   - :data:`RECIPES` / :func:`get_recipe` / :func:`build_recipe` by name
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
from vigos_megatron.recipes.qwen2_5_vl import qwen2_5_vl_3b, qwen2_5_vl_7b, qwen2_5_vl_32b, qwen2_5_vl_72b
from vigos_megatron.recipes.qwen3_vl import qwen3_vl_2b, qwen3_vl_4b, qwen3_vl_8b, qwen3_vl_32b
from vigos_megatron.recipes.registry import RECIPES, STATED_LAYOUTS, build_recipe, get_recipe, min_gpus

__all__ = [
    "LayoutError", "MemoryEstimate", "ModelShape", "Workload", "choose_layout", "estimate_for_config",
    "estimate_memory", "smallest_world_size", "RECIPES", "STATED_LAYOUTS", "build_recipe", "get_recipe",
    "min_gpus", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b", "qwen3_vl_2b",
    "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b",
]
