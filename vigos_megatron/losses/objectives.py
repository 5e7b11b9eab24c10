"""ViGOS, vanilla OPSD and VGS as megatron-core loss functions.

Each objective is a callable object; the schedule glue binds one micro-batch's
token description with ``functools.partial(loss, tokens)`` and returns it from
``forward_step_func``, so megatron calls ``loss_func(output_tensor)``, which returns
``(loss, num_tokens, report)``.

``output_tensor`` is what the last pipeline stage hands the loss for the scored rows (student
rows and teacher context rows; teacher rows computed without grad): vocabulary-sharded logits
``[..., V/tp]`` (a tensor, or :class:`~vigos_megatron.losses.scored_rows.LogitsOutput`), or the
final hidden states with the output weights that score them
(:class:`~vigos_megatron.losses.scored_rows.HiddenOutput`, no logits kept). ``tokens`` holds, for
each supervised completion token, the index of the student's prediction and of the teacher's
prediction among those rows (leading dimensions flattened; see ``vigos_megatron.schedule.assembly``).

Normalisation over data-parallel ranks and micro-batches
--------------------------------------------------------
The schedule must run with ``config.calculate_per_token_loss=True``: megatron then
sums the returned losses without dividing, and ``finalize_model_grads`` divides
every gradient once by ``N = sum of the returned num_tokens`` all-reduced over
micro-batches and data-parallel ranks. ViGOS wants each term to be a mean over
ITS OWN tokens of the global batch::

    L = sum_s lambda_s / N_s * sum_{t in s} KL_t ,   N = sum_s N_s

The per-segment counts ``N_s`` are known once rollouts are parsed, before the
schedule runs; :func:`global_segment_counts` all-reduces them over data-parallel
ranks. The loss of a micro-batch is ``sum_t w_{s(t)} KL_t`` with
``w_s = lambda_s * N / N_s`` and ``num_tokens`` = its supervised token count, so that
megatron's single division by ``N`` yields exactly ``L``. The reported loss
``sum(loss) / sum(num_tokens)`` is ``L`` as well. :func:`check_schedule_config`
rejects a config without per-token loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from vigos_megatron.collectives import all_reduce
from vigos_megatron.losses.scored_rows import scored_rows
from vigos_megatron.losses.vocab_parallel_kl import DEFAULT_CHUNK_BYTES, kl_rows

# ViGOS segments (ids used in DistillTokens.segment)
PERCEPTION, REASONING, REFERENCE = 0, 1, 2


@dataclass(frozen=True)
class Segment:
    """One term of a segmented distillation objective."""

    name: str
    #: "forward" = KL(q_T || p_S), "reverse" = KL(p_S || q_T)
    direction: str
    weight: float


def _check_token_indices(obj, names) -> None:
    """Every named field is an int64 1-D tensor with as many entries as the first."""
    n = getattr(obj, names[0]).numel()
    for name in names:
        t = getattr(obj, name)
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1 or t.numel() != n:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{type(obj).__name__}.{name}: expected int64 [{n}], got {got}")


@dataclass
class DistillTokens:
    """The supervised tokens of one micro-batch (built by the data/schedule glue).

    All index tensors are ``int64 [n]`` on the logits' device and index rows of the
    last stage's output flattened over its leading dimensions (``[R*S, V/tp]``).

    Attributes:
        student_index: row of the student's logits predicting each supervised token.
        teacher_index: row of the responsible teacher's logits for the same token.
        segment: segment id of each token (ViGOS: ``PERCEPTION``/``REASONING``/``REFERENCE``).

    Rollout statistics (validity, accuracy, token fractions) are the training loop's, from the
    rollouts themselves (:func:`vigos_megatron.training.metrics.rollout_stats`).
    """

    student_index: Tensor
    teacher_index: Tensor
    segment: Tensor

    def __post_init__(self):
        _check_token_indices(self, ("student_index", "teacher_index", "segment"))


@dataclass
class VGSTokens:
    """Completion tokens of one micro-batch for VGS: four rows per token (``int64 [n]`` each).

    ``student_image_index``/``student_text_index``: the student's predictions with the
    image (``I,x``) and without it (``x``); ``teacher_image_index``/``teacher_text_index``
    the teacher's. All index the last stage's output flattened over its leading dimensions.
    ``trajectory``: the rollout of each token within the micro-batch (0..B-1; needed by
    ``reduction: sequence``, None otherwise allowed).
    """

    student_image_index: Tensor
    student_text_index: Tensor
    teacher_image_index: Tensor
    teacher_text_index: Tensor
    trajectory: Tensor | None = None

    def __post_init__(self):
        names = ("student_image_index", "student_text_index", "teacher_image_index", "teacher_text_index")
        _check_token_indices(self, names + (("trajectory",) if self.trajectory is not None else ()))


def check_schedule_config(config) -> None:
    """Raise unless the megatron config uses per-token loss normalisation (see module doc)."""
    if not getattr(config, "calculate_per_token_loss", False):
        raise ValueError(
            "the distillation objectives need calculate_per_token_loss=True in the megatron "
            "model config (their normalisation is folded into the loss)"
        )


def global_segment_counts(segments_per_microbatch: Sequence[Tensor], num_segments: int, dp_group=None) -> Tensor:
    """``float64 [num_segments]``: tokens of each segment over all micro-batches and DP ranks.

    Call once per step, before the schedule runs, with the ``segment`` tensors of this
    rank's micro-batches. One all-reduce over ``dp_group`` (``None``: no data parallelism).
    """
    device = segments_per_microbatch[0].device if segments_per_microbatch else torch.device("cpu")
    counts = torch.zeros(num_segments, dtype=torch.float64, device=device)
    for seg in segments_per_microbatch:
        if seg.numel():
            counts += torch.bincount(seg, minlength=num_segments)[:num_segments].to(torch.float64)
    return all_reduce(counts, dp_group)


def global_trajectory_counts(trajectories_per_microbatch: Sequence[Tensor], dp_group=None) -> Tensor:
    """``float64 [2]``: ``(N, M)``, the completion tokens and the trajectories (rollouts with at least
    one token) over all micro-batches and DP ranks, from the ``VGSTokens.trajectory`` tensors of this
    rank's micro-batches. One all-reduce over ``dp_group`` (``None``: no data parallelism)."""
    device = trajectories_per_microbatch[0].device if trajectories_per_microbatch else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for t in trajectories_per_microbatch:
        counts[0] += t.numel()
        counts[1] += torch.unique(t).numel()
    return all_reduce(counts, dp_group)


