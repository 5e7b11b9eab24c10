#!/usr/bin/env python
"""ViGOS training of Qwen2.5-VL on Megatron-Core.

    python examples/pretrain_vigos.py --nproc-per-node N --config conf/X.yaml [key=value ...]
    torchrun --nproc_per_node N examples/pretrain_vigos.py --config conf/X.yaml [key=value ...]

The first form checks the configuration and every path option in one process (a mistake is one
line naming the option, exit code 2), prepares the tiny demo's assets, then starts the ranks
(:mod:`vigos_megatron.training.launch`: torchrun as its child; on several machines each runs it
with ``--nnodes M --node-rank R --master-addr A``); without ``--nproc-per-node`` it runs as one
process. Exit codes: 0 done, or stopped by SIGTERM / Ctrl-C after a complete checkpoint; 1 a
failure; 2 a mistake in the input (or no complete checkpoint left); 75 stopped before the last
steps were saved (a second signal).
Under torchrun each worker checks and runs. The same command with the same ``run_dir`` resumes
from its latest checkpoint. ``conf/tiny_cpu.yaml`` is the embedded default (a tiny Qwen2.5-VL
taught the completion format and synthetic samples, built once in a cache).
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
    ap.add_argument("--nproc-per-node", type=int, default=1,
                    help="ranks to start on this machine (ignored under torchrun, which starts them)")
    ap.add_argument("--nnodes", type=int, default=1, help="machines of the run (each runs this command)")
    ap.add_argument("--node-rank", type=int, default=0, help="this machine's rank with --nnodes > 1")
    ap.add_argument("--master-addr", default="", help="node 0's address with --nnodes > 1")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=4 parallel.tp=2")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vigos_megatron.training import launch

    if launch.under_torchrun():
        return launch.worker_main(args.config, args.overrides)
    return launch.launcher_main(str(Path(__file__).resolve()), args.config, args.overrides, args.nproc_per_node,
                                nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                                master_port=args.master_port)


if __name__ == "__main__":
    from vigos_megatron.training import launch
    from vigos_megatron.training.console import run_cli

    code = run_cli(main, "pretrain_vigos")
    launch.write_exit_record(code)  # a worker of the launcher: rank 0 tells it how the launch ended
    sys.exit(code)
