"""Visual Gradient Steering (``../shared/METHOD.md`` section 4): the student and the teacher each with
and without the image; ``L = eta * (l_std + gamma * l_vis + lambda * l_lp)`` on every completion token.

Rows per rollout: two student slots (``I,x`` and ``x``) and two teacher slots. The teacher reads
the privileged OPSD contexts (``opsd`` / ``opsd_text``, self-distillation setting (b)) or, with a
separate teacher checkpoint (``model.teacher``, settings (a) and (c)), the student's own contexts.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.errors import ConfigError, require_at_least, require_one_of, require_positive

#: ``loss.vgs.reduction``: ``token`` = mean over every completion token of the global batch (TRL's, the
#: paper's experiments); ``sequence`` = mean over each trajectory's tokens, then over the global batch's
#: trajectories (the paper's equations, ``1/|tau| sum_t``)
REDUCTIONS = ("token", "sequence")
from vigos_megatron.objectives.base import Objective, StreamRows


@dataclass
class VGSLossConfig:
    """Visual Gradient Steering (seed 003): L = eta * (l_std + gamma * l_vis + lambda * l_lp)."""

    eta: float = 0.41
    gamma: float = 2.0
    lambda_lp: float = 0.01
    #: VDS quantile above which the language-preservation term is active (micro-batch tokens)
    lp_quantile: float = 0.7
    #: paper appendix E: gamma_t = 0 below Q_low, gamma/2 between, gamma above Q_high
    adaptive_gamma: bool = False
    adaptive_low_quantile: float = 0.4
    adaptive_high_quantile: float = 0.7
    #: p_S(.|x) inside the visual target q* is a constant (no gradient through the target)
    detach_text_student_in_target: bool = True
    temperature: float = 1.0
    #: off unless configured (<= 0 disables)
    clip: float = 0.0
    #: how the per-token loss is averaged over the global batch (:data:`REDUCTIONS`)
    reduction: str = "token"

    def validate(self) -> None:
        for name in ("lp_quantile", "adaptive_low_quantile", "adaptive_high_quantile"):
            q = getattr(self, name)
            if not 0.0 <= q <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {q}")
        if self.adaptive_low_quantile > self.adaptive_high_quantile:
            raise ConfigError("adaptive_low_quantile: must be <= adaptive_high_quantile")
        require_positive(self, "temperature")
        require_at_least(self, 0, "eta", "gamma", "lambda_lp")
        require_one_of(self, "reduction", REDUCTIONS)


def teacher_contexts(cfg) -> tuple[str, str]:
    """The teacher's (image, text-only) contexts under ``cfg``."""
    return ("student", "student_text") if cfg.own_teacher else ("opsd", "opsd_text")


class VGS(Objective):
    name = "vgs"
    settings = VGSLossConfig
    terms = ("vgs",)
    expected_terms = ()
    rows = StreamRows(stream=(2, 2), image=(1, 1), logits=(2, 2))

    def contexts(self, cfg):
        return tuple(dict.fromkeys(("student", "student_text", *teacher_contexts(cfg))))

    def assemble(self, rollout, cfg, cut):
        from vigos_megatron.schedule.assembly import assemble_vgs

        image_ctx, text_ctx = teacher_contexts(cfg)
        return assemble_vgs(rollout.sample["contexts"], rollout.completion, teacher_image_context=image_ctx,
                            teacher_text_context=text_ctx, correct=rollout.correct)

    def pack(self, group, *, pad_id, multiple):
        from vigos_megatron.schedule.assembly import pack_vgs

        return pack_vgs(group, pad_id=pad_id, multiple=multiple)

    def build_loss(self, settings, tokens, *, chunk_bytes, impl, dp_group, tp_group):
        from vigos_megatron.losses.objectives import VGSLoss, global_trajectory_counts
        from vigos_megatron.runtime import compute_device

        counts = None
        if settings.reduction == "sequence":
            # counted on the backend's device: the DP all-reduce runs on NCCL where CUDA is used
            counts = global_trajectory_counts([t.trajectory.to(compute_device()) for t in tokens], dp_group=dp_group)
        return VGSLoss(settings, global_counts=counts, tp_group=tp_group, chunk_bytes=chunk_bytes, impl=impl)


OBJECTIVE = VGS()
