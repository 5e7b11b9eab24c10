"""Reference HF configs of Qwen2.5-VL 3B / 7B / 32B / 72B and Qwen3-VL 2B / 4B / 8B / 32B written in
code (no hub access).

For memory planning, recipes and tests. :func:`known_config_values` resolves a name
(``"qwen3_vl_8b"``, ``"qwen2_5_vl_7b"``, or a bare Qwen2.5-VL size ``"7b"``).

**Qwen2.5-VL.** The values are the architecture fields of the published ``config.json`` files of
``Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct``:

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

**Qwen3-VL (dense).** The architecture fields of ``Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct``'s
``config.json`` (https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json and the
same path for 2B, 4B, 32B), read through copies of those files found with the ``search`` tool
(no hub access here), e.g. https://huggingface.co/Steinate/Cortex/blame/main/config.json (8B),
https://huggingface.co/TechCarbasa/MyModels/commit/400bbbf998ac875feb9b2182d409b81aa3601ac8 (4B),
https://huggingface.co/quanliang/F1/blob/main/config.json (a 32B fine-tune, same shape); no page of
the 2B file was found: its values are as quoted in public code (and its parameter total below
confirms them, tied embeddings included):

=====  ======  ======  =====  ======  =====  ===  ====  =======  ==============================
size   vocab   hidden  inter  layers  heads  kv   tied  ViT      parameters (published)
=====  ======  ======  =====  ======  =====  ===  ====  =======  ==============================
2B     151936  2048    6144   28      16     8    yes   24/1024  2,127,532,032
4B     151936  2560    9728   36      32     8    yes   24/1024  4,437,815,808
8B     151936  4096    12288  36      32     8    no    27/1152  8,767,123,696
32B    151936  5120    25600  64      64     8    no    27/1152  33,357,390,064
=====  ======  ======  =====  ======  =====  ===  ====  =======  ==============================

Every size: head_dim 128 (not hidden/heads for 2B, 4B, 32B), QK-norm, rope theta 5,000,000,
interleaved mrope sections [24, 20, 20], 262,144 positions. Vision transformer (ViT depth/hidden
above): 16 heads, patch 16, temporal patch 2, spatial merge 2 (an LM image token is a 32 x 32
pixel square), 2304 learned position embeddings, tanh-GELU MLP; intermediate 4096 (depth 24) or
4304 (depth 27); deepstack layers [5, 11, 17] (2B, 4B) or [8, 16, 24] (8B, 32B); its merger and
its 3 deepstack mergers project to the LM hidden size. The parameter counts are the Hub's
safetensors totals (``safetensors.total`` of https://huggingface.co/api/models/Qwen/Qwen3-VL-8B-Instruct,
8,767,123,696, and of the 2B, 2,127,532,032, as quoted in public code found with ``search``; 4B and
32B from public records of loading the official checkpoints: 4,437,815,808 parameters, and 1,058
tensors of 33,357,390,064 elements); tests check them against HF's meta-device model.
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


def _sized_values(sizes: dict, family: str, size: str) -> dict:
    key = size.lower()
    if key not in sizes:
        raise ValueError(f"size: unknown {family} size {size!r}; known: {', '.join(sizes)}")
    return copy.deepcopy(sizes[key][0])


def _hf_config(class_name: str, values: dict, overrides: dict):
    import transformers

    return getattr(transformers, class_name)(**{**values, **overrides})


def qwen2_5_vl_values(size: str) -> dict:
    """A deep copy of the config values of ``size`` (``"3b"``, ``"7b"``, ``"32b"``, ``"72b"``)."""
    return _sized_values(QWEN2_5_VL_SIZES, "Qwen2.5-VL", size)


def qwen2_5_vl_config(size: str, **overrides):
    """A ``transformers.Qwen2_5_VLConfig`` of the published ``size``; ``overrides`` replace top-level fields."""
    return _hf_config("Qwen2_5_VLConfig", qwen2_5_vl_values(size), overrides)


def qwen2_5_vl_3b_config(**overrides):
    return qwen2_5_vl_config("3b", **overrides)


def qwen2_5_vl_7b_config(**overrides):
    return qwen2_5_vl_config("7b", **overrides)


def qwen2_5_vl_32b_config(**overrides):
    return qwen2_5_vl_config("32b", **overrides)


def qwen2_5_vl_72b_config(**overrides):
    return qwen2_5_vl_config("72b", **overrides)


# --------------------------------------------------------------------------- Qwen3-VL (dense)

_QWEN3_VL_SPECIAL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                                vision_end_token_id=151653)


def _qwen3_text(hidden_size, intermediate_size, layers, heads) -> dict:
    return dict(
        vocab_size=151936,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
        bos_token_id=151643,
        eos_token_id=151645,
    )


def _qwen3_vision(depth, hidden_size, intermediate_size, out_hidden_size, deepstack) -> dict:
    return dict(
        depth=depth,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=16,
        in_channels=3,
        out_hidden_size=out_hidden_size,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=2304,
        deepstack_visual_indexes=list(deepstack),
        hidden_act="gelu_pytorch_tanh",
    )


def _qwen3_config(text: dict, vision: dict, tie: bool) -> dict:
    return dict(text_config=text, vision_config=vision, **_QWEN3_VL_SPECIAL_TOKENS, tie_word_embeddings=tie,
                architectures=["Qwen3VLForConditionalGeneration"])


#: Qwen/Qwen3-VL-2B-Instruct (tied input/output embeddings)
QWEN3_VL_2B = _qwen3_config(_qwen3_text(2048, 6144, 28, 16),
                            _qwen3_vision(24, 1024, 4096, 2048, (5, 11, 17)), tie=True)
#: Qwen/Qwen3-VL-4B-Instruct (tied input/output embeddings)
QWEN3_VL_4B = _qwen3_config(_qwen3_text(2560, 9728, 36, 32),
                            _qwen3_vision(24, 1024, 4096, 2560, (5, 11, 17)), tie=True)
#: Qwen/Qwen3-VL-8B-Instruct
QWEN3_VL_8B = _qwen3_config(_qwen3_text(4096, 12288, 36, 32),
                            _qwen3_vision(27, 1152, 4304, 4096, (8, 16, 24)), tie=False)
#: Qwen/Qwen3-VL-32B-Instruct
QWEN3_VL_32B = _qwen3_config(_qwen3_text(5120, 25600, 64, 64),
                            _qwen3_vision(27, 1152, 4304, 5120, (8, 16, 24)), tie=False)

#: size name -> (config values, published parameter count, HF repository id)
QWEN3_VL_SIZES = {
    "2b": (QWEN3_VL_2B, 2_127_532_032, "Qwen/Qwen3-VL-2B-Instruct"),
    "4b": (QWEN3_VL_4B, 4_437_815_808, "Qwen/Qwen3-VL-4B-Instruct"),
    "8b": (QWEN3_VL_8B, 8_767_123_696, "Qwen/Qwen3-VL-8B-Instruct"),
    "32b": (QWEN3_VL_32B, 33_357_390_064, "Qwen/Qwen3-VL-32B-Instruct"),
}


def qwen3_vl_values(size: str) -> dict:
    """A deep copy of the config values of ``size`` (``"2b"``, ``"4b"``, ``"8b"``, ``"32b"``)."""
    return _sized_values(QWEN3_VL_SIZES, "Qwen3-VL", size)


def qwen3_vl_config(size: str, **overrides):
    """A ``transformers.Qwen3VLConfig`` of the published ``size``; ``overrides`` replace top-level fields."""
    return _hf_config("Qwen3VLConfig", qwen3_vl_values(size), overrides)


# --------------------------------------------------------------------------- lookup by name

#: family prefix of a qualified name -> (sizes, model_type)
_FAMILIES = {"qwen2_5_vl": (QWEN2_5_VL_SIZES, "qwen2_5_vl"), "qwen3_vl": (QWEN3_VL_SIZES, "qwen3_vl")}


def known_model_names() -> list[str]:
    """Every name :func:`known_config_values` resolves (bare sizes are Qwen2.5-VL's)."""
    return [f"{fam}_{size}" for fam, (sizes, _) in _FAMILIES.items() for size in sizes] + list(QWEN2_5_VL_SIZES)


def known_config_values(name: str) -> tuple[dict, int, str] | None:
    """``(config.json values with model_type, published parameter count, HF repository id)`` of a
    known model name (``"qwen3_vl_8b"``, ``"qwen2_5_vl_7b"``, ``"7b"``), or None."""
    key = name.lower()
    for fam, (sizes, model_type) in _FAMILIES.items():
        size = key[len(fam) + 1:] if key.startswith(fam + "_") else (key if fam == "qwen2_5_vl" else None)
        if size in sizes:
            values, params, repo = sizes[size]
            return dict(copy.deepcopy(values), model_type=model_type), params, repo
    return None
