"""Reference HF configs written in code (no hub access), for memory planning and tests."""

from __future__ import annotations

#: Qwen/Qwen2.5-VL-7B-Instruct config.json values (architecture fields)
QWEN2_5_VL_7B = dict(
    text_config=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=28,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_channels=3,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        hidden_act="silu",
    ),
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    bos_token_id=151643,
    eos_token_id=151645,
    tie_word_embeddings=False,
    architectures=["Qwen2_5_VLForConditionalGeneration"],
)

#: parameter count of Qwen2.5-VL-7B-Instruct (its safetensors index: 8,292,166,656 parameters)
QWEN2_5_VL_7B_PARAMS = 8_292_166_656


def qwen2_5_vl_7b_config(**overrides):
    from transformers import Qwen2_5_VLConfig

    kwargs = dict(QWEN2_5_VL_7B)
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(**kwargs)
