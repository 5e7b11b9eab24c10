"""HF <-> Megatron conversion of Qwen2.5-VL checkpoints (one process, CPU is enough).

The weight mappings are megatron-bridge's ``Qwen25VLBridge.mapping_registry()`` (one
declarative entry per parameter family: QKV fusion, gated-MLP fusion, norms, embeddings,
the replicated vision tower); this module only moves files around them:

* :func:`hf_to_megatron`: HF directory -> run directory ``OUT/iter_0000000`` (+ tracker),
  see :mod:`vigos_megatron.convert.megatron_checkpoint` for the layout;
* :func:`megatron_to_hf`: run directory or ``iter_*`` checkpoint (written at any TP/PP,
  optimizer state ignored) -> HF directory (safetensors, config, tokenizer/processor files).

Tensors keep the dtype of the HF config (``config.dtype``; float32 when absent), so a
round trip is bit-exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vigos_megatron.convert.hf_checkpoint import (
    CheckpointError,
    canonical_hf_name,
    check_hf_weights,
    copy_tokenizer_processor_files,
    save_safetensors_sharded,
)
from vigos_megatron.convert.megatron_checkpoint import (
    HF_SUBDIR,
    load_model_checkpoint,
    resolve_checkpoint,
    save_model_checkpoint,
)


def config_dtype(hf_config) -> torch.dtype:
    d = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if d is None:
        return torch.float32
    if isinstance(d, str):
        if not hasattr(torch, d):
            raise CheckpointError(f"config.json: unknown dtype {d!r}")
        return getattr(torch, d)
    return d


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output directory {out} is not empty; choose a new directory")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def hf_to_megatron(hf_model, output, *, quiet: bool = False) -> Path:
    """Convert a HF Qwen2.5-VL directory to a Megatron run directory; returns the checkpoint dir."""
    from vigos_megatron.models.parallel import local_model_parallel
    from vigos_megatron.models.qwen2_5_vl import QwenVLBuilder, load_hf_config

    hf_dir, out = Path(hf_model), Path(output)
    t0 = time.time()
    hf_config = load_hf_config(hf_dir)  # refuses a non-Qwen2.5-VL directory
    check_hf_weights(hf_dir, hf_config)  # refuses missing tensors / shape mismatches before any work
    _refuse_non_empty(out)
    _log(f"[hf->megatron] {hf_dir}: Qwen2.5-VL, dtype {config_dtype(hf_config)}", quiet)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(hf_config, dtype=config_dtype(hf_config))
        chunks = builder.build(init_weights=False)
        builder.bridge.load_hf_weights(chunks, str(hf_dir))  # per-tensor progress bar
        _log(f"[hf->megatron] writing distributed checkpoint to {out}", quiet)
        ckpt = save_model_checkpoint(chunks, out, 0, hf_source_dir=hf_dir)
    _log(f"[hf->megatron] done in {time.time() - t0:.1f}s: {ckpt}", quiet)
    return ckpt


def export_state(builder, chunks, *, show_progress: bool = True):
    """``(canonical HF name, tensor)`` for every HF tensor; the tied ``lm_head`` is left out as HF does."""
    tied = bool(getattr(builder.hf_config, "tie_word_embeddings", False))
    seen = set()
    for name, tensor in builder.export_hf_weights(chunks, show_progress=show_progress):
        name = canonical_hf_name(name)
        if tied and name == "lm_head.weight":
            continue
        if name in seen:
            raise CheckpointError(f"export produced {name} twice")
        seen.add(name)
        yield name, tensor


def megatron_to_hf(checkpoint, output, *, quiet: bool = False, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Convert a Megatron run / checkpoint directory to a HF directory; returns ``output``."""
    from vigos_megatron.models.parallel import local_model_parallel
    from vigos_megatron.models.qwen2_5_vl import QwenVLBuilder, load_hf_config

    t0 = time.time()
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(output)
    hf_src = ckpt / HF_SUBDIR
    hf_config = load_hf_config(hf_src)
    _refuse_non_empty(out)
    _log(f"[megatron->hf] {ckpt}: Qwen2.5-VL, dtype {config_dtype(hf_config)}", quiet)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(hf_config, dtype=config_dtype(hf_config))
        chunks = builder.build(init_weights=False)
        load_model_checkpoint(chunks, ckpt)  # refuses missing tensors / shape mismatches
        from vigos_megatron.convert.hf_checkpoint import expected_shapes

        n_expected = len(expected_shapes(hf_config)) - int(bool(hf_config.tie_word_embeddings))
        paths = save_safetensors_sharded(
            export_state(builder, chunks, show_progress=not quiet),
            out,
            max_shard_bytes=max_shard_bytes,
            total=n_expected,
            progress=not quiet,
        )
    (out / "config.json").write_text((hf_src / "config.json").read_text())
    copied = copy_tokenizer_processor_files(hf_src, out)
    check_hf_weights(out, hf_config)  # the written directory is complete and consistent
    _log(f"[megatron->hf] wrote {len(paths)} safetensors file(s) + config + {len(copied)} tokenizer/processor "
         f"file(s) to {out} in {time.time() - t0:.1f}s", quiet)
    return out


def load_hf_state(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory under canonical names (tests / inspection)."""
    from safetensors.torch import load_file

    from vigos_megatron.convert.hf_checkpoint import safetensors_files

    out = {}
    for f in safetensors_files(hf_dir):
        for k, v in load_file(str(f)).items():
            out[canonical_hf_name(k)] = v
    return out


__all__ = ["hf_to_megatron", "megatron_to_hf", "load_hf_state", "config_dtype", "export_state"]
