"""Vision-SR1-47K parquet files -> WebDataset tar shards + ``manifest.json`` + ``index.json``.

Layout of ``out_dir``::

    shard-000000.tar ...   WebDataset shards; sample ``<key>`` = ``<key>.json`` + ``<key>.<ext>``
    manifest.json          counts, inputs, shards (samples, bytes, sha256), skipped rows + reasons
    index.json             per shard, per sample: [key, json offset, json size, image offset,
                           image size, image ext] (byte offsets of the member data in the tar)

* The image is stored once, as the row's original encoded bytes (``.jpg``/``.png``/...).
* Keys are the global sample number (``%09d``) in input order: files sorted by path, rows in
  file order. The id of the sample (``problem_id``, else ``<file stem>:<row>``) is in the JSON.
* Parquet files are streamed in record batches (``ParquetFile.iter_batches``): at most one
  batch of rows is in memory, never a whole file.
* Idempotent: tar headers carry mtime 0, uid/gid 0, no user/group names, fixed mode, and
  members are written in a fixed order, so the same input gives byte-identical shards (and
  manifest: it holds no timestamps or absolute paths).
* Bad rows are skipped and listed with a reason; an unreadable parquet file is listed under
  ``failed_files`` and the other files are still converted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from vigos_megatron.data.schema import SampleRecord, SkipRow, parse_row
from vigos_megatron.errors import UserError

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT_VERSION = 1


class ConversionError(UserError, RuntimeError):
    """Nothing could be converted (no input, or every row skipped)."""

    hint = "check the input files named above"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class DeterministicShardWriter:
    """Writes samples into numbered tar shards, ``samples_per_shard`` each, reproducibly."""

    def __init__(self, out_dir: Path, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def write(self, key: str, record: SampleRecord) -> None:
        if self._tar is None or self._count >= self.samples_per_shard:
            self._close_shard()
            name = SHARD_PATTERN.format(len(self.shards))
            self._tmp = self.out_dir / f".{name}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name})
            self._count = 0
        payload = record.json_bytes()
        self._tar.addfile(_tarinfo(f"{key}.json", len(payload)), io.BytesIO(payload))
        self._tar.addfile(_tarinfo(f"{key}.{record.image_ext}", len(record.image_bytes)), io.BytesIO(record.image_bytes))
        self._count += 1

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / self.shards[-1]["name"]
        os.replace(self._tmp, final)
        self.shards[-1].update(_describe_shard(final))
        self._tar = None

    def close(self) -> None:
        self._close_shard()


def _describe_shard(path: Path) -> dict:
    """Sample count, size, sha256 and the per-sample member offsets of a written shard."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    samples: dict[str, list] = {}
    with tarfile.open(path, "r") as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            entry = samples.setdefault(key, [key, 0, 0, 0, 0, ""])
            if ext == "json":
                entry[1], entry[2] = m.offset_data, m.size
            else:
                entry[3], entry[4], entry[5] = m.offset_data, m.size, ext
    return {"samples": len(samples), "bytes": path.stat().st_size, "sha256": h.hexdigest(), "index": list(samples.values())}


def _iter_rows(path: Path, batch_rows: int) -> Iterator[tuple[int, int, list[dict]]]:
    """(row offset, total rows, rows) per record batch of a parquet file."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    total = pf.metadata.num_rows
    offset = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        rows = batch.to_pylist()
        yield offset, total, rows
        offset += len(rows)


class _Progress:
    def __init__(self, stream: TextIO | None, every_s: float = 2.0):
        self.stream, self.every_s, self.last = stream, every_s, 0.0

    def __call__(self, msg: str, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            print(msg, file=self.stream, flush=True)


def convert(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    batch_rows: int = 64,
    progress: TextIO | None = sys.stderr,
) -> dict:
    """Convert ``inputs`` (parquet files) into shards under ``out_dir``; return the manifest.

    Raises :class:`ConversionError` when ``inputs`` is empty or no row was converted (the
    manifest with the skip reasons is still written in the latter case).
    """
    files = sorted({str(p) for p in inputs})
    if not files:
        raise ConversionError("no input parquet files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # names are relative to the common parent, so the manifest does not depend on where the input lives
    common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    rel = {f: os.path.relpath(os.path.abspath(f), common) for f in files}

    writer = DeterministicShardWriter(out, samples_per_shard)
    skipped: list[SkipRow] = []
    failed_files: list[dict] = []
    inputs_info: list[dict] = []
    reasons: Counter = Counter()
    seen_ids: Counter = Counter()
    n_rows = n_ok = extra_images = 0
    tick = _Progress(progress)
    for fi, f in enumerate(files):
        name = rel[f]
        rows_in_file = ok_in_file = 0
        try:
            for offset, total, rows in _iter_rows(Path(f), batch_rows):
                for j, row in enumerate(rows):
                    res = parse_row(row, file=name, row_index=offset + j)
                    rows_in_file += 1
                    if isinstance(res, SkipRow):
                        skipped.append(res)
                        reasons[res.reason.split(":")[0].split(" (")[0]] += 1
                        continue
                    writer.write(f"{n_ok:09d}", res)
                    seen_ids[res.id] += 1
                    extra_images += max(0, res.num_images_in_row - 1)
                    n_ok += 1
                    ok_in_file += 1
                tick(f"[make_webdataset] file {fi + 1}/{len(files)} {name}: row {offset + len(rows)}/{total}; "
                     f"converted {n_ok}, skipped {len(skipped)}")
        except Exception as e:  # unreadable parquet: report, go on with the other files
            failed_files.append({"file": name, "rows_read": rows_in_file, "reason": f"{type(e).__name__}: {e}"})
            tick(f"[make_webdataset] file {name}: unreadable ({type(e).__name__}: {e})", force=True)
        n_rows += rows_in_file
        inputs_info.append({"file": name, "rows": rows_in_file, "converted": ok_in_file})
    writer.close()

    # shards of an earlier run that this run did not rewrite would be picked up by a glob: remove them
    keep = {s["name"] for s in writer.shards}
    for stale in sorted(out.glob("shard-*.tar")):
        if stale.name not in keep:
            stale.unlink()

    index = {"format_version": FORMAT_VERSION, "shards": [{"name": s["name"], "samples": s.pop("index")} for s in writer.shards]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "samples_per_shard": samples_per_shard,
        "counts": {
            "rows": n_rows,
            "converted": n_ok,
            "skipped": len(skipped),
            "skipped_by_reason": dict(sorted(reasons.items())),
            "failed_files": len(failed_files),
            "extra_images_ignored": extra_images,
            "duplicate_ids": sum(c - 1 for c in seen_ids.values() if c > 1),
        },
        "inputs": inputs_info,
        "failed_files": failed_files,
        "shards": writer.shards,
        "skipped": [s.to_json() for s in skipped],
    }
    _write_json(out / INDEX_NAME, index)
    _write_json(out / MANIFEST_NAME, manifest)
    tick(f"[make_webdataset] done: {n_ok}/{n_rows} rows converted into {len(writer.shards)} shards, "
         f"{len(skipped)} skipped, {len(failed_files)} unreadable files -> {out}", force=True)
    if n_ok == 0:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no rows read"
        if failed_files:
            why += f"; {len(failed_files)} unreadable file(s), e.g. {failed_files[0]['file']}: {failed_files[0]['reason']}"
        raise ConversionError(f"no row was converted ({n_rows} rows read; {why}); see {out / MANIFEST_NAME}")
    return manifest


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
