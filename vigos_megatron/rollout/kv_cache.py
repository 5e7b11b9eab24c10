"""The KV cache of one generation round: keys stored already rotated, compacted as rows finish.

One tensor holds every layer of this pipeline stage::

    kv[l, 0] = K_l, kv[l, 1] = V_l        kv: [L, 2, B, G, T, D]

(``L`` layers of the stage, ``B`` rows, ``G`` key/value heads of this tensor-parallel rank, ``T``
cache columns, ``D`` head dim; model dtype, on the model's device). A forward that feeds cache
columns ``[c0, c1)`` of rows ``[r0, r1)`` writes ``K_l[r0:r1, :, c0:c1]`` with keys that already
carry the rotary embedding of their own mrope positions, so attending later reads the cache as it
is: a decode step costs ``O(columns)`` reads and never re-rotates the prefix (megatron-core's
``StaticInferenceContext`` stores un-rotated keys and rotates ``[0, end)`` at every step).

``bias[b, c]`` (``[B, T]``, model dtype) is the additive attention mask of column ``c`` of slot
``b``: 0 where it may be attended to, ``-inf`` on left padding and on the generated columns not
yet written (columns ``>= prompt_columns``). A decode step at column ``c`` opens that column
(:meth:`RoundKVCache.open_column`: one ``[B]`` write) and uses the view
``bias[:n, None, None, :c + 1]``, or all ``T`` columns on static shapes
(:mod:`~vigos_megatron.rollout.static_decode`; there the cache is zero-filled, so that masked
columns contribute exact zeros).

Live rows are kept in the first slots: :meth:`RoundKVCache.compact` moves the rows still
generating to the front so that a decode step runs on ``[0, n_live)`` only (finished rows stop
costing compute). :meth:`RoundKVCache.release` drops every buffer.

:func:`preserve_global_memory_buffer` restores megatron's process-wide ``GlobalMemoryBuffer``
(the local attention's ``[b*heads, sq, sk]`` score workspace, which grows to the largest request
and is never freed; used by the full-recomputation path) to exactly what it held before
generation, so a long forward does not leave a larger workspace behind.
"""

from __future__ import annotations

import contextlib

import torch


class RoundKVCache:
    """Rotated-key KV cache of ``layers`` layers for ``batch`` rows of ``columns`` columns.

    ``key_pad``: bool ``[batch, columns]``, True on padding columns (``bias`` is ``-inf`` there);
    columns from ``prompt_columns`` on are generated (``-inf`` until opened); ``zeroed``: fill K and
    V with zeros (else left uninitialised: a dynamic step never reads a column before writing it).
    """

    def __init__(self, *, layers: int, batch: int, columns: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, key_pad: torch.Tensor, prompt_columns: int, zeroed: bool = False):
        if batch < 1 or columns < 1:
            raise ValueError(f"KV cache needs batch >= 1 and columns >= 1, got {batch}, {columns}")
        if tuple(key_pad.shape) != (batch, columns):
            raise ValueError(f"key_pad: expected [{batch}, {columns}], got {tuple(key_pad.shape)}")
        if not 0 < prompt_columns <= columns:
            raise ValueError(f"prompt_columns: expected 1..{columns}, got {prompt_columns}")
        shape, dev = (layers, 2, batch, kv_heads, columns, head_dim), key_pad.device
        self.kv = torch.zeros(shape, dtype=dtype, device=dev) if zeroed else torch.empty(shape, dtype=dtype, device=dev)
        self.bias = torch.zeros((batch, columns), dtype=dtype, device=dev).masked_fill_(key_pad, float("-inf"))
        self.bias[:, prompt_columns:] = float("-inf")

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` of layer ``index`` of this stage, each ``[B, G, T, D]`` (views)."""
        return self.kv[index, 0], self.kv[index, 1]

    def open_column(self, column: int) -> None:
        """Make generated column ``column`` visible to every slot (before the step that writes it)."""
        self.bias[:, column] = 0.0

    # ----------------------------------------------------------------- bookkeeping

    def buffers(self) -> list[torch.Tensor]:
        return [self.kv, self.bias]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def compact(self, keep_slots: torch.Tensor, length: int) -> None:
        """Move slots ``keep_slots`` (int64 ``[n]``, increasing) to slots ``[0, n)``: K and V of every
        layer (the ``length`` columns written so far) and ``bias``."""
        n = int(keep_slots.numel())
        self.kv[:, :, :n, :, :length] = self.kv[:, :, :, :, :length].index_select(2, keep_slots)
        self.bias[:n] = self.bias.index_select(0, keep_slots)

    def release(self) -> None:
        """Drop every buffer (freed once no forward holds a view of them)."""
        self.kv = None
        self.bias = None


@contextlib.contextmanager
def preserve_global_memory_buffer():
    """Restore megatron's ``GlobalMemoryBuffer`` entries to the tensors they held on entry."""
    from megatron.core import parallel_state

    try:
        buf = parallel_state.get_global_memory_buffer()
    except AssertionError:  # not initialised: nothing to preserve
        buf = None
    saved = dict(buf.buffer) if buf is not None else None
    try:
        yield
    finally:
        if buf is not None:
            buf.buffer.clear()
            buf.buffer.update(saved)