def sequence_token_weights(trajectory: Tensor, global_counts: Tensor) -> Tensor:
    """``float64 [n]``: ``w_t = N / (M * |tau(t)|)`` for the tokens of one micro-batch.

    ``trajectory``: int64 ``[n]``, each token's rollout (all of a rollout's tokens are in one
    micro-batch); ``global_counts``: ``(N, M)`` of :func:`global_trajectory_counts`. Megatron divides
    the summed loss once by ``N``, so ``sum_t w_t l_t / N = 1/M sum_tau 1/|tau| sum_{t in tau} l_t``.
    """
    length = torch.bincount(trajectory)[trajectory].to(torch.float64)
    n_tokens, n_trajectories = global_counts.to(device=trajectory.device, dtype=torch.float64)
    return n_tokens / (n_trajectories * length)


def _pair(a, b, device) -> Tensor:
    return torch.stack([torch.as_tensor(a, dtype=torch.float64, device=device).reshape(()),
                        torch.as_tensor(b, dtype=torch.float64, device=device).reshape(())])


class SegmentedDistillationLoss:
    """``L = sum_s lambda_s / N_s * sum_{t in s} clip(KL_s(t))`` over the global batch.

    Args:
        segments: the terms; ``DistillTokens.segment`` indexes this sequence.
        global_counts: ``[len(segments)]`` tokens of each segment over the global batch
            (from :func:`global_segment_counts`).
        temperature, clip: as in :func:`~vigos_megatron.losses.vocab_parallel_kl.vocab_parallel_kl`.
        tp_group: tensor-parallel group sharding the vocabulary.
        impl: KL implementation, ``"auto"`` | ``"torch"`` | ``"triton"`` (see ``kl_rows``).
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        global_counts: Tensor,
        *,
        temperature: float = 1.0,
        clip: float | None = None,
        tp_group=None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        impl: str = "auto",
    ):
        if len(global_counts) != len(segments):
            raise ValueError(f"global_counts has {len(global_counts)} entries for {len(segments)} segments")
        for s in segments:
            if s.direction not in ("forward", "reverse"):
                raise ValueError(f"segment {s.name}: direction must be 'forward' or 'reverse'")
        self.segments = tuple(segments)
        counts = global_counts.to(torch.float64)
        total = counts.sum()
        lam = torch.tensor([s.weight for s in segments], dtype=torch.float64, device=counts.device)
        self.token_weight = torch.where(counts > 0, lam * total / counts.clamp(min=1), torch.zeros_like(lam))
        self.reverse_of_segment = torch.tensor([s.direction == "reverse" for s in segments])
        self.temperature = temperature
        self.clip = clip if clip is not None and clip > 0 else None
        self.tp_group = tp_group
        self.chunk_bytes = chunk_bytes
        self.impl = impl

    def __call__(self, tokens: DistillTokens, output_tensor):
        rows = scored_rows(output_tensor)
        device = rows.device
        seg = tokens.segment.to(device)
        n = seg.numel()
        kl = kl_rows(
            rows.student(tokens.student_index),
            rows.teacher(tokens.teacher_index),
            reverse=self.reverse_of_segment.to(device)[seg],
            temperature=self.temperature,
            clip=self.clip,
            tp_group=self.tp_group,
            chunk_bytes=self.chunk_bytes,
            impl=self.impl,
        )
        w = self.token_weight.to(device=device, dtype=torch.float32)[seg]
        loss = (w * kl).sum()
        report = {}
        with torch.no_grad():
            k = len(self.segments)
            sums = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, seg, kl.detach().double())
            cnts = torch.bincount(seg, minlength=k)[:k].double() if n else torch.zeros(k, dtype=torch.float64, device=device)
            for i, s in enumerate(self.segments):
                report[f"kl/{s.name}"] = torch.stack([sums[i], cnts[i]])
            clipped = (kl.detach() >= self.clip).sum() if self.clip is not None else 0
            report["clip_fraction"] = _pair(clipped, n, device)
        num_tokens = torch.tensor(n, dtype=torch.int, device=device)
        return loss, num_tokens, report


class VGSLoss:
    """Visual Gradient Steering (seed 003) on vocabulary-sharded logits or hidden states.

    Per completion token ``t`` (student ``p_S``, teacher ``q_T``, image ``I``, text ``x``)::

        l_std = KL(p_S(.|I,x) || q_T(.|I,x))
        log q* = log_softmax(log p_S(.|x) + log q_T(.|I,x) - log q_T(.|x))
        l_vis = KL(p_S(.|I,x) || q*)
        VDS   = KL(q_T(.|I,x) || q_T(.|x))
        l_lp  = 1[VDS > Q_p(VDS)] * KL(p_S(.|x) || q_T(.|x))
        L     = eta * mean_t (l_std + gamma_t * l_vis + lambda * l_lp)

    ``Q_p`` is the quantile over the micro-batch's completion tokens (``quantile_scope: micro_batch``,
    known on the last stage) or the step's ``thresholds`` (``global``: over the global batch,
    :func:`~vigos_megatron.losses.vds_quantiles.global_vds_quantiles`).
    ``reduction: token``: ``mean_t`` is over all completion tokens of the global batch
    (megatron's per-token normalisation; ``num_tokens`` = ``n``); ``reduction: sequence``: each
    token is weighted by :func:`sequence_token_weights` (``global_counts`` = ``(N, M)``), so that
    ``mean_t`` becomes the mean over trajectories of each trajectory's token mean. The reported
    ``vgs/*`` terms are token means either way. ``p_S(.|x)`` inside ``q*`` is detached
    unless ``detach_text_student_in_target=False``. ``q*`` is never materialised: the KL
    sums the three rows chunk by chunk (from hidden states: the two teacher rows are one GEMM on
    the difference of their hidden states).
    """

    def __init__(self, cfg, *, global_counts: Tensor | None = None, thresholds: Tensor | None = None,
                 std_weight: float = 1.0, tp_group=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, impl: str = "auto"):
        """``cfg``: :class:`~vigos_megatron.objectives.vgs.VGSLossConfig`; ``global_counts``: ``(N, M)`` of
        :func:`global_trajectory_counts`, needed by ``reduction: sequence``; ``thresholds``: float32 ``[3]``, the
        step's VDS quantiles at ``(lp_quantile, adaptive_low_quantile, adaptive_high_quantile)``, needed by
        ``quantile_scope: global`` on the last stage (the only one that calls the loss); ``std_weight``: the
        factor of ``l_std`` (1; 0 in the eta diagnostics' ``l_vis`` probe)."""
        if cfg.reduction == "sequence" and global_counts is None:
            raise ValueError("VGSLoss: reduction 'sequence' needs global_counts (global_trajectory_counts)")
        self.cfg = cfg
        self.global_counts = global_counts
        self.thresholds = thresholds
        self.std_weight = std_weight
        self.tp_group = tp_group
        self.chunk_bytes = chunk_bytes
        self.impl = impl

    def _kl(self, a, b, clip=True):
        return kl_rows(
            a, b, reverse=True, temperature=self.cfg.temperature,
            clip=self.cfg.clip if clip else None, tp_group=self.tp_group, chunk_bytes=self.chunk_bytes,
            impl=self.impl,
        )

    def token_vds(self, rows, tokens: VGSTokens) -> Tensor:
        """float32 ``[n]``: ``VDS_t = KL(q_T(.|I,x) || q_T(.|x))`` of each token (teacher rows only, no grad)."""
        with torch.no_grad():
            return self._kl(rows.teacher(tokens.teacher_image_index), rows.teacher(tokens.teacher_text_index),
                            clip=False)

    def _global_thresholds(self) -> Tensor:
        if self.thresholds is None:
            raise ValueError("VGSLoss: quantile_scope 'global' needs the step's thresholds (global_vds_quantiles)")
        return self.thresholds

    def gamma_per_token(self, vds: Tensor) -> Tensor:
        c = self.cfg
        if not c.adaptive_gamma or vds.numel() == 0:
            return torch.full_like(vds, c.gamma)
        if c.quantile_scope == "global":
            lo, hi = self._global_thresholds().to(device=vds.device, dtype=vds.dtype)[1:]
        else:
            lo, hi = torch.quantile(vds, torch.tensor([c.adaptive_low_quantile, c.adaptive_high_quantile],
                                                      dtype=vds.dtype, device=vds.device))
        return torch.where(vds > hi, c.gamma, torch.where(vds > lo, c.gamma / 2, 0.0)).to(vds.dtype)

    def __call__(self, tokens: VGSTokens, output_tensor):
        c = self.cfg
        rows = scored_rows(output_tensor)
        dev = rows.device
        si, sx = tokens.student_image_index, tokens.student_text_index
        ti, tx = tokens.teacher_image_index, tokens.teacher_text_index
        n = si.numel()
        vds = self.token_vds(rows, tokens)
        l_std = self._kl(rows.student(si), rows.teacher(ti))
        target = [
            rows.student(sx, detach=c.detach_text_student_in_target),
            rows.teacher(ti),
            rows.teacher(tx, coef=-1.0),
        ]
        l_vis = self._kl(rows.student(si), target)
        gamma_t = self.gamma_per_token(vds)
        if n:
            if c.quantile_scope == "global":
                threshold = self._global_thresholds().to(device=vds.device, dtype=vds.dtype)[0]
            else:
                threshold = torch.quantile(vds, c.lp_quantile)
            selected = (vds > threshold).nonzero().squeeze(1)
        else:
            selected = torch.zeros(0, dtype=torch.int64, device=dev)
        l_lp = self._kl(rows.student(sx[selected]), rows.teacher(tx[selected]))
        if c.reduction == "sequence":
            w = sequence_token_weights(tokens.trajectory.to(dev), self.global_counts).to(l_std.dtype)
            loss = c.eta * ((w * (self.std_weight * l_std + gamma_t * l_vis)).sum()
                            + c.lambda_lp * (w[selected] * l_lp).sum())
        else:
            loss = c.eta * ((self.std_weight * l_std + gamma_t * l_vis).sum() + c.lambda_lp * l_lp.sum())
        report = {
            "vgs/l_std": _pair(l_std.detach().sum(), n, dev),
            "vgs/l_vis": _pair(l_vis.detach().sum(), n, dev),
            "vgs/l_lp": _pair(l_lp.detach().sum(), n, dev),
            "vgs/vds": _pair(vds.sum(), n, dev),
            "vgs/lp_selected_fraction": _pair(selected.numel(), n, dev),
        }
        return loss, torch.tensor(n, dtype=torch.int, device=dev), report
