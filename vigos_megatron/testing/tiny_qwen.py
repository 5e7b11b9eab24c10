"""A tiny random Hugging Face Qwen2.5-VL checkpoint, built entirely offline.

Used by tests, benchmarks and the demo. Nothing here touches the Hugging Face hub:

* :func:`write_tiny_tokenizer` trains a byte-level BPE tokenizer in-process (``tokenizers``)
  on a small built-in corpus, adds Qwen's special tokens and wraps it in ``Qwen2TokenizerFast``
  with Qwen2.5-VL's chat template (default system message "You are a helpful assistant.").
  The trained tokenizer is cached per process, so repeated calls are cheap.
* :func:`write_tiny_processor` adds a ``Qwen2_5_VLProcessor`` (image processor: patch 14,
  spatial merge 2, temporal patch 2, at most 16x16 merged patches per image).
* :func:`tiny_hf_config` returns the tiny ``Qwen2_5_VLConfig`` (text hidden 64, 2 layers,
  4 heads / 2 kv heads, mrope_section [4, 2, 2], vocab 384; vision depth 2, hidden 32,
  out 64, patch 14, merge 2) whose special-token ids match the tokenizer.
* :func:`write_tiny_checkpoint` writes random weights + config + tokenizer + processor;
  with ``perturb=True`` every norm weight and every bias is randomised, so a conversion
  that drops or misplaces one of them changes the logits.

The vocabulary (384) is a multiple of 128, so it divides by any tensor-parallel size used in
tests without padding.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

#: Qwen2.5's special tokens, in Qwen's id order (they follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

TINY_VOCAB_SIZE = 384

#: Qwen2.5-VL's chat template (as shipped with Qwen/Qwen2.5-VL-*-Instruct).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen2's pre-tokenisation regex.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_CORPUS = [
    "You are a helpful assistant.",
    "system user assistant",
    "<description>The image shows a red square next to a blue circle.</description>",
    "<think>First count the objects, then compare their sizes.</think>",
    "The answer is \\boxed{42}. So the final answer is \\boxed{7}.",
    "What is shown in the picture? Describe the image and answer the question.",
    "There are three apples and two oranges on the table; the total is five.",
    "Let x be the length of the side. Then the area is x * x = 16, so x = 4.",
    "the of and to in is that it for on with as was at by an be this from",
    "Question: How many triangles are in the figure? Answer: 3",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
]


@functools.lru_cache(maxsize=2)
def _trained_tokenizer_json(n_special: int = len(QWEN_SPECIAL_TOKENS)) -> str:
    """Train the byte-level BPE once per process (``TINY_VOCAB_SIZE - n_special`` tokens, so that
    ``n_special`` special tokens complete the vocabulary); return its serialised ``tokenizer.json``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_bpe = TINY_VOCAB_SIZE - n_special
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def build_tokenizer(specials=QWEN_SPECIAL_TOKENS, chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE, added=()):
    """The tiny tokenizer: the BPE, then ``specials`` (special tokens) and ``added`` (added, not special)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json(len(specials) + len(added)))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if added:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.chat_template = chat_template
    if len(tokenizer) > TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens > vocab {TINY_VOCAB_SIZE}")
    return tokenizer


def special_token_ids(specials=QWEN_SPECIAL_TOKENS) -> dict[str, int]:
    """Ids of the special (then added) tokens ``specials`` in the tiny tokenizer (they follow the BPE vocabulary)."""
    from tokenizers import Tokenizer

    n_bpe = Tokenizer.from_str(_trained_tokenizer_json(len(specials))).get_vocab_size()
    return {t: n_bpe + i for i, t in enumerate(specials)}


def write_tiny_tokenizer(out_dir) -> Path:
    """Save the tiny tokenizer (tokenizer.json, tokenizer_config.json, chat template) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    ids = special_token_ids()
    for tok, i in ids.items():
        if tokenizer.convert_tokens_to_ids(tok) != i:
            raise RuntimeError(f"tiny tokenizer: {tok} has id {tokenizer.convert_tokens_to_ids(tok)}, expected {i}")
    return out


