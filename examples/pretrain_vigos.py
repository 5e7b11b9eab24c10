#!/usr/bin/env python
"""ViGOS training of Qwen2.5-VL on Megatron-Core.

    torchrun --nproc_per_node N examples/pretrain_vigos.py --config conf/X.yaml [key=value ...]

The configuration (``vigos_megatron.config.train.PretrainConfig``) is loaded and validated
against the world size BEFORE any process group starts; a bad option fails here, naming it.
Running the same command again with the same ``run_dir`` resumes from its latest checkpoint.
``conf/tiny_cpu.yaml`` is the embedded default (a tiny random Qwen2.5-VL and synthetic samples,
written under the run directory on the first launch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML (conf/tiny_cpu.yaml, conf/qwen2_5_vl_7b.yaml, ...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=4 parallel.tp=2")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        layout = validate_layout(cfg, world)
    except ConfigError as e:
        if rank == 0:
            print(f"pretrain_vigos: configuration error: {e}", file=sys.stderr)
        return 2

    from vigos_megatron.training.console import print_line, quiet_library_logs

    quiet_library_logs(rank)  # the platform adaptations, then known library warnings kept off the console
    import torch.distributed as dist

    from vigos_megatron import runtime
    from vigos_megatron.training.loop import train

    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    if cfg.tiny.enabled:
        from vigos_megatron.training.tiny_demo import prepare_tiny_run

        cfg = prepare_tiny_run(cfg)
    if dist.get_rank() == 0:
        print_line(f"[vigos] {runtime.describe()}; run_dir {cfg.run_dir}")
    try:
        train(cfg, layout, log=print_line)
    finally:
        runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
