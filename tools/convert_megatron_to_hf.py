#!/usr/bin/env python
"""Convert a Megatron Qwen2.5-VL or Qwen3-VL checkpoint (any TP/PP) to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --checkpoint RUN_OR_ITER_DIR --output HF_DIR

``--checkpoint`` is a run directory (its ``latest_checkpointed_iteration.txt`` picks the
checkpoint) or one ``iter_*`` directory, as written by ``tools/convert_hf_to_megatron.py``
or by training; optimizer state in it is ignored. The output loads offline with
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration.from_pretrained(HF_DIR)``. One process, CPU is enough.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run directory or iter_* checkpoint directory")
    ap.add_argument("--output", required=True, help="new (or empty) HF directory")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (GiB)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs(0)  # the platform adaptations; known library warnings kept off the console
    from vigos_megatron.convert.converters import megatron_to_hf

    megatron_to_hf(args.checkpoint, args.output, quiet=args.quiet, max_shard_bytes=int(args.max_shard_gb * 2**30))
    return 0


if __name__ == "__main__":
    from vigos_megatron.training.console import run_cli

    sys.exit(run_cli(main, "convert_megatron_to_hf"))
