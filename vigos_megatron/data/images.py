"""Encoded image bytes -> Qwen2.5-VL vision inputs, sized as qwen-vl-utils does.

:func:`load_image` decodes and converts to RGB (alpha composited on white) and resizes with
``qwen_vl_utils.fetch_image`` (``smart_resize``: both sides multiples of
``patch_size * merge_size``, pixel count within ``[min_pixels, max_pixels]``, aspect kept).
:func:`vision_inputs` runs the processor's image processor on the already-sized image
(``do_resize=False``, so the processor's own pixel bounds do not resize it again).
"""

from __future__ import annotations

import io

import torch


def load_image(data: bytes, *, min_pixels: int, max_pixels: int, patch_size: int = 14):
    """Decoded RGB ``PIL.Image`` of ``data``, resized by qwen-vl-utils' ``fetch_image``."""
    from PIL import Image
    from qwen_vl_utils import fetch_image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return fetch_image({"image": img, "min_pixels": min_pixels, "max_pixels": max_pixels}, image_patch_size=patch_size)


def vision_inputs(image, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [num_patches, C*T*P*P] float32, image_grid_thw [1, 3] int64)`` of a sized image."""
    out = image_processor(images=[image], do_resize=False, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def num_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> int:
    """LLM tokens of one image: ``t * h * w / merge_size**2``."""
    return int(image_grid_thw.prod().item()) // (merge_size * merge_size)
