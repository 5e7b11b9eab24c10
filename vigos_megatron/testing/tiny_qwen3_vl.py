"""A tiny random Hugging Face Qwen3-VL checkpoint, built entirely offline.

* the tokenizer: the tiny byte-level BPE of :mod:`vigos_megatron.testing.tiny_qwen` with Qwen's
  special tokens and Qwen3's ``<think>`` / ``</think>`` (added tokens, one id each, as in the
  Qwen3 tokenizers), vocabulary 384, and Qwen3-VL's chat template for text and image content
  (no default system message, unlike Qwen2.5-VL's);
* the processor: ``Qwen3VLProcessor`` (patch 16, spatial merge 2: image sides in units of 32
  pixels; 4..256 merged patches per image);
* :func:`tiny_hf_config`: text hidden 64, 4 layers, 4 heads / 2 kv heads, head dim 16,
  interleaved mrope section [4, 2, 2]; vision depth 3, hidden 32, 2 heads, out 64, 64 learned
  position embeddings (8 x 8), deepstack after vision layers [0, 1] (added to the outputs of
  language layers 0 and 1: a PP=2 split keeps both on the first stage);
* :func:`write_tiny_checkpoint`: random weights (every norm weight and bias perturbed with
  ``perturb=True``, so a dropped or misplaced mapping changes the logits) + config + processor.
"""

from __future__ import annotations

from pathlib import Path

from vigos_megatron.testing.tiny_qwen import (
    QWEN_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    build_tokenizer,
    write_random_checkpoint,
)

#: Qwen3's reasoning markers: added tokens of their own (not split by the BPE)
QWEN3_ADDED_TOKENS = ("<think>", "</think>")

#: Qwen3-VL's chat template for text and image/video content (the Instruct models' template without
#: tools and reasoning-content handling; no default system message)
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer():
    return build_tokenizer(QWEN_SPECIAL_TOKENS, QWEN3_VL_CHAT_TEMPLATE, added=QWEN3_ADDED_TOKENS)


def token_ids() -> dict[str, int]:
    """Ids of the special and added tokens (they follow the BPE vocabulary, in order)."""
    tok = tokenizer()
    return {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + QWEN3_ADDED_TOKENS}


def tiny_image_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                                 max_pixels=32 * 32 * 256, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def write_tiny_processor(out_dir) -> Path:
    """Save the tokenizer and a ``Qwen3VLProcessor`` (image and video processor files) into ``out_dir``."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    tok.save_pretrained(out)
    processor = Qwen3VLProcessor(image_processor=tiny_image_processor(), tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
                                 chat_template=QWEN3_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out


#: a teacher of another width, depth and head count than the tiny student (same vocabulary,
#: tokenizer and vision patching): ``write_tiny_checkpoint(..., text_size=TEACHER_TEXT_SIZE)``
TEACHER_TEXT_SIZE = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=6,
                         num_key_value_heads=2)

def tiny_hf_config(tie_word_embeddings: bool = False, *, text_size: dict | None = None, **overrides):
    """The tiny ``Qwen3VLConfig``; ``overrides`` are top-level config keyword arguments.

    ``text_size`` overrides text-config sizes (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads): a model of another size with the same vocabulary,
    tokenizer and image processing (the vision tower projects to the text width).
    """
    from transformers import Qwen3VLConfig

    ids = token_ids()
    text = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        attention_bias=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    text.update(text_size or {})
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
        hidden_act="gelu_pytorch_tanh",
    )
    kwargs = dict(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3VLForConditionalGeneration"],
    )
    kwargs.update(overrides)
    return Qwen3VLConfig(**kwargs)


def write_tiny_checkpoint(out_dir, *, tie_word_embeddings: bool = False, perturb: bool = True, seed: int = 0,
                          text_size: dict | None = None) -> Path:
    """Write a tiny random HF Qwen3-VL checkpoint (safetensors fp32 + config + tokenizer + processor)."""
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_hf_config(tie_word_embeddings=tie_word_embeddings, text_size=text_size)
    return write_random_checkpoint(out_dir, config,
                                   Qwen3VLForConditionalGeneration, write_tiny_processor,
                                   generator="vigos_megatron.testing.tiny_qwen3_vl", perturb=perturb, seed=seed)


def image_text_batch(hf_dir, sizes=((64, 96), (96, 128)), *, seed: int = 0) -> dict:
    """A right-padded processor batch of image+text prompts, one image of each ``(height, width)`` in ``sizes``.

    Returns ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``[n, S]``, ``pixel_values``
    ``[patches, D]`` and ``image_grid_thw`` ``[n, 3]`` (what HF's model needs: Qwen3-VL refuses images
    without ``mm_token_type_ids``).
    """
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in sizes]
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"<think>count {i}</think> \\boxed{{"}]}]
            for i in range(len(sizes))]
    texts = [proc.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    inp = proc(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: inp[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
