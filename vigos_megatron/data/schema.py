"""One Vision-SR1-47K parquet row -> one validated sample record (``../shared/METHOD.md`` section 6).

Columns: ``problem`` (str), ``images`` (an image struct ``{bytes, path}``, raw bytes, or a list
of those: the first is used), ``answer`` (short str; null -> empty), optional ``problem_id``,
``solution``, ``options``, ``path``, ``data_source``; any other column is kept verbatim in
``extra``. :func:`parse_row` never raises on bad data: it returns a :class:`SkipRow` with the
reason (missing/undecodable image, empty problem, wrong type), which the converter counts
and reports.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vigos_megatron.data.answers import clean_problem, normalize_answer

#: columns with a fixed place in the record; every other column goes to ``extra``
CORE_COLUMNS = ("problem", "images", "answer", "problem_id", "data_source")

#: PIL format name -> file extension used inside the shards
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}


@dataclass
class SkipRow:
    """A row that was not converted, and why."""

    file: str
    row: int
    id: str | None
    reason: str

    def to_json(self) -> dict:
        return {"file": self.file, "row": self.row, "id": self.id, "reason": self.reason}


@dataclass
class SampleRecord:
    """A converted row: the JSON record plus the image's original encoded bytes."""

    id: str
    problem: str
    problem_raw: str
    answer: str
    answer_raw: str
    source: str | None
    image_bytes: bytes
    image_ext: str
    image_width: int
    image_height: int
    image_path: str | None
    num_images_in_row: int
    file: str
    row: int
    extra: dict = field(default_factory=dict)

    def json_record(self) -> dict:
        """What goes into the shard's ``.json`` member (the image bytes go in their own member)."""
        return {
            "id": self.id,
            "problem": self.problem,
            "problem_raw": self.problem_raw,
            "answer": self.answer,
            "answer_raw": self.answer_raw,
            "source": self.source,
            "image": {
                "ext": self.image_ext,
                "width": self.image_width,
                "height": self.image_height,
                "path": self.image_path,
                # METHOD.md section 6: a list of images -> the first one is used
                "num_images_in_row": self.num_images_in_row,
            },
            "origin": {"file": self.file, "row": self.row},
            "extra": self.extra,
        }

    def json_bytes(self) -> bytes:
        return json.dumps(self.json_record(), sort_keys=True, ensure_ascii=False).encode("utf-8")


def to_jsonable(value: Any) -> Any:
    """Arrow/python values -> JSON-safe values (bytes become ``{"__bytes_b64__": ...}``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes_b64__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return repr(value)


def _first_image(images: Any) -> tuple[bytes | None, str | None, int, str | None]:
    """(bytes, path, number of images in the row, reason when unusable)."""
    if images is None:
        return None, None, 0, "missing image (images is null)"
    if isinstance(images, (list, tuple)):
        n = len(images)
        if n == 0:
            return None, None, 0, "missing image (empty images list)"
        first = images[0]
    else:
        n, first = 1, images
    if first is None:
        return None, None, n, "missing image (first image is null)"
    if isinstance(first, (bytes, bytearray, memoryview)):
        return bytes(first), None, n, None
    if isinstance(first, dict):
        data, path = first.get("bytes"), first.get("path")
        if path is not None and not isinstance(path, str):
            path = str(path)
        if data is None:
            return None, path, n, f"missing image bytes (path={path!r})"
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return None, path, n, f"wrong type: images[0].bytes is {type(data).__name__}, expected bytes"
        if len(data) == 0:
            return None, path, n, "missing image (zero-length bytes)"
        return bytes(data), path, n, None
    return None, None, n, f"wrong type: images is {type(first).__name__}, expected struct {{bytes, path}} or list"


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """Fully decode ``data``; return (extension, width, height). Raises on undecodable bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format or ""
        img.load()
        width, height = img.size
    if width <= 0 or height <= 0:
        raise ValueError(f"empty image {width}x{height}")
    return _EXTENSIONS.get(fmt, fmt.lower() or "bin"), width, height


def parse_row(row: dict, *, file: str, row_index: int) -> SampleRecord | SkipRow:
    """Validate one row (a ``dict`` from ``pyarrow``'s ``to_pylist``); never raises on bad data."""
    stem = file.rsplit("/", 1)[-1]
    stem = stem[: -len(".parquet")] if stem.endswith(".parquet") else stem
    pid = row.get("problem_id")
    row_id = str(pid) if pid is not None and str(pid) != "" else f"{stem}:{row_index}"

    def skip(reason: str) -> SkipRow:
        return SkipRow(file=file, row=row_index, id=row_id, reason=reason)

    if "problem" not in row:
        return skip("missing problem column")
    problem_raw = row["problem"]
    if not isinstance(problem_raw, str):
        return skip(f"wrong type: problem is {type(problem_raw).__name__}, expected str")
    problem = clean_problem(problem_raw)
    if not problem:
        return skip("empty problem")
    answer_raw = row.get("answer")
    if answer_raw is None:
        answer_raw = ""
    if not isinstance(answer_raw, str):
        return skip(f"wrong type: answer is {type(answer_raw).__name__}, expected str")
    source = row.get("data_source")
    if source is not None and not isinstance(source, str):
        source = str(source)
    if "images" not in row:
        return skip("missing image (no images column)")
    data, path, n_images, reason = _first_image(row["images"])
    if reason is not None:
        return skip(reason)
    try:
        ext, width, height = inspect_image(data)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", (str(e).splitlines() or [""])[0])
        return skip(f"undecodable image: {type(e).__name__}: {detail}".rstrip(": "))
    extra = {k: to_jsonable(v) for k, v in row.items() if k not in CORE_COLUMNS}
    return SampleRecord(
        id=row_id,
        problem=problem,
        problem_raw=problem_raw,
        answer=normalize_answer(answer_raw),
        answer_raw=answer_raw,
        source=source,
        image_bytes=data,
        image_ext=ext,
        image_width=width,
        image_height=height,
        image_path=path,
        num_images_in_row=n_images,
        file=file,
        row=row_index,
        extra=extra,
    )
