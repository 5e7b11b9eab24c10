#!/usr/bin/env python
"""Loader throughput on CPU: shards -> decode -> qwen-vl-utils resize -> patchify -> tokenise all contexts.

    .venv/bin/python benchmarks/bench_data.py [--samples 64] [--cap-samples 8] [--max-pixels N]

Builds synthetic Vision-SR1-47K parquet (640x480 JPEGs, and JPEGs at the configured pixel cap),
converts it to shards, and times :class:`StreamingLoader` + :class:`ContextEncoder` (all seven
contexts, offline tiny Qwen2.5-VL processor) with 1 and 2 DataLoader workers, one rank, batch 1.
Prints a table: steady-state samples/s (after the first batch, so worker start-up is excluded)
and samples/s per worker. Goal (issue 4): >= 10 samples/s per worker on 640x480.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vigos_megatron.config.data import DataConfig  # noqa: E402
from vigos_megatron.config.loader import load_config  # noqa: E402
from vigos_megatron.data.contexts import ContextEncoder  # noqa: E402
from vigos_megatron.data.loader import StreamingLoader  # noqa: E402
from vigos_megatron.data.synthetic import image_bytes, write_parquet  # noqa: E402
from vigos_megatron.data.webdataset_writer import convert  # noqa: E402


def _rows(n, w, h, prefix):
    return [{"problem": f"Problem {i}: how many objects are visible in the figure, and which option is right? "
             "A) 1 B) 2 C) 3 D) 4", "images": {"bytes": image_bytes(w, h, seed=i % 8), "path": None},
             "answer": "B", "problem_id": f"{prefix}{i}", "data_source": "bench"} for i in range(n)]


def _time(shards, enc, workers, n):
    ld = StreamingLoader(shards, rank=0, world_size=1, batch_size=1, seed=0, num_workers=workers, shuffle_buffer=16,
                         encode=enc, num_steps=n)
    t0 = time.perf_counter()
    it = iter(ld)
    next(it)
    t1 = time.perf_counter()
    k = 0
    tokens = 0
    for b in it:
        k += len(b["samples"])
        tokens += sum(int(v.numel()) for s in b["samples"] for v in s["contexts"].values())
        assert not b["dropped"], b["dropped"]
    t2 = time.perf_counter()
    return k / (t2 - t1), t1 - t0, tokens / max(k, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "conf" / "data" / "vision_sr1_47k.yaml"))
    ap.add_argument("--samples", type=int, default=64, help="640x480 samples per run")
    ap.add_argument("--cap-samples", type=int, default=8, help="samples per run at the pixel cap")
    ap.add_argument("--max-pixels", type=int, default=None, help="override context.max_pixels of the config")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args(argv)
    from vigos_megatron.testing.tiny_qwen import write_tiny_processor

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    proc = write_tiny_processor(tmp / "proc")
    overrides = [f"loader.shards_dir={tmp}", f"context.processor_path={proc}", f"context.prompts_path={ROOT / 'conf/prompts/vigos.yaml'}"]
    if args.max_pixels:
        overrides.append(f"context.max_pixels={args.max_pixels}")
    cfg = load_config(DataConfig, args.config, overrides)
    cap = cfg.context.max_pixels
    cap_w = int(math.sqrt(cap * 4 / 3)) // 28 * 28
    cap_h = cap // cap_w // 28 * 28
    enc = ContextEncoder.from_config(cfg.context)
    cases = [("640x480", 640, 480, args.samples), (f"{cap_w}x{cap_h} (cap {cap} px)", cap_w, cap_h, args.cap_samples)]
    print(f"# {len(cfg.context.contexts)} contexts per sample: {', '.join(cfg.context.contexts)}; "
          f"min/max pixels {cfg.context.min_pixels}/{cap}; cpus {os.cpu_count()}", flush=True)
    print(f"| images | workers | samples | samples/s | samples/s/worker | first batch (s) | image tokens | context tokens/sample |")
    print(f"|---|---|---|---|---|---|---|---|")
    for label, w, h, n in cases:
        d = tmp / label.split()[0]
        write_parquet(d / "in.parquet", _rows(n + 1, w, h, label[:3]))
        convert([d / "in.parquet"], d / "shards", samples_per_shard=16, progress=None)
        sample = enc("k", {"problem": "x", "answer": "B"}, image_bytes(w, h))
        for workers in [int(x) for x in args.workers.split(",")]:
            rate, first, toks = _time(d / "shards", enc, workers, n + 1)
            print(f"| {label} | {workers} | {n} | {rate:.1f} | {rate / max(workers, 1):.1f} | {first:.2f} | "
                  f"{sample['num_image_tokens']} | {toks:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
