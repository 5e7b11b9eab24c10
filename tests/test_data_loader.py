"""Streaming loader (issue 4): rank/worker split, shuffle, determinism, epochs, equal batches, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vigos_megatron.data.loader import DropSample, StreamingLoader
from vigos_megatron.data.sample_order import SampleOrder
from vigos_megatron.data.synthetic import typical_rows, write_parquet
from vigos_megatron.data.webdataset_writer import convert

N = 23  # not a multiple of anything used below


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    write_parquet(d / "in" / "a.parquet", typical_rows(N, width=32, height=24))
    convert([d / "in" / "a.parquet"], d / "out", samples_per_shard=4, progress=None)  # shards of 4,4,4,4,4,3
    return d / "out"


def _ids(batches):
    return [(s["epoch"], s["record"]["id"]) for b in batches for s in b["samples"]]


def _run(shards, rank, world, *, steps, batch=2, workers=0, seed=7, buffer=5, encode=None):
    return list(StreamingLoader(shards, rank=rank, world_size=world, batch_size=batch, seed=seed, num_workers=workers,
                                shuffle_buffer=buffer, encode=encode, num_steps=steps))


def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder([4, 4, 3, 0, 5], seed=3, shuffle_buffer=3)
    n = order.num_samples
    for e in range(3):
        assert sorted(order.epoch_order(e).tolist()) == list(range(n))
    assert order.epoch_order(0).tolist() != order.epoch_order(1).tolist()
    plain = SampleOrder([4, 4, 3], seed=3, shuffle_shards=False, shuffle_buffer=1)
    assert plain.epoch_order(0).tolist() == list(range(11))
    assert [plain.shard_of(i) for i in (0, 3, 4, 10)] == [(0, 0), (0, 3), (1, 0), (2, 2)]
    # same seed -> same order; another seed -> another order
    assert SampleOrder([4, 4, 3, 5], seed=3).epoch_order(0).tolist() == SampleOrder([4, 4, 3, 5], seed=3).epoch_order(0).tolist()
    assert SampleOrder([4, 4, 3, 5], seed=3).epoch_order(0).tolist() != SampleOrder([4, 4, 3, 5], seed=4).epoch_order(0).tolist()


@pytest.mark.slow
def test_two_ranks_two_workers_every_row_once_per_epoch(shards):
    world, batch = 2, 2
    steps = 2 * int(np.ceil(N / (world * batch))) + 1  # a bit more than two epochs
    per_rank = [_run(shards, r, world, steps=steps, batch=batch, workers=2) for r in range(world)]
    # every rank yields the same number of batches, each full
    assert [len(b) for b in per_rank] == [steps, steps]
    assert all(len(b["samples"]) == batch and not b["dropped"] for bs in per_rank for b in bs)
    assert [b["step"] for b in per_rank[0]] == list(range(steps))
    seen = _ids(per_rank[0]) + _ids(per_rank[1])
    expected = {f"q{i}" for i in range(N)}
    for epoch in (0, 1):
        ids = [i for e, i in seen if e == epoch]
        assert Counter(ids) == Counter(expected), f"epoch {epoch}: {Counter(ids) - Counter(expected)}"
    # ranks never share a position; positions consumed are exactly 0..steps*W*B-1
    positions = [s["position"] for bs in per_rank for b in bs for s in b["samples"]]
    assert sorted(positions) == list(range(steps * world * batch))
    # the worker count does not change a rank's stream
    assert _ids(per_rank[0]) == _ids(_run(shards, 0, world, steps=steps, batch=batch, workers=0))
    # shuffled: not the shard order, and epoch 1 differs from epoch 0
    e0 = [s["index"] for bs in per_rank for b in bs for s in b["samples"] if s["epoch"] == 0]
    assert e0 != sorted(e0)


def test_deterministic_for_a_seed(shards):
    a = _ids(_run(shards, 1, 2, steps=8, seed=11))
    assert a == _ids(_run(shards, 1, 2, steps=8, seed=11))
    assert a != _ids(_run(shards, 1, 2, steps=8, seed=12))


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 5, 12])
def test_resume_continues_the_exact_stream(shards, k):
    """Stop after k samples (batch 1), save, restore into a new loader: the rest equals the uninterrupted run."""
    total = 20  # crosses the epoch boundary at 23 / (2 ranks) ~ 11.5 steps
    full = _ids(_run(shards, 1, 2, steps=total, batch=1, workers=2))
    first = StreamingLoader(shards, rank=1, world_size=2, batch_size=1, seed=7, num_workers=2, shuffle_buffer=5, num_steps=total)
    head = []
    for b in first:
        head.append(b)
        if len(head) == k:
            break
    state = first.state_dict()
    assert state["consumed_positions"] == 2 * k
    resumed = StreamingLoader(shards, rank=1, world_size=2, batch_size=1, seed=7, num_workers=2, shuffle_buffer=5, num_steps=total)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert _ids(head) + _ids(tail) == full
    assert [b["step"] for b in tail] == list(range(k, total))


def test_resume_with_another_data_parallel_layout(shards):
    """The saved position is global: 2 ranks x batch 2 for 3 steps == 1 rank x batch 4 continuing at step 3."""
    ref = [_ids(_run(shards, r, 2, steps=6, batch=2)) for r in range(2)]
    a = StreamingLoader(shards, rank=0, world_size=2, batch_size=2, seed=7, num_workers=0, shuffle_buffer=5)
    it = iter(a)
    for _ in range(3):
        next(it)
    b = StreamingLoader(shards, rank=0, world_size=1, batch_size=4, seed=7, num_workers=0, shuffle_buffer=5, num_steps=6)
    b.load_state_dict(a.state_dict())
    got = [s for bt in b for s in bt["samples"]]
    # global positions 12.. in order: step s of the old layout = rank0 batch then rank1 batch
    expected = []
    for s in range(3, 6):
        expected += ref[0][2 * s: 2 * s + 2] + ref[1][2 * s: 2 * s + 2]
    assert [(s["epoch"], s["record"]["id"]) for s in got] == expected


def test_state_mismatch_is_refused(shards):
    a = StreamingLoader(shards, rank=0, world_size=2, batch_size=2, seed=7, num_workers=0)
    state = a.state_dict()
    b = StreamingLoader(shards, rank=0, world_size=2, batch_size=2, seed=8, num_workers=0)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(state)
    c = StreamingLoader(shards, rank=0, world_size=3, batch_size=1, seed=7, num_workers=0)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        c.load_state_dict({**state, "consumed_positions": 4})


def test_dropped_samples_are_reported_and_ranks_stay_in_step(shards):
    def encode(key, record, image):
        if record["id"] in ("q3", "q4", "q5"):
            raise DropSample("prompt too long: test")
        if record["id"] == "q6":
            raise OSError("truncated file")
        return {"record": record}

    steps = int(np.ceil(N / 4))
    loaders = [StreamingLoader(shards, rank=r, world_size=2, batch_size=2, seed=7, num_workers=0, encode=encode, num_steps=steps)
               for r in range(2)]
    batches = [list(ld) for ld in loaders]
    assert [len(b) for b in batches] == [steps, steps]
    dropped = [d for bs in batches for b in bs for d in b["dropped"] if d["epoch"] == 0]
    assert sorted(d["id"] for d in dropped) == ["q3", "q4", "q5", "q6"]
    assert {d["reason"] for d in dropped} == {"prompt too long: test", "OSError: truncated file"}
    total = loaders[0].dropped + loaders[1].dropped
    assert total["prompt too long"] >= 3 and total["OSError"] >= 1
    kept = {s["record"]["id"] for bs in batches for b in bs for s in b["samples"] if s["epoch"] == 0}
    assert kept == {f"q{i}" for i in range(N)} - {"q3", "q4", "q5", "q6"}
    assert loaders[0].state_dict()["dropped"] == dict(loaders[0].dropped)


def test_missing_shards_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        StreamingLoader(tmp_path, rank=0, world_size=1, batch_size=1, seed=0)


def test_bad_rank_is_a_clear_error(shards):
    with pytest.raises(ValueError, match=r"rank 2 not in \[0, world_size=2\)"):
        StreamingLoader(shards, rank=2, world_size=2, batch_size=1, seed=0)
