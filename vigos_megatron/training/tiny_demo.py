"""The embedded default run: a tiny random Qwen2.5-VL and a few synthetic samples under ``run_dir``.

``conf/tiny_cpu.yaml`` sets ``tiny.enabled=true``. At the first launch rank 0 writes, under
``<run_dir>/tiny/``:

* ``hf/``      a tiny random Qwen2.5-VL checkpoint (``write_tiny_checkpoint``, fixed seed) with a
               locally trained tokenizer and processor, then (``tiny.format_prior_steps``) taught
               the completion format on the samples below, so that its rollouts parse and all
               three teachers are used: the weights do not depend on the layout;
* ``parquet/`` ``tiny.samples`` synthetic Vision-SR1-47K rows (real schema, small images);
* ``shards/``  their WebDataset shards (``tools/make_webdataset.py``'s converter).

Later launches reuse them. The run's model / processor / shard paths are pointed there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

TINY_SUBDIR = "tiny"
#: images of the synthetic samples: a few merged patches each, so a CPU step stays short
TINY_IMAGE_SIZE = (56, 56)


def tiny_paths(run_dir) -> dict[str, Path]:
    base = Path(run_dir) / TINY_SUBDIR
    return {"hf": base / "hf", "parquet": base / "parquet", "shards": base / "shards"}


def write_tiny_assets(run_dir, *, samples: int, seed: int, format_prior_steps: int = 0,
                      context=None) -> dict[str, Path]:
    """Write the tiny checkpoint and shards under ``run_dir`` when absent (call on ONE rank).

    With ``format_prior_steps > 0`` the checkpoint is taught the completion format on the
    synthetic samples (:func:`~vigos_megatron.testing.format_prior.prime_format`), encoded with
    ``context`` (a :class:`~vigos_megatron.config.data.ContextConfig`; its ``processor_path`` is
    replaced by the tiny checkpoint's). The checkpoint is written to a temporary directory and
    renamed when complete, so an interrupted first launch leaves no half-made checkpoint behind.
    """
    paths = tiny_paths(run_dir)
    with _no_progress_bars():
        _write(paths, samples=samples, seed=seed, format_prior_steps=format_prior_steps, context=context)
    return paths


def write_tiny_assets_for(cfg) -> dict[str, Path]:
    """:func:`write_tiny_assets` with a run's settings (``cfg.tiny``, ``cfg.data.context``); call on ONE rank."""
    return write_tiny_assets(cfg.run_dir, samples=cfg.tiny.samples, seed=cfg.tiny.seed,
                             format_prior_steps=cfg.tiny.format_prior_steps, context=cfg.data.context)


def prepare_tiny_run(cfg):
    """Rank 0 writes the assets when absent, the others wait; returns ``cfg`` pointed at them
    (call once the process group is up)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        write_tiny_assets_for(cfg)
    dist.barrier()
    return with_tiny_paths(cfg)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' per-file progress bars (loading / writing the tiny checkpoint) are not for the console."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _write(paths: dict, *, samples: int, seed: int, format_prior_steps: int, context) -> None:
    import shutil

    from vigos_megatron.data.synthetic import image_bytes, typical_rows, write_parquet
    from vigos_megatron.data.webdataset_writer import convert
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    if not (paths["shards"] / "manifest.json").is_file():
        rows = typical_rows(samples, width=TINY_IMAGE_SIZE[0], height=TINY_IMAGE_SIZE[1], prefix="tiny", seed=seed)
        for i, r in enumerate(rows):
            r["images"] = {"bytes": image_bytes(*TINY_IMAGE_SIZE, seed=seed + 1000 + i), "path": f"tiny{i}.jpg"}
        parquet = write_parquet(paths["parquet"] / "tiny.parquet", rows)
        convert([str(parquet)], str(paths["shards"]), samples_per_shard=max(1, samples // 4), progress=None)
    if not (paths["hf"] / "config.json").is_file():
        tmp = paths["hf"].with_name(paths["hf"].name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_checkpoint(tmp, seed=seed)
        if format_prior_steps > 0:
            if context is None:
                raise ValueError("write_tiny_assets: format_prior_steps needs the data.context config")
            _prime(tmp, paths["shards"], context, steps=format_prior_steps, seed=seed)
        shutil.rmtree(paths["hf"], ignore_errors=True)
        tmp.rename(paths["hf"])


def _prime(hf_dir: Path, shards: Path, context, *, steps: int, seed: int) -> None:
    """Teach the checkpoint at ``hf_dir`` the completion format on every sample of ``shards``."""
    import json

    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.loader import StreamingLoader
    from vigos_megatron.testing.format_prior import CONTEXTS, prime_format

    encode = ContextEncoder(hf_dir, context.prompts_path, min_pixels=context.min_pixels,
                            max_pixels=context.max_pixels, max_prompt_tokens=context.max_prompt_tokens,
                            contexts=CONTEXTS)
    n = json.loads((shards / "manifest.json").read_text())["counts"]["converted"]
    loader = StreamingLoader(shards, rank=0, world_size=1, batch_size=n, seed=seed, num_workers=0,
                             shuffle_shards=False, shuffle_buffer=1, prefetch_factor=None, encode=encode)
    samples = next(iter(loader))["samples"]
    report = prime_format(hf_dir, samples, steps=steps, seed=seed)
    (hf_dir / "format_prior.json").write_text(json.dumps({**report, "samples": len(samples)}, indent=2))


def with_tiny_paths(cfg):
    """``cfg`` (a :class:`~vigos_megatron.config.train.PretrainConfig`) pointed at the tiny assets."""
    paths = tiny_paths(cfg.run_dir)
    model = dataclasses.replace(cfg.model, hf_path=str(paths["hf"]))
    loader = dataclasses.replace(cfg.data.loader, shards_dir=str(paths["shards"]))
    context = dataclasses.replace(cfg.data.context, processor_path=str(paths["hf"]))
    data = dataclasses.replace(cfg.data, loader=loader, context=context)
    return dataclasses.replace(cfg, model=model, data=data)
