#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL or Qwen3-VL directory to a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-model HF_DIR --output RUN_DIR

Writes ``RUN_DIR/iter_0000000/`` (dist_checkpointing; loads at any TP/PP) with ``hf/``
(config.json + tokenizer/processor files) and ``RUN_DIR/latest_checkpointed_iteration.txt``.
Layout: ``vigos_megatron/convert/megatron_checkpoint.py``. One process, CPU is enough.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-model", required=True, help="HF Qwen2.5-VL or Qwen3-VL directory (config.json + safetensors)")
    ap.add_argument("--output", required=True, help="new (or empty) run directory")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs(0)  # the platform adaptations; known library warnings kept off the console
    from vigos_megatron.convert.converters import hf_to_megatron

    hf_to_megatron(args.hf_model, args.output, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    from vigos_megatron.training.console import run_cli

    sys.exit(run_cli(main, "convert_hf_to_megatron"))
