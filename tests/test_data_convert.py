"""Parquet -> WebDataset conversion (issue 4): schema handling, skip reasons, idempotency, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vigos_megatron.data.answers import clean_problem, normalize_answer
from vigos_megatron.data.schema import SampleRecord, SkipRow, parse_row
from vigos_megatron.data.synthetic import image_bytes, typical_rows, write_edge_case_dataset, write_parquet
from vigos_megatron.data.webdataset_writer import ConversionError, convert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_webdataset  # noqa: E402


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("42", "42"),
        ("  B ", "B"),
        ("```\nanswer: \\boxed{\"42\"}\n```", "42"),
        ("```text\nyes\n```", "yes"),
        ("<answer> B </answer>", "B"),
        ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}+{b}}", "{a}+{b}"),
        ("'tree'", "tree"),
        ("\"yes\"", "yes"),
        ("\\boxed{a}{b}", "\\boxed{a}{b}"),  # not a single box: left alone
        ("\\boxed{unbalanced", "\\boxed{unbalanced"),
        ("", ""),
        (None, ""),
        ("```\n```", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected
    assert normalize_answer(expected) == expected  # idempotent


def test_clean_problem_strips_image_placeholder():
    assert clean_problem("<image>\nWhat is shown?") == "What is shown?"
    assert clean_problem("Compare <image> and <image>.") == "Compare  and ."
    assert clean_problem(" <image> ") == ""


def test_parse_row_wrong_types_and_extras():
    good = {"bytes": image_bytes(32, 24), "path": "x.jpg"}
    cases = {
        "problem int": ({"problem": 3, "images": good, "answer": "1"}, "wrong type: problem is int"),
        "answer list": ({"problem": "p", "images": good, "answer": ["1"]}, "wrong type: answer is list"),
        "images str": ({"problem": "p", "images": "x.jpg", "answer": "1"}, "wrong type: images is str"),
        "bytes str": ({"problem": "p", "images": {"bytes": "abc", "path": None}, "answer": "1"}, "wrong type: images[0].bytes"),
        "no images col": ({"problem": "p", "answer": "1"}, "missing image (no images column)"),
        "null images": ({"problem": "p", "images": None, "answer": "1"}, "missing image (images is null)"),
        "no problem col": ({"images": good, "answer": "1"}, "missing problem column"),
    }
    for label, (row, reason) in cases.items():
        res = parse_row(row, file="f.parquet", row_index=7)
        assert isinstance(res, SkipRow), label
        assert res.reason.startswith(reason), (label, res.reason)
        assert res.id == "f:7" and res.file == "f.parquet" and res.row == 7
    res = parse_row({"problem": "p <image>", "images": good, "answer": "x", "problem_id": 5, "weird": b"\x00", "score": 0.5},
                    file="f.parquet", row_index=0)
    assert isinstance(res, SampleRecord)
    assert res.id == "5" and res.problem == "p" and res.image_ext == "jpg" and (res.image_width, res.image_height) == (32, 24)
    assert res.extra == {"weird": {"__bytes_b64__": "AA=="}, "score": 0.5}


def _read_tar_samples(shard: Path) -> dict:
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
        rec = json.loads(s["json"])
        img_keys = [k for k in s if k not in ("json", "__key__", "__url__", "__local_path__")]
        assert len(img_keys) == 1, s.keys()
        out[rec["id"]] = (s["__key__"], rec, img_keys[0], s[img_keys[0]])
    return out


def test_convert_edge_cases(tmp_path):
    info = write_edge_case_dataset(tmp_path / "in")
    manifest = convert(info["files"], tmp_path / "out", samples_per_shard=4, batch_rows=3, progress=None)
    c = manifest["counts"]
    assert c["converted"] == len(info["valid_ids"]) and c["skipped"] == len(info["skipped"])
    assert c["rows"] == c["converted"] + c["skipped"]
    assert c["extra_images_ignored"] == 1  # the two-image row: first image used, the other counted
    skipped = {s["id"]: s for s in manifest["skipped"]}
    assert set(skipped) == set(info["skipped"])
    for pid, prefix in info["skipped"].items():
        assert skipped[pid]["reason"].startswith(prefix), skipped[pid]
        assert skipped[pid]["file"] in ("a.parquet", "b.parquet") and isinstance(skipped[pid]["row"], int)
    assert sum(c["skipped_by_reason"].values()) == c["skipped"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 4, 3]

    # the shards are plain WebDataset tars: read them back with the webdataset library
    got = {}
    for s in manifest["shards"]:
        got.update(_read_tar_samples(tmp_path / "out" / s["name"]))
    assert set(got) == info["valid_ids"]
    key, rec, ext, data = got["placeholder"]
    assert rec["problem"] == "What colour is the top-left corner?" and "<image>" in rec["problem_raw"]
    assert rec["origin"] == {"file": "a.parquet", "row": 12} and rec["extra"]["difficulty"] == 2
    assert got["empty_answer"][1]["answer"] == "" and got["null_answer"][1]["answer"] == ""
    assert got["large"][1]["answer"] == "tree" and got["large"][1]["answer_raw"].startswith("```")
    assert got["large"][1]["image"]["width"] == 3000 and got["large"][1]["image"]["height"] == 2250
    assert got["rgba_png"][2] == "png" and got["rgba_png"][1]["answer"] == "yes"
    assert got["two_images"][1]["image"]["num_images_in_row"] == 2 and got["two_images"][1]["source"] == "synthetic-list"
    # the image is stored once, as the original encoded bytes
    import pyarrow.parquet as pq

    originals = {r["problem_id"]: r["images"] for r in pq.read_table(info["files"][0]).to_pylist()}
    assert got["large"][3] == originals["large"]["bytes"] and got["a3"][3] == originals["a3"]["bytes"]
    assert got["a3"][1]["image"]["path"] == "img_a3.jpg"
    # keys follow input order (files sorted, rows in order)
    assert got["a0"][0] == "000000000" and got["two_images"][0] == f"{len(got) - 2:09d}"


def test_convert_is_idempotent_and_removes_stale_shards(tmp_path):
    info = write_edge_case_dataset(tmp_path / "in", large_side=400)
    convert(info["files"], tmp_path / "o1", samples_per_shard=3, progress=None)
    convert(list(reversed(info["files"])), tmp_path / "o2", samples_per_shard=3, progress=None)
    names = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "o2").iterdir())
    assert any(n.endswith(".tar") for n in names) and "manifest.json" in names and "index.json" in names
    for n in names:
        assert (tmp_path / "o1" / n).read_bytes() == (tmp_path / "o2" / n).read_bytes(), n
    # converting fewer rows into the same directory leaves no stale shard behind
    m = convert(info["files"][1:], tmp_path / "o1", samples_per_shard=3, progress=None)
    assert sorted(p.name for p in (tmp_path / "o1").glob("shard-*.tar")) == [s["name"] for s in m["shards"]]


def test_convert_streams_record_batches(tmp_path, monkeypatch):
    """Rows are read batch by batch (at most batch_rows at a time), never as a whole table."""
    import pyarrow.parquet as pq

    path = write_parquet(tmp_path / "in" / "x.parquet", typical_rows(10, width=32, height=24), row_group_size=4)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in real(self, *a, **kw):
            sizes.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("whole-file read"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    convert([path], tmp_path / "out", batch_rows=3, progress=None)
    assert sum(sizes) == 10 and max(sizes) <= 3


def test_unreadable_parquet_is_reported_and_others_converted(tmp_path):
    good = write_parquet(tmp_path / "in" / "good.parquet", typical_rows(3, width=32, height=24))
    bad = tmp_path / "in" / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    m = convert([good, bad], tmp_path / "out", progress=None)
    assert m["counts"]["converted"] == 3 and m["counts"]["failed_files"] == 1
    assert m["failed_files"][0]["file"] == "bad.parquet" and m["failed_files"][0]["reason"]


def test_cli_exit_codes(tmp_path, capsys):
    # glob matches nothing -> 2, message names the glob
    assert make_webdataset.main(["--input", str(tmp_path / "none" / "*.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "matches no file" in capsys.readouterr().err
    # every row bad -> 1, message gives the reasons; the manifest still lists them
    rows = typical_rows(2, width=32, height=24)
    for r in rows:
        r["images"] = {"bytes": b"junk", "path": None}
    write_parquet(tmp_path / "bad" / "x.parquet", rows)
    assert make_webdataset.main(["--input", str(tmp_path / "bad" / "*.parquet"), "--output", str(tmp_path / "o1"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no row was converted" in err and "undecodable image: 2" in err
    assert json.loads((tmp_path / "o1" / "manifest.json").read_text())["counts"]["skipped"] == 2
    # one good row among bad ones -> 0
    rows.append(typical_rows(1, width=32, height=24, prefix="ok")[0])
    write_parquet(tmp_path / "mixed" / "x.parquet", rows)
    assert make_webdataset.main(["--input", str(tmp_path / "mixed" / "*.parquet"), "--output", str(tmp_path / "o2")]) == 0
    out = capsys.readouterr()
    assert "converted 1 of 3 rows" in out.out and "undecodable image: 2" in out.out
    assert "[make_webdataset]" in out.err  # progress lines
    with pytest.raises(ConversionError, match="no input"):
        convert([], tmp_path / "o3")
    with pytest.raises(SystemExit):
        make_webdataset.main(["--input", "x", "--output", "y", "--samples-per-shard", "0"])


def test_cli_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_webdataset.py"), "--input", str(tmp_path / "*.parquet"),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "matches no file" in r.stderr
