"""Reference HF configs of Qwen2.5-VL 3B / 7B / 32B / 72B written in code (no hub access).

For memory planning, recipes and tests. The values are the architecture fields of the
published ``config.json`` files of ``Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct``:

=====  ======  ======  =====  =====  ===  ======  =======  ====  ============  ===============
size   vocab   hidden  inter  layers heads kv     tied     ViT   ViT inter     parameters
=====  ======  ======  =====  =====  ===  ======  =======  ====  ============  ===============
3B     151936  2048    11008  36     16   2       yes      1280  3420          3,754,622,976
7B     152064  3584    18944  28     28   4       no       1280  3420          8,292,166,656
32B    152064  5120    27648  64     40   8       no       1280  3456          33,452,718,336
72B    152064  8192    29568  80     64   8       no       1280  3456          73,410,777,344
=====  ======  ======  =====  =====  ===  ======  =======  ====  ============  ===============

Every vision tower has depth 32, hidden 1280, 16 heads, patch 14, spatial merge 2, window 112
and full attention in blocks 7, 15, 23, 31; its merger projects to the LM hidden size
(``out_hidden_size``). Head dim is 128 for every size. The parameter counts are the totals of
the published safetensors indexes (tests check them against HF's and megatron's meta-device
models).
"""

from __future__ import annotations

import copy

_SPECIAL_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    bos_token_id=151643,
    eos_token_id=151645,
)


def _text(vocab_size, hidden_size, intermediate_size, layers, heads, kv_heads, max_window_layers) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=max_window_layers,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def _vision(intermediate_size, out_hidden_size) -> dict:
    return dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=intermediate_size,
        num_heads=16,
        in_channels=3,
        out_hidden_size=out_hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        hidden_act="silu",
    )


def _config(text: dict, vision: dict, tie: bool) -> dict:
    return dict(
        text_config=text,
        vision_config=vision,
        **_SPECIAL_TOKENS,
        tie_word_embeddings=tie,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )


#: Qwen/Qwen2.5-VL-3B-Instruct (tied input/output embeddings)
QWEN2_5_VL_3B = _config(_text(151936, 2048, 11008, 36, 16, 2, 70), _vision(3420, 2048), tie=True)
#: Qwen/Qwen2.5-VL-7B-Instruct
QWEN2_5_VL_7B = _config(_text(152064, 3584, 18944, 28, 28, 4, 28), _vision(3420, 3584), tie=False)
#: Qwen/Qwen2.5-VL-32B-Instruct
QWEN2_5_VL_32B = _config(_text(152064, 5120, 27648, 64, 40, 8, 64), _vision(3456, 5120), tie=False)
#: Qwen/Qwen2.5-VL-72B-Instruct
QWEN2_5_VL_72B = _config(_text(152064, 8192, 29568, 80, 64, 8, 80), _vision(3456, 8192), tie=False)

#: parameter counts of the published checkpoints (their safetensors indexes)
QWEN2_5_VL_3B_PARAMS = 3_754_622_976
QWEN2_5_VL_7B_PARAMS = 8_292_166_656
QWEN2_5_VL_32B_PARAMS = 33_452_718_336
QWEN2_5_VL_72B_PARAMS = 73_410_777_344

#: size name -> (config values, published parameter count, HF repository id)
QWEN2_5_VL_SIZES = {
    "3b": (QWEN2_5_VL_3B, QWEN2_5_VL_3B_PARAMS, "Qwen/Qwen2.5-VL-3B-Instruct"),
    "7b": (QWEN2_5_VL_7B, QWEN2_5_VL_7B_PARAMS, "Qwen/Qwen2.5-VL-7B-Instruct"),
    "32b": (QWEN2_5_VL_32B, QWEN2_5_VL_32B_PARAMS, "Qwen/Qwen2.5-VL-32B-Instruct"),
    "72b": (QWEN2_5_VL_72B, QWEN2_5_VL_72B_PARAMS, "Qwen/Qwen2.5-VL-72B-Instruct"),
}


def qwen2_5_vl_values(size: str) -> dict:
    """A deep copy of the config values of ``size`` (``"3b"``, ``"7b"``, ``"32b"``, ``"72b"``)."""
    key = size.lower()
    if key not in QWEN2_5_VL_SIZES:
        raise ValueError(f"size: unknown Qwen2.5-VL size {size!r}; known: {', '.join(QWEN2_5_VL_SIZES)}")
    return copy.deepcopy(QWEN2_5_VL_SIZES[key][0])


def qwen2_5_vl_config(size: str, **overrides):
    """A ``transformers.Qwen2_5_VLConfig`` of the published ``size``; ``overrides`` replace top-level fields."""
    from transformers import Qwen2_5_VLConfig

    kwargs = qwen2_5_vl_values(size)
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(**kwargs)


def qwen2_5_vl_3b_config(**overrides):
    return qwen2_5_vl_config("3b", **overrides)


def qwen2_5_vl_7b_config(**overrides):
    return qwen2_5_vl_config("7b", **overrides)


def qwen2_5_vl_32b_config(**overrides):
    return qwen2_5_vl_config("32b", **overrides)


def qwen2_5_vl_72b_config(**overrides):
    return qwen2_5_vl_config("72b", **overrides)
