#!/usr/bin/env python
"""Convert Vision-SR1-47K parquet files into WebDataset tar shards.

    python tools/make_webdataset.py --input 'data/vision_sr1/*.parquet' --output shards/ [--samples-per-shard 1000]

Writes ``shard-NNNNNN.tar``, ``manifest.json`` (counts, shards, skipped rows with reasons) and
``index.json`` (member offsets, used by the loader) under ``--output``. Rows with a missing or
undecodable image, an empty problem or wrong types are skipped and reported. Exit status:
0 when at least one row was converted; 2 when the glob matches no file; 1 when no row converted.
The same input always gives byte-identical output. See ``vigos_megatron/data/webdataset_writer.py``.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vigos_megatron.data.webdataset_writer import ConversionError, convert  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="glob of parquet files (quote it; ** is recursive)")
    ap.add_argument("--output", required=True, help="output directory for the shards")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--batch-rows", type=int, default=64, help="rows per parquet record batch held in memory")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.samples_per_shard < 1:
        ap.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if args.batch_rows < 1:
        ap.error(f"--batch-rows must be >= 1, got {args.batch_rows}")
    files = sorted(p for p in glob.glob(args.input, recursive=True) if Path(p).is_file())
    if not files:
        print(f"make_webdataset: error: --input {args.input!r} matches no file", file=sys.stderr)
        return 2
    try:
        manifest = convert(
            files,
            args.output,
            samples_per_shard=args.samples_per_shard,
            batch_rows=args.batch_rows,
            progress=None if args.quiet else sys.stderr,
        )
    except ConversionError as e:
        print(f"make_webdataset: error: {e}", file=sys.stderr)
        return 1
    c = manifest["counts"]
    print(f"converted {c['converted']} of {c['rows']} rows into {len(manifest['shards'])} shards; skipped {c['skipped']}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in c['skipped_by_reason'].items())})" if c["skipped"] else "")
          + (f"; {c['failed_files']} unreadable file(s)" if c["failed_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
