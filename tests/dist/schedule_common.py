"""Shared by the schedule workers (tests/dist/schedule_*.py) and tests/test_schedule*.py.

End to end from synthetic samples: ``ContextEncoder`` (tiny processor, conf/prompts/vigos.yaml)
-> fixed completion texts tokenised -> ``parse_completion`` -> ``assemble_vigos`` ->
``make_stream_batches`` (``pack_distill``, 2 micro-batches of 2 rollouts, each at its own length) -> the
student/teacher stage (tiny Qwen2.5-VL) under megatron DDP -> megatron's schedule with the
ViGOS loss (``calculate_per_token_loss=True``, ``finalize_model_grads``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "conf" / "prompts" / "vigos.yaml"

#: one completion per sample (after the <description> prefill); valid and invalid ones mixed
COMPLETIONS = (
    " a red square</description><think> it is red</think> \\boxed{red}<|im_end|>",
    " a red square and a blue circle<|im_end|>",  # invalid: no </description>
    " two blue circles</description><think> count them: two</think> \\boxed{2}<|im_end|>",
    " shapes</description> no think here \\boxed{3}<|im_end|>",  # invalid: no <think>
)
ROLLOUTS_PER_MICRO_BATCH = 2
#: image sizing: tiny images (a few merged patches) keep the CPU run short
MIN_PIXELS, MAX_PIXELS = 56 * 56, 280 * 224
#: per sample: small images except one larger (80 image tokens) in the second micro-batch, so the
#: two micro-batches pack to different lengths (each runs at its own)
IMAGE_SIZES = ((84, 56), (56, 56), (280, 224), (56, 84))
MAX_PROMPT_TOKENS = 4096
SEQ_MULTIPLE = 64
VIGOS_CONTEXTS = ("student", "perception", "reasoning", "reference")
#: clip off: parity of gradients across layouts must not hinge on tokens near the clip threshold
LOSS_CLIP = 0.0
SGD_LR = 0.5
#: fp32 end to end: relative tolerance on the loss and on the flattened student gradient
REL_TOL = 1e-5
#: per HF tensor (its gradient norm can be 1e-6 of the largest): error relative to its own norm
PER_TENSOR_REL_TOL = 1e-4
#: the checks of :func:`run_step` that must be 0: the teacher untouched, every student parameter in DDP
UNTOUCHED_TEACHER_CHECKS = ("teacher_grad_not_none", "teacher_requires_grad", "teacher_changed",
                            "teacher_in_ddp_buffers", "teacher_main_grad", "teacher_in_train_mode",
                            "student_not_in_ddp_buffers")


@dataclass
class Inputs:
    batches: list  # StreamBatch per micro-batch
    valid: list[bool]


def build_inputs(hf_dir, *, group_by_length: bool = False) -> Inputs:
    """The micro-batches of one step (deterministic: the same on every rank and layout)."""
    from vigos_megatron.data.contexts import ContextEncoder, PrefixCut
    from vigos_megatron.data.synthetic import image_bytes, typical_rows
    from vigos_megatron.models.builder import load_hf_config
    from vigos_megatron.schedule.assembly import assemble_vigos
    from vigos_megatron.rollout.segments import TokenBytes, parse_completion
    from vigos_megatron.schedule.batch import make_stream_batches

    enc = ContextEncoder(hf_dir, PROMPTS, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                         max_prompt_tokens=MAX_PROMPT_TOKENS, contexts=VIGOS_CONTEXTS)
    tok = enc.processor.tokenizer
    tb = TokenBytes(tok)
    cut = PrefixCut(tok)
    hf_config = load_hf_config(hf_dir)
    rows = typical_rows(len(COMPLETIONS), width=84, height=56)
    rollouts, vision, valid = [], [], []
    for i, (rec, text) in enumerate(zip(rows, COMPLETIONS)):
        sample = enc(f"k{i}", rec, image_bytes(*IMAGE_SIZES[i], seed=i))
        completion = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        seg = parse_completion(completion.tolist(), tb)
        rollouts.append(assemble_vigos(sample["contexts"], completion, seg, correct=seg.answer == rec["answer"],
                                       cut=cut))
        vision.append(sample)
        valid.append(seg.valid)
    batches = make_stream_batches(
        rollouts, vision, rollouts_per_micro_batch=ROLLOUTS_PER_MICRO_BATCH, pad_id=tok.pad_token_id,
        image_token_id=hf_config.image_token_id, spatial_merge_size=hf_config.vision_config.spatial_merge_size,
        multiple=SEQ_MULTIPLE, group_by_length=group_by_length,
    )
    return Inputs(batches, valid)


def pad_id(hf_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir).pad_token_id


def build_models(hf_dir, tp: int, pp: int, teacher_hf=None, dtype=torch.float32):
    """(builder, student chunk, teacher chunk) for this rank's stage.

    The teacher is the frozen replica of the student, or (``teacher_hf``) a frozen checkpoint of its
    own, of the student's size or another (built by its own builder, its layers split over the
    student's stages in proportion): it then differs from the student, so a stage that routed rows
    to the wrong model would change the loss and the gradients.
    """
    from vigos_megatron.config.teacher import check_pair
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.models.teacher import build_teacher_replica, load_teacher

    builder = QwenVLBuilder.from_hf(hf_dir, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, dtype=dtype)
    student = builder.build_from_hf(hf_dir)
    if teacher_hf is None:
        teacher = build_teacher_replica(builder, student).chunks
    else:
        counts = check_pair(hf_dir, teacher_hf, tp=tp, pp=pp)
        teacher = load_teacher(teacher_hf, teacher_hf, pipeline_layers=counts, tensor_model_parallel_size=tp,
                               pipeline_model_parallel_size=pp, dtype=dtype, transformer_impl="auto").chunks
    return builder, student[0], teacher[0]


def make_loss(batches, ps):
    from vigos_megatron.objectives.vigos import ViGOSLossConfig, vigos_loss
    from vigos_megatron.losses.objectives import global_segment_counts
    from vigos_megatron.schedule.forward_step import ReportedLoss

    counts = global_segment_counts([b.tokens.segment for b in batches], 3, dp_group=ps.get_data_parallel_group())
    cfg = ViGOSLossConfig(clip=LOSS_CLIP)
    return cfg, counts, ReportedLoss(vigos_loss(cfg, counts, tp_group=ps.get_tensor_model_parallel_group()))


def wrap_ddp(stage):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    config = stage.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), stage)


def run_step(hf_dir, tp: int, pp: int, ps, teacher_hf=None, dtype=torch.float32, from_hidden: bool = True):
    """One training step of the stage path (the loss from hidden states or, ``from_hidden=False``,
    from logits). Returns a dict of what the checks need (this rank)."""
    from vigos_megatron.schedule.forward_step import LOSS_KEY, reduce_reports, run_stream_schedule
    from vigos_megatron.schedule.stage import StudentTeacherStage

    inputs = build_inputs(hf_dir)
    builder, student, teacher = build_models(hf_dir, tp, pp, teacher_hf, dtype=dtype)
    stage = StudentTeacherStage(student, teacher, from_hidden=from_hidden)
    model = wrap_ddp(stage)
    _, counts, loss_fn = make_loss(inputs.batches, ps)
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}

    model.train()
    model.zero_grad_buffer()
    reports = run_stream_schedule([model], inputs.batches, loss_fn)
    red = reduce_reports(reports, ps.get_data_parallel_group())
    from vigos_megatron.runtime import compute_device

    loss = broadcast_from_last_stage(
        torch.tensor([red.get(LOSS_KEY, float("nan"))], dtype=torch.float64, device=compute_device()), ps).cpu()

    grads = grads_by_hf_name(builder, student)
    # a plain SGD step on the student (the only parameters with gradient buffers)
    with torch.no_grad():
        for p in stage.student_parameters():
            p.add_(p.main_grad.to(p.dtype), alpha=-SGD_LR)

    in_buffers = {id(p) for buf in model.buffers for p in buf.params}
    teacher_params = list(teacher.parameters())
    checks = {
        "teacher_grad_not_none": sum(p.grad is not None for p in teacher_params),
        "teacher_requires_grad": sum(p.requires_grad for p in teacher_params),
        "teacher_changed": sum(not torch.equal(p, t_before[n]) for n, p in teacher.named_parameters()),
        "teacher_in_ddp_buffers": sum(id(p) in in_buffers for p in teacher_params),
        "teacher_main_grad": sum(hasattr(p, "main_grad") for p in teacher_params),
        "teacher_in_train_mode": sum(m.training for m in teacher.modules()),
        "student_not_in_ddp_buffers": sum(id(p) not in in_buffers for p in student.parameters()),
        "student_params": sum(1 for _ in student.parameters()),
        "student_changed": sum(not torch.equal(p, s_before[n]) for n, p in student.named_parameters()),
    }
    return {"loss": float(loss), "grads": grads, "checks": checks, "counts": counts.tolist(),
            "valid": inputs.valid, "rows": inputs.batches[0].rows, "seq_length": inputs.batches[0].seq_length,
            "reports": red}


def save_step_result(res: dict, out) -> None:
    """A worker's :func:`run_step` result, checks summed over ranks, saved by rank 0 to ``out``
    (collective)."""
    import torch.distributed as dist

    keys = sorted(res["checks"])
    summed = torch.tensor([res["checks"][k] for k in keys], dtype=torch.int64)
    dist.all_reduce(summed)
    res["checks"] = dict(zip(keys, summed.tolist()))
    res["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        res.pop("reports")  # the last stage's; rank 0 is not on it under PP
        torch.save(res, out)
        print(f"RESULT loss={res['loss']!r} checks={res['checks']}", flush=True)


def compare_to_pp1(res: dict, ref: dict, layout: str) -> None:
    """Assert a layout's step (:func:`save_step_result`) equals the PP=1 reference step: the loss and
    the student's gradients by HF name (whole and per tensor), the teacher untouched."""
    assert sorted(res["grads"]) == sorted(ref["grads"])
    names = sorted(ref["grads"])
    loss_err = abs(res["loss"] - ref["loss"]) / abs(ref["loss"])
    flat_ref = torch.cat([ref["grads"][n].reshape(-1) for n in names])
    flat = torch.cat([res["grads"][n].reshape(-1) for n in names])
    grad_err = float((flat - flat_ref).norm() / flat_ref.norm())
    per = {n: float((res["grads"][n] - ref["grads"][n]).norm() / ref["grads"][n].norm()) for n in names}
    worst = max(per, key=per.get)
    families = {}
    for n in names:
        families.setdefault("visual" if "visual." in n else "language", []).append(n)
    fam_err = {
        fam: float(torch.cat([(res["grads"][n] - ref["grads"][n]).reshape(-1) for n in ns]).norm()
                   / torch.cat([ref["grads"][n].reshape(-1) for n in ns]).norm())
        for fam, ns in families.items()
    }
    print(f"{layout}: loss {res['loss']:.8e} vs PP=1 {ref['loss']:.8e} (rel err {loss_err:.2e}); "
          f"student grad rel err {grad_err:.2e}, by family {', '.join(f'{k} {v:.2e}' for k, v in fam_err.items())}, "
          f"worst tensor {worst} {per[worst]:.2e}; checks {res['checks']}")
    assert ref["loss"] > 0 and flat_ref.norm() > 0
    assert loss_err < REL_TOL
    assert grad_err < REL_TOL
    assert per[worst] < PER_TENSOR_REL_TOL
    c = res["checks"]
    for key in UNTOUCHED_TEACHER_CHECKS:
        assert c[key] == 0, (layout, key, c[key])
    assert c["student_changed"] > 0
    assert (res["rows"], res["seq_length"]) == (ref["rows"], ref["seq_length"])


def broadcast_from_last_stage(t: torch.Tensor, ps) -> torch.Tensor:
    import torch.distributed as dist

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    t = t.clone()
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def grads_by_hf_name(builder, student) -> dict[str, torch.Tensor]:
    """The student's full gradients under HF parameter names (gathered over TP and PP by the bridge).

    A carrier chunk of the same layout holds the local gradient shards in place of weights, and
    megatron-bridge's export (the same mappings as the checkpoint converters) gathers them.
    Collective: every rank calls it; every rank gets the full dict.
    """
    carrier = builder.build(init_weights=False)
    src = dict(student.named_parameters())
    with torch.no_grad():
        for name, p in carrier[0].named_parameters():
            g = getattr(src[name], "main_grad", None)
            p.copy_(g if g is not None else torch.zeros_like(p))
    return {n: t.detach().double().clone() for n, t in builder.export_hf_weights(carrier, show_progress=False)}
