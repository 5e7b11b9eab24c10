#!/usr/bin/env python
"""Convert a Hugging Face Qwen2.5-VL directory to a Megatron-Core distributed checkpoint.

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
    ap.add_argument("--hf-model", required=True, help="HF Qwen2.5-VL directory (config.json + safetensors)")
    ap.add_argument("--output", required=True, help="new (or empty) run directory")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vigos_megatron.convert.converters import hf_to_megatron
    from vigos_megatron.convert.hf_checkpoint import CheckpointError
    from vigos_megatron.models.qwen2_5_vl import ModelBuildError

    try:
        hf_to_megatron(args.hf_model, args.output, quiet=args.quiet)
    except (CheckpointError, ModelBuildError) as e:
        print(f"convert_hf_to_megatron: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