def tiny_image_processor():
    """Qwen2-VL image processor: patch 14, merge 2, temporal patch 2; 4..256 merged patches."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 256
    )


def tiny_video_processor():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 256
    )


def write_tiny_processor(out_dir) -> Path:
    """Save tokenizer + ``Qwen2_5_VLProcessor`` (image and video processor files) into ``out_dir``."""
    from transformers import Qwen2_5_VLProcessor

    out = Path(out_dir)
    write_tiny_tokenizer(out)
    processor = Qwen2_5_VLProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=build_tokenizer(),
        video_processor=tiny_video_processor(),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


#: a teacher of another width, depth and head count than the tiny student (same vocabulary,
#: tokenizer and vision patching): ``write_tiny_checkpoint(..., text_size=TEACHER_TEXT_SIZE)``
TEACHER_TEXT_SIZE = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2)

def tiny_hf_config(tie_word_embeddings: bool = False, *, text_size: dict | None = None, **overrides):
    """The tiny ``Qwen2_5_VLConfig``; ``overrides`` are top-level config keyword arguments.

    ``text_size`` overrides text-config sizes (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads): a model of another size with the same vocabulary,
    tokenizer and image processing (the vision tower projects to the text width).
    """
    from transformers import Qwen2_5_VLConfig

    ids = special_token_ids()
    text = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
    )
    text.update(text_size or {})
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    kwargs = dict(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(**kwargs)


def _perturb_(model, generator) -> None:
    """Randomise every norm weight and every bias (so a missed mapping changes the output)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.split(".")[-2]
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif "norm" in owner or owner.startswith("ln_"):
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.1)


def write_random_checkpoint(out_dir, config, model_class, write_processor, *, generator: str, perturb: bool,
                            seed: int) -> Path:
    """``model_class(config)`` with seeded random fp32 weights (norms and biases perturbed with
    ``perturb``) saved as safetensors with its config, ``write_processor(out)``'s tokenizer and
    processor files, and ``tiny_qwen.json`` naming the ``generator`` module and the settings."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    if perturb:
        _perturb_(model, torch.Generator().manual_seed(seed + 1))
    model.config.dtype = "float32"
    model.save_pretrained(out, safe_serialization=True)
    write_processor(out)
    meta = {"generator": generator, "seed": seed, "perturb": perturb,
            "tie_word_embeddings": bool(config.tie_word_embeddings)}
    (out / "tiny_qwen.json").write_text(json.dumps(meta, indent=2))
    return out


def write_tiny_checkpoint(out_dir, *, tie_word_embeddings: bool = False, perturb: bool = True, seed: int = 0,
                          text_size: dict | None = None) -> Path:
    """Write a tiny random HF Qwen2.5-VL checkpoint (safetensors fp32 + config + tokenizer + processor)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_hf_config(tie_word_embeddings=tie_word_embeddings, text_size=text_size)
    return write_random_checkpoint(out_dir, config,
                                   Qwen2_5_VLForConditionalGeneration, write_tiny_processor,
                                   generator="vigos_megatron.testing.tiny_qwen", perturb=perturb, seed=seed)


def image_text_batch(hf_dir, n: int = 2, *, seed: int = 0) -> dict:
    """A processor batch of ``n`` image+text prompts of equal length (no padding) for checkpoint ``hf_dir``.

    Returns ``input_ids [n, S]``, ``pixel_values [patches, D]`` and ``image_grid_thw [n, 3]`` on the CPU.
    """
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(56, 84, 3) * 255).astype("uint8")) for _ in range(n)]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"<think>count {i}</think>"}]}
            for i in range(n)]
    texts = [proc.apply_chat_template([m], tokenize=False, add_generation_prompt=True) for m in msgs]
    inp = proc(text=texts, images=images, return_tensors="pt")
    if not bool(inp["attention_mask"].all()):
        raise RuntimeError("image_text_batch: prompts of unequal length")
    return {k: inp[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
