"""ViGOS recipes for Qwen2.5-VL 3B / 7B / 32B / 72B: full-parameter training, model card settings.

Each recipe function returns a validated :class:`~vigos_megatron.config.train.PretrainConfig`
for ``num_gpus`` 80 GB GPUs (A100/H100), with the layout (``parallel.tp``, ``parallel.pp``) and
the rollout batch (``sampling.max_batch_size``) chosen by the memory estimate
(:func:`vigos_megatron.recipes.memory.choose_layout`) at the model card's lengths: prompts up to
32,768 tokens (images up to qwen-vl-utils' 16,384 tokens of 28 x 28 pixels), completions up to
4,096 tokens; the settings are :mod:`vigos_megatron.recipes.common`'s.

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

from vigos_megatron.recipes.common import RecipeModel, recipe_function

#: recipe name -> model and stated layouts (GPU count -> (tp, pp, dp, rollout batch))
MODELS = {rm.name: rm for rm in (
    RecipeModel("qwen2_5_vl_3b", "qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct",
                {4: (2, 1, 2, 8), 8: (2, 1, 4, 8), 16: (2, 1, 8, 4), 32: (2, 1, 16, 2), 64: (2, 1, 32, 1)}),
    RecipeModel("qwen2_5_vl_7b", "qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct",
                {8: (4, 1, 2, 8), 16: (4, 1, 4, 8), 32: (4, 1, 8, 4), 64: (4, 1, 16, 2), 128: (4, 1, 32, 1)}),
    RecipeModel("qwen2_5_vl_32b", "qwen2_5_vl_32b", "Qwen/Qwen2.5-VL-32B-Instruct",
                {64: (8, 2, 4, 8), 128: (8, 2, 8, 4), 256: (8, 2, 16, 2), 512: (8, 2, 32, 1)}),
    RecipeModel("qwen2_5_vl_72b", "qwen2_5_vl_72b", "Qwen/Qwen2.5-VL-72B-Instruct",
                {512: (8, 4, 16, 2), 1024: (8, 4, 32, 1)}),
)}

qwen2_5_vl_3b = recipe_function(MODELS["qwen2_5_vl_3b"])
qwen2_5_vl_7b = recipe_function(MODELS["qwen2_5_vl_7b"])
qwen2_5_vl_32b = recipe_function(MODELS["qwen2_5_vl_32b"])
qwen2_5_vl_72b = recipe_function(MODELS["qwen2_5_vl_72b"])
