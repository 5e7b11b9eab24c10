"""The KV cache of one generation round: megatron-core's ``StaticInferenceContext``, compacted as rows finish.

Megatron's attention layers allocate, on their first forward with the context, one key and one
value buffer per layer of shape ``[max_sequence_length, max_batch_size, kv_heads/tp, head_dim]``
(model dtype, on ``torch.cuda.current_device()``, i.e. the model's device) in
``context.key_value_memory_dict[layer_number]``. A forward with ``b`` rows and ``s`` tokens writes
rows ``[batch_size_offset, batch_size_offset + b)`` and positions
``[sequence_len_offset, sequence_len_offset + s)``, then attends over positions
``[0, sequence_len_offset + s)``: keys are stored *before* rotary embedding and rotated on
every step with the rotary table sliced to ``[:sequence_end]`` (queries ``[start:end]``), which
is why the caller passes mrope positions for the whole prefix.

Live rows are kept in the first slots: :meth:`RoundKVCache.compact` moves the rows still
generating to the front so that a decode step runs on ``[0, n_live)`` only (finished rows stop
costing compute). :meth:`RoundKVCache.release` drops every buffer.

:func:`preserve_global_memory_buffer` restores megatron's process-wide ``GlobalMemoryBuffer``
(the local attention's ``[b*heads, sq, sk]`` score workspace, which grows to the largest request
and is never freed) to exactly what it held before generation, so a long prefill does not leave
a larger workspace behind.
"""

from __future__ import annotations

import contextlib

import torch


class RoundKVCache:
    """Static KV cache for ``max_batch_size`` rows of at most ``max_sequence_length`` tokens."""

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"KV cache needs max_batch_size >= 1 and max_sequence_length >= 1, "
                             f"got {max_batch_size}, {max_sequence_length}")
        self.context = StaticInferenceContext(max_batch_size, max_sequence_length)

    # ----------------------------------------------------------------- what the attention layers read

    def set_prefill(self, row_offset: int) -> None:
        """Next forward writes rows ``[row_offset, ...)`` from position 0 (a prompt chunk)."""
        ctx = self.context
        ctx.enable_prefill_mode()
        ctx.sequence_len_offset = 0
        ctx.batch_size_offset = row_offset

    def set_decode(self, position: int) -> None:
        """Next forward writes one token per live row at cache column ``position`` (rows from slot 0)."""
        ctx = self.context
        ctx.enable_decode_mode()
        ctx.sequence_len_offset = position
        ctx.batch_size_offset = 0

    # ----------------------------------------------------------------- bookkeeping

    def buffers(self) -> list[torch.Tensor]:
        return [t for kv in self.context.key_value_memory_dict.values() for t in kv]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def compact(self, keep_slots: torch.Tensor, length: int) -> None:
        """Move slots ``keep_slots`` (int64 ``[n]``, increasing) to slots ``[0, n)`` in every layer's
        K and V, copying the ``length`` cache positions written so far."""
        n = int(keep_slots.numel())
        for k, v in self.context.key_value_memory_dict.values():
            idx = keep_slots.to(k.device)
            k[:length, :n] = k[:length].index_select(1, idx)
            v[:length, :n] = v[:length].index_select(1, idx)

    def release(self) -> None:
        """Drop every key/value buffer (they are freed once no forward holds a view of them)."""
        self.context.key_value_memory_dict.clear()
        self.context.reset()


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
