"""The embedded default run: a tiny random Qwen2.5-VL and a few synthetic samples under ``run_dir``.

``conf/tiny_cpu.yaml`` sets ``tiny.enabled=true``. At the first launch rank 0 writes, under
``<run_dir>/tiny/``:

* ``hf/``      a tiny random Qwen2.5-VL checkpoint (``write_tiny_checkpoint``, fixed seed) with a
               locally trained tokenizer and processor: the weights do not depend on the layout;
* ``parquet/`` ``tiny.samples`` synthetic Vision-SR1-47K rows (real schema, small images);
* ``shards/``  their WebDataset shards (``tools/make_webdataset.py``'s converter).

Later launches reuse them. The run's model / processor / shard paths are pointed there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

TINY_SUBDIR = "tiny"
#: images of the synthetic samples: a few merged patches each, so a CPU step stays short
TINY_IMAGE_SIZE = (56, 56)


def tiny_paths(run_dir) -> dict[str, Path]:
    base = Path(run_dir) / TINY_SUBDIR
    return {"hf": base / "hf", "parquet": base / "parquet", "shards": base / "shards"}


def write_tiny_assets(run_dir, *, samples: int, seed: int) -> dict[str, Path]:
    """Write the tiny checkpoint and shards under ``run_dir`` when absent (call on ONE rank)."""
    from vigos_megatron.data.synthetic import image_bytes, typical_rows, write_parquet
    from vigos_megatron.data.webdataset_writer import convert
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    paths = tiny_paths(run_dir)
    if not (paths["hf"] / "config.json").is_file():
        write_tiny_checkpoint(paths["hf"], seed=seed)
    if not (paths["shards"] / "manifest.json").is_file():
        rows = typical_rows(samples, width=TINY_IMAGE_SIZE[0], height=TINY_IMAGE_SIZE[1], prefix="tiny", seed=seed)
        for i, r in enumerate(rows):
            r["images"] = {"bytes": image_bytes(*TINY_IMAGE_SIZE, seed=seed + 1000 + i), "path": f"tiny{i}.jpg"}
        parquet = write_parquet(paths["parquet"] / "tiny.parquet", rows)
        convert([str(parquet)], str(paths["shards"]), samples_per_shard=max(1, samples // 4), progress=None)
    return paths


def with_tiny_paths(cfg):
    """``cfg`` (a :class:`~vigos_megatron.config.train.PretrainConfig`) pointed at the tiny assets."""
    paths = tiny_paths(cfg.run_dir)
    model = dataclasses.replace(cfg.model, hf_path=str(paths["hf"]))
    loader = dataclasses.replace(cfg.data.loader, shards_dir=str(paths["shards"]))
    context = dataclasses.replace(cfg.data.context, processor_path=str(paths["hf"]))
    data = dataclasses.replace(cfg.data, loader=loader, context=context)
    return dataclasses.replace(cfg, model=model, data=data)
