"""Synthetic Vision-SR1-47K parquet files with the real schema, for tests and benchmarks.

``images`` is written either as Hugging Face's image struct ``struct<bytes: binary, path: string>``
(``image_layout="struct"``) or as a list of them (``image_layout="list"``); a parquet column has
one type, so a dataset that mixes both comes as several files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence


def image_bytes(width: int, height: int, *, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """An encoded RGB image of ``width x height`` with some structure (gradients + noise-free blocks)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    base = rng.integers(0, 256, size=3).astype(np.float32)
    arr = np.stack([(y + base[0]) % 256 + 0 * x, (x + base[1]) % 256 + 0 * y, ((x + y) / 2 + base[2]) % 256], axis=-1)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_parquet(path: str | Path, rows: Sequence[dict], *, image_layout: str = "struct", row_group_size: int = 4) -> Path:
    """Write ``rows`` (dicts with ``problem``, ``images``, ``answer`` and optional columns) as parquet.

    ``images`` values: for ``struct`` a ``{"bytes", "path"}`` dict (or None); for ``list`` a list of such dicts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [
        ("problem", pa.string()),
        ("images", img_t if image_layout == "struct" else pa.list_(img_t)),
        ("answer", pa.string()),
        ("problem_id", pa.string()),
        ("solution", pa.string()),
        ("options", pa.list_(pa.string())),
        ("path", pa.string()),
        ("data_source", pa.string()),
    ]
    names = [n for n, _ in fields]
    extra_cols = sorted({k for r in rows for k in r} - set(names))
    schema_fields = [pa.field(n, t) for n, t in fields]
    for k in extra_cols:  # extra columns: let arrow infer
        schema_fields.append(pa.field(k, pa.array([r.get(k) for r in rows]).type))
    schema = pa.schema(schema_fields)
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def typical_rows(n: int, *, width: int = 640, height: int = 480, prefix: str = "q", seed: int = 0) -> list[dict]:
    """``n`` valid rows with distinct images and ids ``<prefix><i>``."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "problem": f"How many objects are in picture {i}? Choose the right option.",
                "images": {"bytes": image_bytes(width, height, seed=seed + i), "path": f"img_{prefix}{i}.jpg"},
                "answer": str(i % 7),
                "problem_id": f"{prefix}{i}",
                "solution": f"<think>count</think> \\boxed{{{i % 7}}}",
                "options": ["A", "B"],
                "path": f"img_{prefix}{i}.jpg",
                "data_source": "synthetic",
            }
        )
    return rows


def write_edge_case_dataset(in_dir: str | Path, *, n_plain: int = 12, large_side: int = 3000) -> dict:
    """Two parquet files covering the cases of issue 4; returns what a correct conversion gives.

    ``a.parquet`` (image struct): ``n_plain`` ordinary rows, a problem with a literal ``<image>``,
    an empty answer, a null answer, a very large image (``large_side`` x ``large_side * 3 // 4``),
    a PNG with alpha, a corrupt image, null image bytes, an empty problem, and an extra column.
    ``b.parquet`` (list of image structs): a two-image row, a one-image row, an empty list.

    Returns ``{"valid_ids": set, "skipped": {id: reason prefix}, "files": [paths]}``.
    """
    in_dir = Path(in_dir)
    rows_a = typical_rows(n_plain, width=96, height=64, prefix="a")
    for r in rows_a:
        r["difficulty"] = 1
    img = lambda seed, w=80, h=60, fmt="JPEG": {"bytes": image_bytes(w, h, seed=seed, fmt=fmt), "path": f"{seed}.img"}  # noqa: E731
    special = [
        {"problem_id": "placeholder", "problem": "<image>\nWhat colour is the top-left corner?", "images": img(101), "answer": "red"},
        {"problem_id": "empty_answer", "problem": "Describe the picture.", "images": img(102), "answer": ""},
        {"problem_id": "null_answer", "problem": "Describe the picture again.", "images": img(103), "answer": None},
        {"problem_id": "large", "problem": "What is in this big picture?", "answer": "```\nAnswer: \\boxed{'tree'}\n```",
         "images": {"bytes": image_bytes(large_side, large_side * 3 // 4, seed=104), "path": "large.jpg"}},
        {"problem_id": "rgba_png", "problem": "Is there a shape?", "images": img(105, 50, 40, "PNG"), "answer": "<answer>yes</answer>"},
        {"problem_id": "corrupt", "problem": "Broken image?", "images": {"bytes": b"\xff\xd8\xff garbage", "path": "c.jpg"}, "answer": "1"},
        {"problem_id": "null_bytes", "problem": "No bytes?", "images": {"bytes": None, "path": "missing.jpg"}, "answer": "1"},
        {"problem_id": "empty_problem", "problem": "  <image>  ", "images": img(106), "answer": "1"},
    ]
    for r in special:
        r["difficulty"] = 2
    rows_b = [
        {"problem_id": "two_images", "problem": "Compare the images.", "answer": "same",
         "images": [img(201), img(202)], "data_source": "synthetic-list"},
        {"problem_id": "one_image_list", "problem": "What is shown?", "answer": "B", "images": [img(203)]},
        {"problem_id": "empty_list", "problem": "Where is the image?", "answer": "A", "images": []},
    ]
    files = [write_parquet(in_dir / "a.parquet", rows_a + special, image_layout="struct"),
             write_parquet(in_dir / "b.parquet", rows_b, image_layout="list")]
    skipped = {"corrupt": "undecodable image", "null_bytes": "missing image bytes", "empty_problem": "empty problem",
               "empty_list": "missing image"}
    all_ids = {r["problem_id"] for r in rows_a + special + rows_b}
    return {"valid_ids": all_ids - set(skipped), "skipped": skipped, "files": files}
