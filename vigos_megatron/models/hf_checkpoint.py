"""Reading, checking and writing Hugging Face Qwen VL checkpoint directories (every supported family).

A HF directory holds ``config.json``, ``model.safetensors`` or
``model.safetensors.index.json`` + shards, and optionally tokenizer / processor files.
:func:`check_hf_weights` compares the tensor names and shapes stored in the safetensors
headers (no tensor is read) with those the family's HF model (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``) of the
directory's config declares (built on the meta device), and refuses a missing tensor, a
shape mismatch or an unexpected tensor with a message naming the file and the tensor.

Both HF key layouts are accepted: transformers >= 4.52 (``model.language_model.*``,
``model.visual.*``, "current") and the hub's original one (``model.layers.*``, ``visual.*``,
"hub", which is also what transformers 5.x ``save_pretrained`` writes). The converters
remember the source's layout (``hf/key_layout.json`` in each Megatron checkpoint) and export
in it, so HF -> Megatron -> HF reproduces every tensor under its original name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vigos_megatron.errors import UserError

#: files that rebuild the tokenizer / processor next to the weights (copied when present)
TOKENIZER_PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)

#: old (hub) HF key prefix -> transformers >= 4.52 prefix, one line per family
_LEGACY_PREFIXES = (
    ("visual.", "model.visual."),
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
)


HUB_LAYOUT, CURRENT_LAYOUT = "hub", "current"
KEY_LAYOUT_FILE = "key_layout.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint directory cannot be converted; the message names the file and tensor."""

    hint = "point the option at a complete checkpoint (tools/convert_hf_to_megatron.py writes one from a Hugging Face model)"


def canonical_hf_name(name: str) -> str:
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def hf_name_in_layout(name: str, layout: str) -> str:
    """``name`` (either layout) written in ``layout`` ("hub" or "current")."""
    name = canonical_hf_name(name)
    if layout == CURRENT_LAYOUT:
        return name
    if layout != HUB_LAYOUT:
        raise ValueError(f"unknown HF key layout {layout!r}")
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def stored_key_layout(hf_dir) -> str:
    """The key layout of the safetensors in ``hf_dir``."""
    from safetensors import safe_open

    for f in safetensors_files(hf_dir):
        with safe_open(str(f), framework="pt") as sf:
            if any(k.startswith(tuple(new for _, new in _LEGACY_PREFIXES)) for k in sf.keys()):
                return CURRENT_LAYOUT
    return HUB_LAYOUT


def record_key_layout(src_dir, dst_dir) -> str:
    """Write ``dst_dir/key_layout.json``: the layout of ``src_dir``'s weights, or the one it recorded."""
    src, dst = Path(src_dir), Path(dst_dir)
    if (src / KEY_LAYOUT_FILE).is_file():
        layout = read_key_layout(src)
    else:
        try:
            layout = stored_key_layout(src)
        except CheckpointError:  # no weights next to the config: the hub layout
            layout = HUB_LAYOUT
    (dst / KEY_LAYOUT_FILE).write_text(json.dumps({"hf_key_layout": layout}) + "\n")
    return layout


def read_key_layout(hf_dir) -> str:
    """The layout recorded in ``hf_dir/key_layout.json`` (the hub layout when absent)."""
    f = Path(hf_dir) / KEY_LAYOUT_FILE
    if not f.is_file():
        return HUB_LAYOUT
    layout = json.loads(f.read_text()).get("hf_key_layout")
    if layout not in (HUB_LAYOUT, CURRENT_LAYOUT):
        raise CheckpointError(f"{f}: unknown hf_key_layout {layout!r}")
    return layout


def safetensors_files(hf_dir) -> list[Path]:
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({d / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(str(m) for m in missing)}")
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json (HF weights missing)")


def stored_shapes(hf_dir) -> dict[str, tuple[tuple[int, ...], Path]]:
    """``canonical name -> (shape, file)`` from the safetensors headers (no tensor data read)."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in safetensors_files(hf_dir):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[canonical_hf_name(k)] = (tuple(sf.get_slice(k).get_shape()), f)
    return out


def expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every parameter of the HF model of ``hf_config`` (built on meta)."""
    import torch

    from vigos_megatron.models.family import family_for_config

    with torch.device("meta"):
        model = family_for_config(hf_config).hf_model_class()(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_hf_weights(hf_dir, hf_config) -> None:
    """Refuse missing tensors, shape mismatches and unexpected tensors, naming them."""
    stored = stored_shapes(hf_dir)
    expected = expected_shapes(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in stored:
            if tied and name == "lm_head.weight":
                continue
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif stored[name][0] != shape:
            problems.append(
                f"shape mismatch for {name} in {stored[name][1].name}: stored {list(stored[name][0])}, "
                f"config.json implies {list(shape)}"
            )
    for name in stored:
        if name not in expected:
            problems.append(f"unexpected tensor {name} in {stored[name][1].name}")
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{hf_dir}: not a consistent Qwen2.5-VL checkpoint:\n  {head}{more}")


def copy_tokenizer_processor_files(src, dst) -> list[str]:
    """Copy tokenizer / processor / generation files present in ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_PROCESSOR_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, dst / name)
            copied.append(name)
    return copied


def save_safetensors_sharded(
    tensors, out_dir, *, max_shard_bytes: int = 5 * 1024**3, total: int | None = None, progress: bool = True
) -> list[Path]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or shards + index (HF layout).

    Tensors are written shard by shard as they arrive, so only one shard is held in memory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []  # tensor names per written shard
    current: dict = {}
    current_bytes = 0
    total_bytes = 0
    bar = _progress(total, "writing HF tensors") if progress else None

    def flush():
        nonlocal current, current_bytes
        if current:
            shards.append(list(current))
            tmp = out / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(tmp), metadata={"format": "pt"})
            current, current_bytes = {}, 0

    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current[name] = t
        current_bytes += nbytes
        total_bytes += nbytes
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    n = len(shards)
    paths = []
    if n == 1:
        p = out / "model.safetensors"
        (out / ".shard-00001.safetensors").rename(p)
        paths.append(p)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            (out / f".shard-{i:05d}.safetensors").rename(out / fname)
            paths.append(out / fname)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="tensor")
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return None
