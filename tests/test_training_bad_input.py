"""Bad input through the real entry point (``examples/pretrain_vigos.py``, ``conf/tiny_cpu.yaml``).

The tiny demo's shards are written by the test (the demo's own rows, same images), then damaged
where the unshuffled stream (``shuffle_shards=false``, ``shuffle_buffer=1``) is known to read them;
4 prompts per step, 3 shards of 4 samples:

=======  ==========================  ==================================================================
step     samples (shard)             damage
=======  ==========================  ==================================================================
1        0 1 2 3 (shard-000000.tar)  1: image bytes that do not decode; 2: a prompt over
                                     ``data.context.max_prompt_tokens``
2        4 5 6 7 (shard-000001.tar)  the shard is truncated inside 6's image: 6 and 7 are short reads
3        8 .. 11 (shard-000002.tar)  the whole shard is overwritten with text: not a tar at all
=======  ==========================  ==================================================================

Checked: the launch exits 0; every bad sample gets one log line naming its key, id (when its JSON
was read), shard file and reason; the loader's per-reason counters (saved in the checkpoint)
and ``dropped_samples`` in ``metrics.jsonl`` have the exact numbers; the good samples train (finite
loss, update applied, exactly the good prompts rolled out); a step whose batch is empty on some
data-parallel rank is skipped by every rank (1 process: step 3; DP=2: step 2, where only rank 1's
half is bad, and step 3), writes a metrics line that says so (``applied`` 0, no loss, the drops so
far), and the run still ends with a checkpoint at its last step.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "pretrain_vigos.py"

SAMPLES, PER_SHARD = 12, 4
MAX_PROMPT_TOKENS = 1024
#: the stream in file order, so the damaged samples' steps and data-parallel ranks are known
UNSHUFFLED = ("data.loader.shuffle_shards=false", "data.loader.shuffle_buffer=1",
              f"data.context.max_prompt_tokens={MAX_PROMPT_TOKENS}", "train.steps=3")
NOT_A_TAR = b"this file is not a tar archive\n"


def _key(i: int) -> str:
    return f"{i:09d}"


@pytest.fixture(scope="module")
def bad_tiny(tmp_path_factory) -> Path:
    """``<dir>/{hf,shards}`` as the tiny demo writes them (no warm start), with the damage of the module doc."""
    from vigos_megatron.data.synthetic import image_bytes, typical_rows, write_parquet
    from vigos_megatron.data.webdataset_writer import INDEX_NAME, convert
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint
    from vigos_megatron.training.tiny_demo import TINY_IMAGE_SIZE, asset_paths

    paths = asset_paths(tmp_path_factory.mktemp("bad_input"))
    write_tiny_checkpoint(paths["hf"], seed=0)
    w, h = TINY_IMAGE_SIZE
    rows = typical_rows(SAMPLES, width=w, height=h, prefix="tiny", seed=0)
    for i, r in enumerate(rows):
        r["images"] = {"bytes": image_bytes(w, h, seed=1000 + i), "path": f"tiny{i}.jpg"}
    rows[2]["problem"] = "Count the items: " + " ".join(f"item{j}" for j in range(3 * MAX_PROMPT_TOKENS))
    parquet = write_parquet(paths["parquet"] / "tiny.parquet", rows)
    manifest = convert([str(parquet)], str(paths["shards"]), samples_per_shard=PER_SHARD, progress=None)
    assert manifest["counts"]["converted"] == SAMPLES  # the converter itself drops nothing here

    index = json.loads((paths["shards"] / INDEX_NAME).read_text())["shards"]
    shard = [paths["shards"] / s["name"] for s in index]
    # sample 1: its image member replaced by bytes of the same size that no decoder accepts
    _key1, _, _, i_off, i_size, _ = index[0]["samples"][1]
    with open(shard[0], "r+b") as f:
        f.seek(i_off)
        f.write((b"\x00garbage" * i_size)[:i_size])
    # shard 1: cut in the middle of sample 6's image (sample 7 is then wholly past the end)
    _, _, _, i_off, i_size, _ = index[1]["samples"][2]
    with open(shard[1], "r+b") as f:
        f.truncate(i_off + i_size // 2)
    # shard 2: not a tar at all (same size, so every sample is looked for and found to be garbage)
    size = shard[2].stat().st_size
    shard[2].write_bytes((NOT_A_TAR * (size // len(NOT_A_TAR) + 1))[:size])
    return paths["hf"].parent


def _launch(nproc: int, run: Path, bad_tiny: Path) -> str:
    """The demo config on the damaged checkpoint and shards (``tiny.enabled=false``: explicit paths)."""
    from vigos_megatron.testing.distributed import run_torchrun

    return run_torchrun(ENTRY, nproc, "--config", ROOT / "conf" / "tiny_cpu.yaml", f"run_dir={run}",
                        "parallel.tp=1", *UNSHUFFLED, "tiny.enabled=false", f"model.hf_path={bad_tiny / 'hf'}",
                        f"data.loader.shards_dir={bad_tiny / 'shards'}", f"data.context.processor_path={bad_tiny / 'hf'}",
                        timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _drop_lines(out: str) -> dict[str, tuple[int, int, str]]:
    """``{key: (step, dp rank, rest of the line)}`` of the loop's dropped-sample lines."""
    found = {}
    for m in re.finditer(r"^\[vigos\] step (\d+): dropped sample (\d{9})(.*?) \(data-parallel rank (\d+)\): (.*)$",
                         out, re.M):
        assert m.group(2) not in found, f"sample {m.group(2)} reported twice:\n{out[-6000:]}"
        found[m.group(2)] = (int(m.group(1)), int(m.group(4)), m.group(3) + ": " + m.group(5))
    return found


