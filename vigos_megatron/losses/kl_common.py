"""What both KL implementations share: the row-selected side terms, the tensor-parallel reductions,
and the per-token KL from the reduced statistics (see :mod:`vigos_megatron.losses.vocab_parallel_kl`
for the math). The torch implementation (:mod:`.torch_kl`) and the Triton one (:mod:`.triton_kl`)
sit on this module; :mod:`.vocab_parallel_kl` dispatches between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Default bytes of ONE fp32 work tensor ``[chunk, V/tp]``; about 6 are alive at once.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LogitRows:
    """One additive term of a side of the KL: ``coef * logits[index]``.

    Args:
        logits: ``[..., V/tp]`` vocabulary-sharded logits; leading dimensions are
            flattened to rows (a copy only if the tensor is not contiguous).
        index: optional ``int64 [n]`` row indices into the flattened leading
            dimensions, selecting the ``n`` tokens scored; ``None`` takes all rows.
        coef: scalar multiplier of this term.

    A side is a sequence of terms whose (selected) rows are summed, e.g. the VGS
    visual target ``log p_S(.|x) + log q_T(.|I,x) - log q_T(.|x)``; softmax is
    invariant to per-token constants, so summing logits equals summing log-probs.
    """

    logits: Tensor
    index: Tensor | None = None
    coef: float = 1.0


def kl_from_stats(m: Tensor, s: Tensor, reverse: Tensor):
    """Per-token ``(kl, lse_a, lse_b)`` from the reduced statistics."""
    lse_a = m[:, 0] + torch.log(s[:, 0])
    lse_b = m[:, 1] + torch.log(s[:, 1])
    kl_rev = s[:, 2] / s[:, 0] - lse_a + lse_b
    kl_fwd = s[:, 3] / s[:, 1] - lse_b + lse_a
    return torch.where(reverse, kl_rev, kl_fwd), lse_a, lse_b


def raise_non_finite(logits, n_a):
    for i, x in enumerate(logits):
        if not bool(torch.isfinite(x).all()):
            name = "student_logits" if i < n_a else "teacher_logits"
            raise ValueError(f"{name} (term {i}) contains non-finite values (inf or nan)")
    raise ValueError(
        "non-finite KL: student_logits or teacher_logits contain inf/nan on another "
        "tensor-parallel rank (or the temperature is too small for fp32)"
    )
