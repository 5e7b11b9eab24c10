"""Stage 2 of an iteration: rollouts -> the rows each objective needs -> stream micro-batches -> its loss.

The objective (:mod:`vigos_megatron.objectives`, ``loss.objective``) says which teacher contexts a
rollout contributes and which tokens they score (byte-exact contexts), how a micro-batch is packed,
and builds the step's loss (e.g. ViGOS's per-term token counts all-reduced over the data-parallel
group before the schedule runs). Each micro-batch is padded to its own longest row (per slot,
rounded up to ``train.seq_multiple``); with ``train.group_by_length`` rollouts of similar length
share one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from vigos_megatron.training.rollouts import Rollout

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import PretrainConfig
    from vigos_megatron.data.contexts import PrefixCut
    from vigos_megatron.schedule.assembly import AssembledRollout
    from vigos_megatron.schedule.batch import StreamBatch


@dataclass
class StepInputs:
    """The micro-batches of one step and its loss function (``ReportedLoss``)."""

    batches: "list[StreamBatch]"
    #: ``ReportedLoss``: ``(tokens, output) -> (loss, num_tokens, report)``
    loss_fn: Callable
    #: the rows and scored tokens of each rollout, in order (``AssembledRollout``)
    assembled: "list[AssembledRollout]"


def fill_micro_batches(assembled: list, vision: list, micro_batch_size: int) -> int:
    """Complete the last micro-batch (dropped samples leave it short) with copies of the last rollout
    that supervise no token, so every micro-batch of the schedule call has the same rows. Returns
    how many fillers were added (they cost compute, never loss)."""
    import dataclasses

    missing = -len(assembled) % micro_batch_size
    if missing and assembled:
        filler = dataclasses.replace(assembled[-1], scores=[], completion_tokens=0, correct=None)
        assembled += [filler] * missing
        vision += [vision[-1]] * missing
    return missing


def build_step_inputs(rollouts: list[Rollout], cfg: "PretrainConfig", *, hf_config, pad_id: int, cut: "PrefixCut",
                      model: list, dp_group, tp_group) -> StepInputs:
    """Micro-batches of ``cfg.train.micro_batch_size`` rollouts and the objective's loss over the global batch
    (byte-exact teacher contexts: ``cut`` is the tokenizer's :class:`~vigos_megatron.data.contexts.PrefixCut`).
    When the objective has a teacher pass (VGS with ``quantile_scope: global``) it runs first on ``model``
    (this rank's stage), over all of the step's micro-batches (:func:`~.update.teacher_pass_reports`)."""
    from vigos_megatron import objectives
    from vigos_megatron.schedule.batch import make_stream_batches
    from vigos_megatron.schedule.forward_step import ReportedLoss
    from vigos_megatron.training.update import teacher_pass_reports

    objective = objectives.get(cfg.loss.objective)
    assembled = [objective.assemble(r, cfg, cut) for r in rollouts]
    rolled = list(assembled)
    vision = [r.sample for r in rollouts]
    fill_micro_batches(assembled, vision, cfg.train.micro_batch_size)
    batches = make_stream_batches(
        assembled, vision, rollouts_per_micro_batch=cfg.train.micro_batch_size,
        pad_id=pad_id, image_token_id=hf_config.image_token_id,
        spatial_merge_size=hf_config.vision_config.spatial_merge_size, multiple=cfg.train.seq_multiple,
        pack=objective.pack, group_by_length=cfg.train.group_by_length,
    )
    settings = getattr(cfg.loss, objective.name)
    kl = {"chunk_bytes": cfg.loss.chunk_bytes, "impl": cfg.loss.impl, "tp_group": tp_group}
    teacher_pass = objective.teacher_pass(settings, **kl)
    reports = None if teacher_pass is None else teacher_pass_reports(model, batches, teacher_pass)
    loss = objective.build_loss(settings, [b.tokens for b in batches], dp_group=dp_group, teacher_reports=reports, **kl)
    return StepInputs(batches=batches, loss_fn=ReportedLoss(loss), assembled=rolled)


def build_gradient_probes(cfg: "PretrainConfig", batches: list, step: int, *, dp_group, tp_group) -> dict:
    """The objective's gradient probes of step ``step`` over ``batches`` (``{}`` when none is due;
    :meth:`~vigos_megatron.objectives.base.Objective.gradient_probes`)."""
    from vigos_megatron import objectives

    objective = objectives.get(cfg.loss.objective)
    return objective.gradient_probes(getattr(cfg.loss, objective.name), step, [b.tokens for b in batches],
                                     chunk_bytes=cfg.loss.chunk_bytes, impl=cfg.loss.impl, dp_group=dp_group,
                                     tp_group=tp_group)
