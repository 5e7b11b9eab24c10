"""Every recipe by name (:data:`RECIPES`, :func:`get_recipe`, :func:`build_recipe`, :func:`plan`),
over the family modules :mod:`.qwen2_5_vl` and :mod:`.qwen3_vl`."""

from __future__ import annotations

from typing import Callable

from vigos_megatron.config.loader import ConfigError
from vigos_megatron.config.train import PretrainConfig
from vigos_megatron.recipes import common, qwen2_5_vl, qwen3_vl
from vigos_megatron.recipes.common import RecipeModel
from vigos_megatron.recipes.memory import MemoryEstimate

#: recipe name -> :class:`~vigos_megatron.recipes.common.RecipeModel`
MODELS: dict[str, RecipeModel] = {**qwen2_5_vl.MODELS, **qwen3_vl.MODELS}
#: recipe name -> stated layouts: GPU count -> (tp, pp, dp, rollout batch)
STATED_LAYOUTS = {name: rm.layouts for name, rm in MODELS.items()}
#: recipe name -> recipe function
RECIPES: dict[str, Callable[..., PretrainConfig]] = {name: getattr(mod, name) for mod in (qwen2_5_vl, qwen3_vl)
                                                     for name in mod.MODELS}


def recipe_model(name: str) -> RecipeModel:
    if name not in MODELS:
        raise ConfigError(f"recipe: unknown recipe {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def get_recipe(name: str) -> Callable[..., PretrainConfig]:
    """The recipe function called ``name`` (``ConfigError`` listing the known names otherwise)."""
    return RECIPES[recipe_model(name).name]


def min_gpus(name: str) -> int:
    """The smallest GPU count the recipe states it fits on (80 GB cards)."""
    return recipe_model(name).min_gpus


def build_recipe(name: str, num_gpus: int = 8, **kwargs) -> PretrainConfig:
    """:func:`vigos_megatron.recipes.common.build_recipe` of the recipe called ``name``."""
    return common.build_recipe(recipe_model(name), num_gpus, **kwargs)


def plan(name: str, num_gpus: int, cfg: PretrainConfig | None = None, **kwargs) -> MemoryEstimate | None:
    """:func:`vigos_megatron.recipes.common.plan` of the recipe called ``name``."""
    return common.plan(recipe_model(name), num_gpus, cfg, **kwargs)
