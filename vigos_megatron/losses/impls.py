"""The KL implementations :func:`~vigos_megatron.losses.vocab_parallel_kl.kl_rows` dispatches to
(``loss.impl``): ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"``, ``"triton"``; and the
default of ``loss.chunk_bytes``."""

KL_IMPLS = ("auto", "torch", "triton")

#: Default bytes of ONE fp32 work tensor inside the KL (a ``[chunk, V/tp]`` chunk of the logits path; a tile
#: or a weight block from hidden states); about 6 (logits) or 10 (hidden states) are alive at once.
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
