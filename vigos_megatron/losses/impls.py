"""The KL implementations :func:`~vigos_megatron.losses.vocab_parallel_kl.kl_rows` dispatches to
(``loss.impl``): ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"``, ``"triton"``."""

KL_IMPLS = ("auto", "torch", "triton")
