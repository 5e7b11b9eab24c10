"""Stage 2 of an iteration: rollouts -> the teacher contexts each row needs -> stream micro-batches
-> the step's objective.

Contexts per objective (``../shared/METHOD.md``; never a context that no loss term reads):

* ViGOS: perception + reasoning teachers for valid rollouts, the reference teacher for
  invalid ones (:func:`~vigos_megatron.rollout.assembly.assemble_vigos`);
* OPSD: the privileged teacher on every completion token;
* VGS: student with/without the image, teacher with/without it: the privileged contexts
  (``opsd``/``opsd_text``, self-distillation setting (b)) or, with a separate teacher
  checkpoint (``model.teacher_hf_path``, setting (a)), the student's own contexts.

Each micro-batch is padded to its own longest row (per slot, rounded up to
``train.seq_multiple``); with ``train.group_by_length`` rollouts of similar length share one. The objective's per-term token counts are all-reduced over the
data-parallel group before the schedule runs (:func:`~vigos_megatron.losses.objectives.global_segment_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.training.rollouts import Rollout


@dataclass
class StepInputs:
    """The micro-batches of one step and its loss function (``ReportedLoss``)."""

    batches: list
    loss_fn: object
    #: supervised tokens per term over the global batch (empty for VGS)
    global_counts: list[float]
    #: the rows and scored tokens of each rollout, in order (``AssembledRollout``)
    assembled: list


def assemble(rollouts: list[Rollout], cfg, cut) -> list:
    """The rows and supervised tokens of every rollout for ``cfg.loss.objective`` (byte-exact teacher
    contexts: ``cut`` is the tokenizer's :class:`~vigos_megatron.data.contexts.PrefixCut`)."""
    from vigos_megatron.rollout.assembly import assemble_opsd, assemble_vgs, assemble_vigos

    objective = cfg.loss.objective
    out = []
    for r in rollouts:
        ctx = r.sample["contexts"]
        if objective == "vigos":
            out.append(assemble_vigos(ctx, r.completion, r.segments, correct=r.correct, cut=cut,
                                      reasoning_teacher_sees_description=cfg.data.context.reasoning_teacher_sees_description))
        elif objective == "opsd":
            out.append(assemble_opsd(ctx, r.completion, correct=r.correct))
        else:
            image_ctx, text_ctx = ("student", "student_text") if cfg.model.teacher_hf_path else ("opsd", "opsd_text")
            out.append(assemble_vgs(ctx, r.completion, teacher_image_context=image_ctx,
                                    teacher_text_context=text_ctx, correct=r.correct))
    return out


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


def build_step_inputs(rollouts: list[Rollout], cfg, *, hf_config, pad_id: int, cut, dp_group, tp_group) -> StepInputs:
    """Micro-batches of ``cfg.train.micro_batch_size`` rollouts and the objective of the global batch."""
    from vigos_megatron.losses.objectives import build_loss, global_segment_counts
    from vigos_megatron.rollout.assembly import pack_distill, pack_vgs
    from vigos_megatron.runtime import compute_device
    from vigos_megatron.schedule.batch import make_stream_batches
    from vigos_megatron.schedule.forward_step import ReportedLoss

    assembled = assemble(rollouts, cfg, cut)
    rolled = list(assembled)
    vision = [r.sample for r in rollouts]
    fill_micro_batches(assembled, vision, cfg.train.micro_batch_size)
    pack = pack_vgs if cfg.loss.objective == "vgs" else pack_distill
    batches = make_stream_batches(
        assembled, vision, rollouts_per_micro_batch=cfg.train.micro_batch_size,
        pad_id=pad_id, image_token_id=hf_config.image_token_id,
        spatial_merge_size=hf_config.vision_config.spatial_merge_size, multiple=cfg.train.seq_multiple, pack=pack,
        group_by_length=cfg.train.group_by_length,
    )
    counts = None
    if cfg.loss.objective != "vgs":
        n_terms = 3 if cfg.loss.objective == "vigos" else 1
        # counted on the backend's device: the DP all-reduce runs on NCCL where CUDA is used
        device = compute_device()
        counts = global_segment_counts([b.tokens.segment.to(device) for b in batches], n_terms, dp_group=dp_group)
    loss = build_loss(cfg.loss, counts, tp_group=tp_group)
    return StepInputs(batches=batches, loss_fn=ReportedLoss(loss),
                      global_counts=[] if counts is None else [float(c) for c in counts], assembled=rolled)
