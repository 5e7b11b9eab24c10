"""The global sample stream: which sample sits at each position, for every epoch.

Position ``p = 0, 1, 2, ...`` of the (endless) stream holds sample ``order(e)[p % N]`` of
epoch ``e = p // N``, where ``N`` is the number of samples in the shards and ``order(e)`` is a
permutation of ``0..N-1`` that depends only on ``(seed, e)``:

1. the shard order is shuffled (``shuffle_shards``) with ``numpy.random.default_rng([seed, e])``;
2. the concatenated sample sequence goes through a shuffle buffer of ``shuffle_buffer``
   samples (WebDataset's algorithm: fill the buffer, then each incoming sample replaces a
   uniformly chosen buffered one, which is emitted; drain at the end), simulated on integer
   indices. The result has the locality of streaming (a sample leaves at most a few buffers
   after its shard was read) and no I/O is needed to know it.

Each window ``[e*N, (e+1)*N)`` of positions contains every sample exactly once. Since the
order is a pure function of ``(seed, e, p)``, a resumed run continues the exact stream from
the saved position, with no replay of the data.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


class SampleOrder:
    """Maps stream positions to ``(epoch, sample index)``; sample indices count over the shards in order."""

    def __init__(self, shard_sizes: Sequence[int], *, seed: int, shuffle_shards: bool = True, shuffle_buffer: int = 1000):
        self.shard_sizes = [int(s) for s in shard_sizes]
        if any(s < 0 for s in self.shard_sizes):
            raise ValueError(f"negative shard size in {self.shard_sizes}")
        self.num_samples = sum(self.shard_sizes)
        if self.num_samples == 0:
            raise ValueError("no samples in the shards")
        self.seed = int(seed)
        self.shuffle_shards = bool(shuffle_shards)
        self.shuffle_buffer = int(shuffle_buffer)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)

    @functools.lru_cache(maxsize=4)
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of ``0..N-1`` (int64 array of shape ``[N]``) for ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        shards = rng.permutation(len(self.shard_sizes)) if self.shuffle_shards else np.arange(len(self.shard_sizes))
        seq = np.concatenate([np.arange(self.shard_starts[s], self.shard_starts[s] + self.shard_sizes[s]) for s in shards])
        if self.shuffle_buffer <= 1:
            return seq.astype(np.int64)
        return _buffer_shuffle(seq, self.shuffle_buffer, rng)

    def at(self, position: int) -> tuple[int, int]:
        """``(epoch, sample index)`` at stream ``position``."""
        epoch, offset = divmod(int(position), self.num_samples)
        return epoch, int(self.epoch_order(epoch)[offset])

    def shard_of(self, index: int) -> tuple[int, int]:
        """``(shard number, row inside the shard)`` of a sample index."""
        s = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        return s, int(index - self.shard_starts[s])


def _buffer_shuffle(seq: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(seq)
    draws = rng.random(len(seq) + size)
    buf: list[int] = []
    n = 0
    for i, x in enumerate(seq.tolist()):
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(draws[i] * size)
        out[n] = buf[j]
        n += 1
        buf[j] = x
    # drain in random order
    perm = rng.permutation(len(buf))
    for j in perm:
        out[n] = buf[j]
        n += 1
    assert n == len(seq)
    return out.astype(np.int64)
