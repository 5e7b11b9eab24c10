"""Visual Gradient Steering (``../shared/METHOD.md`` section 4): the student and the teacher each with
and without the image; ``L = eta * (l_std + gamma * l_vis + lambda * l_lp)`` on every completion token.

Rows per rollout: two student slots (``I,x`` and ``x``) and two teacher slots. The teacher reads
the privileged OPSD contexts (``opsd`` / ``opsd_text``, self-distillation setting (b)) or, with a
separate teacher checkpoint (``model.teacher``, settings (a) and (c)), the student's own contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vigos_megatron.errors import ConfigError, require_at_least, require_one_of, require_positive
from vigos_megatron.objectives.base import Objective, StreamRows

#: ``loss.vgs.reduction``: ``token`` = mean over every completion token of the global batch (TRL's, the
#: paper's experiments); ``sequence`` = mean over each trajectory's tokens, then over the global batch's
#: trajectories (the paper's equations, ``1/|tau| sum_t``)
REDUCTIONS = ("token", "sequence")

#: ``loss.vgs.quantile_scope``: the tokens the VDS quantiles (``lp_quantile``, ``adaptive_*_quantile``) are taken
#: over. ``micro_batch``: the micro-batch's completion tokens (known on the last stage, no extra work);
#: ``global``: every completion token of the step's global batch (all micro-batches, all data-parallel ranks),
#: exact, from a forward-only pass of the teacher over the step's micro-batches before the schedule
#: (:func:`~vigos_megatron.training.update.teacher_pass_reports`)
QUANTILE_SCOPES = ("micro_batch", "global")


@dataclass
class VGSLossConfig:
    """Visual Gradient Steering (seed 003): L = eta * (l_std + gamma * l_vis + lambda * l_lp)."""

    eta: float = 0.41
    gamma: float = 2.0
    lambda_lp: float = 0.01
    #: VDS quantile above which the language-preservation term is active (over ``quantile_scope``'s tokens)
    lp_quantile: float = 0.7
    #: paper appendix E: gamma_t = 0 below Q_low, gamma/2 between, gamma above Q_high
    adaptive_gamma: bool = False
    adaptive_low_quantile: float = 0.4
    adaptive_high_quantile: float = 0.7
    #: the tokens of the VDS quantiles (:data:`QUANTILE_SCOPES`). ``global`` costs, per step, one more forward of
    #: the teacher's two rows (``I,x`` and ``x``; no student row, no autograd) over every micro-batch: ~4 P_t FLOPs
    #: per token of a row pair (2 P_t per row; P_t, P_s: the parameters) against ~4 P_t + 16 P_s for the update
    #: (the teacher's rows forward; the student's forward, recompute, backward at full recompute), i.e. ~+50% at
    #: 8B/2B, ~+33% at 8B/4B; and one all-gather of a float32 per completion token over the data-parallel group.
    #: No state crosses steps.
    quantile_scope: str = "micro_batch"
    #: p_S(.|x) inside the visual target q* is a constant (no gradient through the target)
    detach_text_student_in_target: bool = True
    temperature: float = 1.0
    #: off unless configured (<= 0 disables)
    clip: float = 0.0
    #: how the per-token loss is averaged over the global batch (:data:`REDUCTIONS`)
    reduction: str = "token"
    #: every K steps (0: off) log ||grad l_std||, ||grad l_vis||, their cosine and the implied eta
    #: (:func:`eta_diagnostics`); three extra forward+backward passes over that step's micro-batches
    eta_diagnostics_interval: int = 0

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
        require_one_of(self, "quantile_scope", QUANTILE_SCOPES)
        require_at_least(self, 0, "eta_diagnostics_interval")


#: the gradient probes of the eta diagnostics: ``(l_std factor, gamma)`` of a loss ``l_std * a + gamma * l_vis``
#: (eta 1, lambda 0, constant gamma; the configured reduction and target detachment)
ETA_PROBES = {"std": (1.0, 0.0), "vis": (0.0, 1.0), "std+vis": (1.0, 1.0)}


def eta_diagnostics(norms: dict, gamma: float) -> dict:
    """Paper Eq. 15 from the probes' gradient norms ``a = ||g_std||``, ``b = ||g_vis||``, ``s = ||g_std + g_vis||``.

    ``g_std . g_vis = (s^2 - a^2 - b^2) / 2``; ``cosine = dot / (a b)``;
    ``eta = a / ||g_std + gamma g_vis|| = a / sqrt(a^2 + 2 gamma dot + gamma^2 b^2)`` (nan where a norm is 0).
    """
    a, b, s = norms["std"], norms["vis"], norms["std+vis"]
    dot = (s * s - a * a - b * b) / 2
    combined = max(a * a + 2 * gamma * dot + gamma * gamma * b * b, 0.0) ** 0.5
    nan = float("nan")
    return {"vgs/grad_norm_std": a, "vgs/grad_norm_vis": b, "vgs/grad_cosine": dot / (a * b) if a * b > 0 else nan,
            "vgs/implied_eta": a / combined if combined > 0 else nan}


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

    def teacher_pass(self, settings, *, chunk_bytes, impl, tp_group):
        if settings.quantile_scope != "global":
            return None
        from vigos_megatron.losses.objectives import VGSLoss
        from vigos_megatron.losses.vds_quantiles import TeacherVDSPass

        return TeacherVDSPass(VGSLoss(settings, tp_group=tp_group, chunk_bytes=chunk_bytes, impl=impl))

    def build_loss(self, settings, tokens, *, chunk_bytes, impl, dp_group, tp_group, teacher_reports=None,
                   std_weight=1.0):
        from vigos_megatron.losses.objectives import VGSLoss, global_trajectory_counts
        from vigos_megatron.losses.vds_quantiles import global_vds_quantiles, quantile_levels
        from vigos_megatron.runtime import compute_device

        counts = thresholds = None
        if settings.reduction == "sequence":
            # counted on the backend's device: the DP all-reduce runs on NCCL where CUDA is used
            counts = global_trajectory_counts([t.trajectory.to(compute_device()) for t in tokens], dp_group=dp_group)
        if settings.quantile_scope == "global":
            if teacher_reports is None:
                raise ValueError("VGS: quantile_scope 'global' needs the reports of its teacher pass")
            thresholds = global_vds_quantiles(teacher_reports, quantile_levels(settings), dp_group)
        return VGSLoss(settings, global_counts=counts, thresholds=thresholds, std_weight=std_weight,
                       tp_group=tp_group, chunk_bytes=chunk_bytes, impl=impl)

    def gradient_probes(self, settings, step, tokens, *, chunk_bytes, impl, dp_group, tp_group):
        k = settings.eta_diagnostics_interval
        if not k or step % k:
            return {}
        # lambda 0 and a constant gamma: no VDS quantile enters a probe, whatever its scope
        return {name: self.build_loss(replace(settings, eta=1.0, gamma=gamma, lambda_lp=0.0, adaptive_gamma=False,
                                              quantile_scope="micro_batch"),
                                      tokens, chunk_bytes=chunk_bytes, impl=impl, dp_group=dp_group,
                                      tp_group=tp_group, std_weight=std)
                for name, (std, gamma) in ETA_PROBES.items()}

    def probe_metrics(self, settings, norms):
        return eta_diagnostics(norms, settings.gamma) if norms else {}


OBJECTIVE = VGS()
