"""HF <-> Megatron conversion of Qwen2.5-VL and Qwen3-VL checkpoints (the family read from config.json) (one process, CPU is enough).

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

from vigos_megatron.models.hf_checkpoint import (
    CURRENT_LAYOUT,
    HUB_LAYOUT,
    CheckpointError,
    canonical_hf_name,
    check_hf_weights,
    copy_tokenizer_processor_files,
    hf_name_in_layout,
    read_key_layout,
    safetensors_files,
    save_safetensors_sharded,
    stored_key_layout,
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


def _renamed_source(hf_dir, stored_layout: str, mapping_layout: str):
    """megatron-bridge state source presenting a checkpoint stored in ``stored_layout`` under the
    names of ``mapping_layout``.

    megatron-bridge 0.6.2's mappings name HF tensors in one layout per family (Qwen2.5-VL: the
    hub's ``model.layers.*``, ``visual.*``; Qwen3-VL: ``model.language_model.*``,
    ``model.visual.*``) and silently skip (log only) any mapping whose HF tensor is absent, so a
    checkpoint in the other layout would load nothing. Same pattern as the bridge's own WAN/Flux
    state sources: subclass its safetensors source, rename keys.
    """
    from megatron.bridge.models.hf_pretrained.state import SafeTensorsStateSource

    class RenamedSource(SafeTensorsStateSource):
        def get_all_keys(self):
            return sorted(hf_name_in_layout(k, mapping_layout) for k in super().get_all_keys())

        def load_tensors(self, keys_to_load):
            stored = {k: hf_name_in_layout(k, stored_layout) for k in keys_to_load}
            loaded = super().load_tensors(list(stored.values()))
            return {k: loaded[v] for k, v in stored.items() if v in loaded}

    return RenamedSource(str(hf_dir))


def load_hf_into(builder, chunks, hf_dir) -> None:
    """Load HF weights (either key layout) into ``chunks`` with the bridge's declarative mappings."""
    from vigos_megatron.models.family import family_for_config

    stored, wanted = stored_key_layout(hf_dir), family_for_config(builder.hf_config).bridge_key_layout
    if stored == wanted:
        builder.bridge.load_hf_weights(chunks, str(hf_dir))
        return
    from megatron.bridge.models.hf_pretrained.state import StateDict

    pretrained = builder.bridge._pretrained_wrapper_cls.from_pretrained(str(hf_dir))
    pretrained._state_dict_accessor = StateDict(_renamed_source(hf_dir, stored, wanted))
    builder.bridge._model_bridge.load_weights_hf_to_megatron(pretrained, chunks)


def verify_against_hf(builder, chunks, hf_dir, *, show_progress: bool = False) -> int:
    """Export ``chunks`` and compare every tensor bit-exactly with ``hf_dir``'s; return the count.

    Catches any mapping the bridge skipped or transformed inexactly (it only logs a skip).
    Reads one source tensor at a time.
    """
    from safetensors import safe_open

    stored = {}
    for f in safetensors_files(hf_dir):
        with safe_open(str(f), framework="pt") as sf:
            stored.update({canonical_hf_name(k): (f, k) for k in sf.keys()})
    bad, seen = [], set()
    handles = {}
    try:
        for name, tensor in export_state(builder, chunks, key_layout=CURRENT_LAYOUT, show_progress=show_progress):
            seen.add(name)
            if name not in stored:
                bad.append(f"{name}: not in the source")
                continue
            f, key = stored[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt").__enter__()
            src = handles[f].get_tensor(key)
            if src.dtype != tensor.dtype or src.shape != tensor.shape or not torch.equal(src, tensor.to(src.device)):
                bad.append(f"{name}: differs from the source after import")
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    missing = sorted(set(stored) - seen)
    bad += [f"{n}: in the source but not imported" for n in missing]
    if bad:
        head = "\n  ".join(bad[:20])
        raise CheckpointError(f"{hf_dir}: import is not exact ({len(bad)} tensors):\n  {head}")
    return len(seen)


def hf_to_megatron(hf_model, output, *, quiet: bool = False) -> Path:
    """Convert a HF Qwen VL directory (a supported family) to a Megatron run directory; returns the checkpoint dir."""
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder, load_hf_config
    from vigos_megatron.models.family import family_for_config

    hf_dir, out = Path(hf_model), Path(output)
    t0 = time.time()
    hf_config = load_hf_config(hf_dir)  # refuses a directory of an unsupported family
    check_hf_weights(hf_dir, hf_config)  # refuses missing tensors / shape mismatches before any work
    _refuse_non_empty(out)
    _log(f"[hf->megatron] {hf_dir}: {family_for_config(hf_config).display_name}, dtype {config_dtype(hf_config)}", quiet)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(hf_config, dtype=config_dtype(hf_config))
        chunks = builder.build(init_weights=False)
        load_hf_into(builder, chunks, hf_dir)  # per-tensor progress bar
        n = verify_against_hf(builder, chunks, hf_dir)
        _log(f"[hf->megatron] verified: {n} tensors imported bit-exactly", quiet)
        _log(f"[hf->megatron] writing distributed checkpoint to {out}", quiet)
        ckpt = save_model_checkpoint(chunks, out, 0, hf_source_dir=hf_dir)
    _log(f"[hf->megatron] done in {time.time() - t0:.1f}s: {ckpt}", quiet)
    return ckpt


def export_state(builder, chunks, *, key_layout: str = HUB_LAYOUT, show_progress: bool = True):
    """``(HF name in key_layout, tensor)`` for every HF tensor; the tied ``lm_head`` is left out as HF does."""
    tied = bool(getattr(builder.hf_config, "tie_word_embeddings", False))
    seen = set()
    for name, tensor in builder.export_hf_weights(chunks, show_progress=show_progress):
        if tied and canonical_hf_name(name) == "lm_head.weight":
            continue
        name = hf_name_in_layout(name, key_layout)
        if name in seen:
            raise CheckpointError(f"export produced {name} twice")
        seen.add(name)
        yield name, tensor


def megatron_to_hf(checkpoint, output, *, quiet: bool = False, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Convert a Megatron run / checkpoint directory to a HF directory; returns ``output``."""
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder, load_hf_config
    from vigos_megatron.models.family import family_for_config

    t0 = time.time()
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(output)
    hf_src = ckpt / HF_SUBDIR
    hf_config = load_hf_config(hf_src)
    _refuse_non_empty(out)
    _log(f"[megatron->hf] {ckpt}: {family_for_config(hf_config).display_name}, dtype {config_dtype(hf_config)}", quiet)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(hf_config, dtype=config_dtype(hf_config))
        chunks = builder.build(init_weights=False)
        load_model_checkpoint(chunks, ckpt)  # refuses missing tensors / shape mismatches
        from vigos_megatron.models.hf_checkpoint import expected_shapes

        n_expected = len(expected_shapes(hf_config)) - int(bool(hf_config.tie_word_embeddings))
        paths = save_safetensors_sharded(
            export_state(builder, chunks, key_layout=read_key_layout(hf_src), show_progress=not quiet),
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


def load_hf_state(hf_dir, *, canonical: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory, under canonical names or as stored (tests / inspection)."""
    from safetensors.torch import load_file

    out = {}
    for f in safetensors_files(hf_dir):
        for k, v in load_file(str(f)).items():
            out[canonical_hf_name(k) if canonical else k] = v
    return out


__all__ = ["hf_to_megatron", "megatron_to_hf", "load_hf_state", "config_dtype", "export_state"]