def _check_drop_messages(out: str, rank_of: dict[int, int]) -> None:
    """One line per bad sample, naming its key, id (JSON read), shard file and reason."""
    lines = _drop_lines(out)
    assert sorted(lines) == [_key(i) for i in (1, 2, 6, 7, 8, 9, 10, 11)], out[-6000:]
    expect = {
        1: (1, r" \(id tiny1\) of shard-000000\.tar: image: UnidentifiedImageError: cannot identify image file"),
        2: (1, r" \(id tiny2\) of shard-000000\.tar: prompt too long: context student has \d+ tokens > "
               rf"max_prompt_tokens {MAX_PROMPT_TOKENS}"),
        6: (2, r" of shard-000001\.tar: OSError: shard-000001\.tar: short read of 000000006 \(shard truncated\?\)"),
        7: (2, r" of shard-000001\.tar: OSError: shard-000001\.tar: short read of 000000007 \(shard truncated\?\)"),
        **{i: (3, r" of shard-000002\.tar: JSONDecodeError: Expecting value") for i in (8, 9, 10, 11)},
    }
    for i, (step, pattern) in expect.items():
        got_step, rank, text = lines[_key(i)]
        assert (got_step, rank) == (step, rank_of[i]), (i, got_step, rank)
        assert re.match(pattern, text), (i, text)


def _checkpoint(run: Path, step: int) -> dict:
    from vigos_megatron.training.checkpoint import read_training_metadata

    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
    meta = read_training_metadata(run / f"iter_{step:07d}")
    assert meta["step"] == step
    return meta["train_state"]


def _check_trained(m: dict, step: int, rollouts: int, dropped: int) -> None:
    assert m["step"] == step and m["applied"] == 1, m
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), m
    assert m["rollouts"] == rollouts, m  # exactly the good prompts were rolled out and trained on
    assert m["dropped_samples"] == dropped, m  # all data-parallel ranks, since the start of the run


def _check_skipped(m: dict, step: int, dropped: int) -> None:
    """The metrics line of a step no rank could train: not applied, no loss, the drops so far."""
    assert m["step"] == step and m["applied"] == 0 and "loss" not in m, m
    assert m["skipped"] == "a data-parallel rank had no usable sample" and m["rollouts"] == 0, m
    assert m["dropped_samples"] == dropped, m


@pytest.mark.slow
def test_bad_samples_are_skipped_counted_and_named(bad_tiny, tmp_path):
    run = tmp_path / "run"
    out = _launch(1, run, bad_tiny)
    _check_drop_messages(out, rank_of={i: 0 for i in range(SAMPLES)})
    assert "[vigos] step 3: skipped (a data-parallel rank had no usable sample)" in out, out[-6000:]
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    _check_trained(metrics[0], 1, rollouts=2, dropped=2)
    _check_trained(metrics[1], 2, rollouts=2, dropped=4)
    _check_skipped(metrics[2], 3, dropped=8)
    state = _checkpoint(run, 3)
    assert state["loader"]["dropped"] == {"image": 1, "prompt too long": 1, "OSError": 2, "JSONDecodeError": 4}
    assert state["loader"]["consumed_positions"] == 12


@pytest.mark.slow
def test_data_parallel_rank_with_only_bad_samples_does_not_hang(bad_tiny, tmp_path):
    # DP=2, 2 prompts per rank: step 1 rank 0 reads 0 1, rank 1 reads 2 3 (one bad each); step 2
    # rank 0 reads 4 5 (good), rank 1 reads 6 7 (both cut off); step 3 both ranks read shard 2
    run = tmp_path / "run"
    out = _launch(2, run, bad_tiny)
    _check_drop_messages(out, rank_of={1: 0, 2: 1, 6: 1, 7: 1, 8: 0, 9: 0, 10: 1, 11: 1})
    for step in (2, 3):
        assert f"[vigos] step {step}: skipped (a data-parallel rank had no usable sample)" in out, out[-6000:]
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    _check_trained(metrics[0], 1, rollouts=2, dropped=2)
    _check_skipped(metrics[1], 2, dropped=4)
    _check_skipped(metrics[2], 3, dropped=8)  # summed over both data-parallel ranks
    state = _checkpoint(run, 3)  # rank 0's state: its own drops
    assert state["loader"]["dropped"] == {"image": 1, "JSONDecodeError": 2}
    assert state["loader"]["consumed_positions"] == 12


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
