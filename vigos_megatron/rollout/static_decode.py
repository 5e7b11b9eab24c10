"""Decode steps on static shapes, one per batch bucket, replayed from CUDA graphs on CUDA.

A dynamic decode step (``MegatronRolloutEngine._decode_cached``) runs the ``n`` live rows of the
round against cache columns ``[0, col]``: its shapes change at every step, so no CUDA graph can
replay it. :class:`StaticDecode` runs the same layers on shapes fixed per bucket:

* **Rows.** The first ``nb`` slots of the round's :class:`RoundKVCache`, ``nb`` the smallest of
  :func:`batch_buckets` ``(1, 2, 4, ..., B)`` with ``nb >= n``. Live rows are compacted into
  slots ``[0, n)``; slots ``[n, nb)`` hold rows that finished: they are computed (``nb - n``
  padding rows, counted in ``GenerationStats.padding_rows``), their outputs are dropped, and
  compaction never moves them forward again.
* **Columns.** All ``T`` cache columns. The step's column ``col`` is an int64 ``[1]`` tensor that
  the layers write K/V at (``index_copy_``); the cache's additive mask ``bias[:nb, None, None, :]``
  is ``-inf`` on every generated column not written yet (:meth:`RoundKVCache.open_column` opens
  ``col`` before the step), and the cache is zero-filled so that those columns add exact zeros.
* **Inputs and output.** The step's hidden states ``[1, nb, H]`` (first stage: the token
  embeddings; later stages: what the previous stage sent) and rotary ``cos``/``sin``
  ``[1, nb, 1, D]`` are computed outside and copied into persistent buffers of ``B`` rows. The
  body returns the last stage's logits ``[nb, V/tp]`` (other stages: ``[1, nb, H]``), of which
  the first ``n`` rows are used.

With ``capture`` (CUDA only), the first step of a bucket in a round runs the body
``WARMUP_RUNS`` times on a side stream (lazy initialisations: cuBLAS workspaces, NCCL
communicators, TorchScript's profiling runs), captures it into a
``torch.cuda.CUDAGraph`` and replays it; later steps of that bucket only replay. The buckets of a
round share one graph memory pool and are captured and replayed from the largest down (live rows
only decrease), each output read before the next replay. The embedding, rope, sampling and the
pipeline send/recv stay outside the graphs; tensor-parallel all-reduces (NCCL) are captured.
Graphs, pool and buffers address the round's cache, so they live for one round and are dropped
with it: each bucket is captured once per round (``graph_captures``, ``capture_seconds``).

Without ``capture`` the same body runs eagerly: the graph's arithmetic at the graph's shapes, for
comparing graphs with eager at the same bucket (bucket padding changes the GEMMs' shapes) and for
tests on the CPU. Static shapes cost attention over all ``T = P + max_new`` columns at every step,
against ``col + 1`` on the dynamic path.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vigos_megatron.rollout.kv_cache import RoundKVCache
from vigos_megatron.rollout.prompt_batch import PromptRound

if TYPE_CHECKING:
    from vigos_megatron.rollout.engine import MegatronRolloutEngine

#: eager runs of a bucket's body before its capture (torch's CUDA-graph recipe: lazy initialisations
#: and TorchScript's profiling runs of megatron's fused bias-dropout-add happen before the capture)
WARMUP_RUNS = 3

#: how the engine runs a decode step: exact shapes (``dynamic``), bucketed static shapes run
#: eagerly (``static``), or those replayed from CUDA graphs (``graphs``, CUDA only)
DECODE_MODES = ("dynamic", "static", "graphs")


def batch_buckets(batch: int) -> list[int]:
    """The static batch sizes of a round of ``batch`` rows: powers of two below ``batch``, and ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out, b = [], 1
    while b < batch:
        out.append(b)
        b *= 2
    return out + [batch]


class StaticDecode:
    """The decode steps of one round on static shapes (module docstring); ``capture``: CUDA graphs
    (the engine allows it for CUDA models only)."""

    def __init__(self, engine: MegatronRolloutEngine, rnd: PromptRound, cache: RoundKVCache, *, capture: bool):
        self.engine, self.rnd, self.cache = engine, rnd, cache
        self.buckets = batch_buckets(rnd.batch_size)
        b, dev = rnd.batch_size, rnd.key_pad.device
        dtype = engine.lm.config.params_dtype
        x_dtype = dtype if engine.pre_process else engine.pipe_dtype
        self.x = torch.zeros((1, b, engine.hidden_size), dtype=x_dtype, device=dev)
        self.cos = torch.zeros((1, b, 1, engine.stage.head_dim), dtype=dtype, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.column = torch.zeros(1, dtype=torch.int64, device=dev)
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        #: bucket -> (graph, its output tensor)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def buffers(self) -> list[Tensor]:
        return [self.x, self.cos, self.sin, self.column]

    def step(self, rows: Tensor, feed: Tensor, col: int) -> Tensor | None:
        """One token per live slot ``[0, n)`` (round rows ``rows``, fed ids ``feed`` ``[n]``) at cache
        column ``col``; the last stage returns logits ``[n, V/tp]``, other stages send and return None."""
        e, n = self.engine, rows.numel()
        nb = next(b for b in self.buckets if b >= n)
        e.last_stats.padding_rows += nb - n
        x, (cos, sin) = e.decode_inputs(self.rnd, rows, feed, col, self.cache)
        if x is None:
            x = e.pp.recv_prev((1, n, e.hidden_size), e.pipe_dtype, self.x.device)
        self.x[:, :n].copy_(x)
        self.cos[:, :n].copy_(cos)
        self.sin[:, :n].copy_(sin)
        self.column.fill_(col)
        out = self._replay(nb) if self.capture else self._body(nb)
        if not e.post_process:
            e.pp.send_next(out[:, :n].to(e.pipe_dtype))
            return None
        return out[:n]

    def _body(self, nb: int) -> Tensor:
        """The stage's layers on slots ``[0, nb)`` over every cache column (what a graph captures)."""
        e = self.engine
        h = e.stage(self.x[:, :nb], (self.cos[:, :nb], self.sin[:, :nb]), self.cache, (0, nb), self.column,
                    self.cache.bias[:nb, None, None, :], last_column_only=e.post_process)
        return e.logits(h) if e.post_process else h

    def _replay(self, nb: int) -> Tensor:
        if nb not in self.graphs:
            e = self.engine
            t0 = e.clock()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):  # each writes the same K/V as the replay below
                    self._body(nb)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            gc.freeze()  # torch.cuda.graph collects garbage on entry: cheap over a frozen heap
            try:
                # thread_local: CUDA calls of other threads (NCCL's watchdog) are not capture errors
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    out = self._body(nb)
            finally:
                gc.unfreeze()
            self.graphs[nb] = (graph, out)
            e.last_stats.graph_captures += 1
            e.last_stats.capture_seconds += e.clock() - t0
        graph, out = self.graphs[nb]
        graph.replay()
        return out

    def release(self) -> None:
        """Drop the graphs, their pool and the buffers (the round's cache is released by its owner)."""
        self.graphs.clear()
        self.pool = None
        self.x = self.cos = self.sin = self.column = None
        self.cache = self.rnd = None
