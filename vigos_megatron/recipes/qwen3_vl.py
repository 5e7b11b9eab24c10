"""ViGOS recipes for Qwen3-VL (dense) 2B / 4B / 8B / 32B: full-parameter training, model card settings.

Same settings as the Qwen2.5-VL recipes (:mod:`vigos_megatron.recipes.common`), with the image
bounds in Qwen3-VL's unit: an LM image token is a 32 x 32 pixel square (patch 16, spatial merge
2), so qwen-vl-utils' 4..16,384 tokens are ``data.context.min_pixels`` 4,096 and ``max_pixels``
16,777,216. Architecture values and parameter counts: :mod:`vigos_megatron.models.hf_configs`
(cited there: the published ``config.json`` of ``Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct``).

Smallest GPU count and the layout at larger counts (``tp x pp x dp``, rollout batch), as the
estimate gives them at the model card's lengths (32,768-token prompts holding a 16,384-token
image, 4,096-token completions; :data:`MODELS`, a test recomputes them):

=============  ====  ==============================================================================
recipe         min   layouts
=============  ====  ==============================================================================
qwen3_vl_2b    2     2: 2x1x1 (8); 4: 2x1x2 (8); 8: 2x1x4 (8); 16: 2x1x8 (4); 32: 2x1x16 (2); 64: 2x1x32 (1)
qwen3_vl_4b    4     4: 4x1x1 (8); 8: 4x1x2 (8); 16: 4x1x4 (8); 32: 4x1x8 (4); 64: 4x1x16 (2); 128: 4x1x32 (1)
qwen3_vl_8b    8     8: 4x1x2 (4); 16: 4x1x4 (4); 32: 4x1x8 (4); 64: 4x1x16 (2); 128: 4x1x32 (1)
qwen3_vl_32b   32    32: 8x2x2 (4); 64: 8x2x4 (8); 128: 8x1x16 (1); 256: 8x1x32 (1)
=============  ====  ==============================================================================

What sets them: as for Qwen2.5-VL, the rollout prefill of a 32,768-token prompt through one layer
with the engine's unfused local attention (``4 a/tp S^2`` bytes) for 2B-8B; TP stops at the 8
key-value heads (and the ViT's 16 heads). 32B needs PP: 64 layers of 5120-wide inputs kept by full
recomputation; every layout keeps at least the 3 deepstack layers on the first stage (pp <= 21).
Qwen3-VL's ViT is TP-sharded, so at TP 4-8 it costs a quarter to an eighth of Qwen2.5-VL's
replicated tower per rank.
"""

from __future__ import annotations

from vigos_megatron.recipes.common import RecipeModel, recipe_function

#: recipe name -> model and stated layouts (GPU count -> (tp, pp, dp, rollout batch))
MODELS = {rm.name: rm for rm in (
    RecipeModel("qwen3_vl_2b", "qwen3_vl_2b", "Qwen/Qwen3-VL-2B-Instruct",
                {2: (2, 1, 1, 8), 4: (2, 1, 2, 8), 8: (2, 1, 4, 8), 16: (2, 1, 8, 4), 32: (2, 1, 16, 2),
                 64: (2, 1, 32, 1)}),
    RecipeModel("qwen3_vl_4b", "qwen3_vl_4b", "Qwen/Qwen3-VL-4B-Instruct",
                {4: (4, 1, 1, 8), 8: (4, 1, 2, 8), 16: (4, 1, 4, 8), 32: (4, 1, 8, 4), 64: (4, 1, 16, 2),
                 128: (4, 1, 32, 1)}),
    RecipeModel("qwen3_vl_8b", "qwen3_vl_8b", "Qwen/Qwen3-VL-8B-Instruct",
                {8: (4, 1, 2, 4), 16: (4, 1, 4, 4), 32: (4, 1, 8, 4), 64: (4, 1, 16, 2), 128: (4, 1, 32, 1)}),
    RecipeModel("qwen3_vl_32b", "qwen3_vl_32b", "Qwen/Qwen3-VL-32B-Instruct",
                {32: (8, 2, 2, 4), 64: (8, 2, 4, 8), 128: (8, 1, 16, 1), 256: (8, 1, 32, 1)}),
)}

qwen3_vl_2b = recipe_function(MODELS["qwen3_vl_2b"])
qwen3_vl_4b = recipe_function(MODELS["qwen3_vl_4b"])
qwen3_vl_8b = recipe_function(MODELS["qwen3_vl_8b"])
qwen3_vl_32b = recipe_function(MODELS["qwen3_vl_32b"])
