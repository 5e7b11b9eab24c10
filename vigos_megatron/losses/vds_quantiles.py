"""VGS's VDS quantiles over the step's global batch (``loss.vgs.quantile_scope: global``).

``l_lp = 1[VDS_t > Q_p]`` and the adaptive ``gamma_t`` compare each token's
``VDS_t = KL(q_T(.|I,x) || q_T(.|x))`` with quantiles of the VDS. Over the global batch these are
unknown when the first micro-batch's loss runs, so the step first runs the teacher alone over all of
its micro-batches (one forward-only schedule call, :func:`~vigos_megatron.training.update.teacher_pass_reports`):
:class:`TeacherVDSPass` returns each micro-batch's ``VDS_t`` on the last stage, and
:func:`global_vds_quantiles` gathers them over the data-parallel group and takes the exact quantiles
(``torch.quantile``, linear interpolation, as the micro-batch scope) once; the step's loss reads them
(:class:`~vigos_megatron.losses.objectives.VGSLoss` ``thresholds``). The pass computes ``VDS_t`` with the
loss's own KL (:meth:`~vigos_megatron.losses.objectives.VGSLoss.token_vds`) from the same teacher rows, so
the values compared with the thresholds are those the thresholds were taken over.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from vigos_megatron.collectives import all_gather_rows
from vigos_megatron.losses.scored_rows import scored_rows

#: report key of :class:`TeacherVDSPass`: the micro-batch's ``VDS_t``, float32 ``[n]``
VDS_KEY = "vds"


def quantile_levels(cfg) -> tuple[float, float, float]:
    """``(lp_quantile, adaptive_low_quantile, adaptive_high_quantile)`` of a ``VGSLossConfig``: the order of
    ``VGSLoss.thresholds``."""
    return cfg.lp_quantile, cfg.adaptive_low_quantile, cfg.adaptive_high_quantile


class TeacherVDSPass:
    """The loss callable of the teacher pass: ``(tokens, output) -> (0, n, {VDS_KEY: VDS_t [n]})`` per micro-batch.

    ``loss``: the step's :class:`~vigos_megatron.losses.objectives.VGSLoss` (its KL settings and TP group).
    ``output`` holds teacher rows only (``StreamBatch.teacher_only``); ``tokens``' teacher indices index them.
    """

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, tokens, output_tensor):
        rows = scored_rows(output_tensor)
        vds = self.loss.token_vds(rows, tokens)
        return (torch.zeros((), device=rows.device), torch.tensor(vds.numel(), dtype=torch.int, device=rows.device),
                {VDS_KEY: vds})


def global_vds_quantiles(reports: Sequence[dict], levels: Sequence[float], dp_group) -> Tensor | None:
    """float32 ``[len(levels)]``: the quantiles at ``levels`` of ``VDS_t`` over every completion token of the step.

    ``reports``: the last stage's :class:`TeacherVDSPass` reports of this rank's micro-batches (``[]`` on other
    stages: returns None, they never call the loss). The values are gathered over ``dp_group`` (the last stage's
    data-parallel group; its tensor-parallel ranks hold equal values); without any token the thresholds are NaN
    (nothing is selected, no token has a loss).
    """
    if not reports:
        return None
    vds = all_gather_rows(torch.cat([r[VDS_KEY].reshape(-1).float() for r in reports]), dp_group)
    q = torch.tensor(list(levels), dtype=vds.dtype, device=vds.device)
    return torch.quantile(vds, q) if vds.numel() else torch.full_like(q, float("nan"))
