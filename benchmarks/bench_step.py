#!/usr/bin/env python
"""Scoring + update time of one step: ViGOS (student + frozen teacher in one schedule) vs plain SFT.

    python benchmarks/bench_step.py [--rollouts 8] [--micro-batch 2] [--completion 96] [--repeats 3]
    python benchmarks/bench_step.py --preset 3b --dtype bfloat16      # on a GPU (Qwen2.5-VL-3B-shaped, random)

Same model, same rollouts, same student tokens: ViGOS runs ``StudentTeacherStage`` (student rows
forward+backward, teacher context rows forward only) with the ViGOS loss; SFT runs the student
rows alone with next-token cross-entropy on the completion tokens, with logits computed only at
those positions as ViGOS does (``sft``; ``sft-all``, a plain SFT with logits at every position, is
printed beside it). Each is one megatron schedule call plus the optimizer step. The ideal ratio counts 3 units per real student token (forward +
backward) and 1 per real teacher-context token (forward only):

    ideal = (3 * student_tokens + teacher_tokens) / (3 * student_tokens)

and the padding fraction is the share of the stream (every slot of every micro-batch at its own length) that is
padding. Completions are synthetic (valid ViGOS format; lengths 0.75 / 0.92 / 1.08 / 1.25 x ``--completion`` in turn,
so grouping by length pairs equal lengths: its best case), so no generation is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def synthetic_completion(tok, n_desc: int, n_reason: int, i: int) -> torch.Tensor:
    words = ["red", "square", "blue", "circle", "two", "count", "the", "is", "and", "of"]
    desc = " ".join(words[(i + j) % len(words)] for j in range(n_desc))
    rea = " ".join(words[(i * 3 + j) % len(words)] for j in range(n_reason))
    text = f" {desc}</description><think> {rea}</think> \\boxed{{{i % 7}}}<|im_end|>"
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def build_rollouts(hf_dir, n: int, completion: int, image_side: int):
    from vigos_megatron.data.contexts import ContextEncoder, PrefixCut
    from vigos_megatron.data.synthetic import image_bytes, typical_rows
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.schedule.assembly import assemble_vigos

    root = Path(__file__).resolve().parents[1]
    px = image_side * image_side
    enc = ContextEncoder(hf_dir, root / "conf/prompts/vigos.yaml", min_pixels=px, max_pixels=px,
                         max_prompt_tokens=32768, contexts=("student", "perception", "reasoning", "reference"))
    tok = enc.processor.tokenizer
    cut = PrefixCut(tok)
    rows = typical_rows(n, width=image_side, height=image_side)
    assembled, samples = [], []
    for i, rec in enumerate(rows):
        sample = enc(f"k{i}", rec, image_bytes(image_side, image_side, seed=i))
        spread = 0.75 + 0.5 * (i % 4) / 3  # lengths vary by +-25 %
        words = max(2, int(completion * spread) // 2)
        comp = synthetic_completion(tok, words // 2, words, i)
        seg = parse_completion(comp, tok)
        assembled.append(assemble_vigos(sample["contexts"], comp, seg, correct=False, cut=cut))
        samples.append(sample)
    return assembled, samples, tok


def sft_step(data_iterator, model, *, tp_group, all_logits: bool):
    """Student rows only; CE on the completion tokens (the student positions ViGOS reads).

    ``all_logits=False``: logits only at those positions, through the same functions as the
    ViGOS stage (:mod:`vigos_megatron.models.stage_forward`), so both paths do the same work per
    student token; ``True``: ``Qwen25VLModel.forward`` with logits at every position (a plain SFT).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vigos_megatron.models.stage_forward import embed_rows, image_features, language_forward, mrope_positions
    from vigos_megatron.runtime import model_device
    from vigos_megatron.testing.kl_reference import row_and_column, rows_model_kwargs

    b = next(data_iterator).to(model_device(model))
    s0 = b.slot_lengths[0]
    ids = b.student.input_ids[:, :s0]  # the student rows at their own length
    row, col = row_and_column(b, b.tokens.student_index)  # student rows: row < Ns
    idx = (row * s0 + col).to(ids.device)
    target = ids.reshape(-1)[idx + 1]
    if all_logits:
        kwargs = rows_model_kwargs(b.student, b.images)
        kwargs["input_ids"] = ids
        logits = model(**kwargs)  # [Ns, S_0, V/tp]
        rows = logits.reshape(-1, logits.shape[-1])[idx]
    else:
        image_ids = b.student.image_ids
        feats = image_features(model, *b.images.select(image_ids)) if image_ids else []
        logits = language_forward(model, rows=embed_rows(model, ids, feats),
                                  position_ids=mrope_positions(model, ids, b.student.grid_thw(b.images)),
                                  logit_positions=idx)  # [N, V/tp]
        rows = logits

    def loss_func(out):
        ce = vocab_parallel_cross_entropy(rows.unsqueeze(0).float(), target.unsqueeze(0)).squeeze(0)
        return ce.sum(), torch.tensor(idx.numel(), dtype=torch.int, device=ce.device), {}

    return logits, loss_func


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--completion", type=int, default=96, help="mean completion words (tokens ~ words)")
    ap.add_argument("--image-side", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", choices=("tiny", "3b"), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--no-group-by-length", action="store_true",
                    help="consecutive rollouts per micro-batch (train.group_by_length=false)")
    args = ap.parse_args()

    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs()  # the platform adaptations; known library warnings not shown
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from vigos_megatron.objectives.vigos import ViGOSLossConfig, vigos_loss
    from vigos_megatron.losses.objectives import global_segment_counts
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.models.teacher import build_teacher_replica
    from vigos_megatron.runtime import use_cuda
    from vigos_megatron.schedule import ReportedLoss, StudentTeacherStage, make_stream_batches, run_stream_schedule
    from vigos_megatron.testing.tiny_qwen import tiny_hf_config, write_tiny_checkpoint

    dtype = getattr(torch, args.dtype or ("bfloat16" if use_cuda() else "float32"))
    tmp = tempfile.mkdtemp()
    hf = write_tiny_checkpoint(Path(tmp) / "tiny")  # tokenizer + processor (and the tiny weights)
    with local_model_parallel() as ps:
        if args.preset == "3b":
            cfg = tiny_hf_config()  # Qwen2.5-VL-3B's language model, the tiny vision tower
            for k, v in dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                             num_attention_heads=16, num_key_value_heads=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                              "mrope_section": [16, 24, 24]}).items():
                setattr(cfg.text_config, k, v)
            cfg.vision_config.out_hidden_size = 2048
            builder = QwenVLBuilder.from_hf(cfg, dtype=dtype)
            student = builder.build(init_weights=True)
        else:
            builder = QwenVLBuilder.from_hf(hf, dtype=dtype)
            student = builder.build_from_hf(hf)
        teacher = build_teacher_replica(builder, student).chunks
        assembled, samples, tok = build_rollouts(hf, args.rollouts, args.completion, args.image_side)
        hfc = builder.hf_config
        batches = make_stream_batches(assembled, samples, rollouts_per_micro_batch=args.micro_batch,
                                      pad_id=tok.pad_token_id, image_token_id=hfc.image_token_id,
                                      spatial_merge_size=hfc.vision_config.spatial_merge_size,
                                      group_by_length=not args.no_group_by_length)
        stage = StudentTeacherStage(student[0], teacher[0])
        cfg_m = stage.config
        cfg_m.calculate_per_token_loss = True
        cfg_m.finalize_model_grads_func = finalize_model_grads
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        vigos_model = [DistributedDataParallel(cfg_m, ddp_cfg, stage)]
        counts = global_segment_counts([b.tokens.segment for b in batches], 3)
        loss_fn = ReportedLoss(vigos_loss(ViGOSLossConfig(), counts, tp_group=ps.get_tensor_model_parallel_group()))
        opt = torch.optim.SGD(stage.student_parameters(), lr=0.0)  # the update's cost: negligible vs the schedule

        def sync():
            if use_cuda():
                torch.cuda.synchronize()

        def run_vigos():
            vigos_model[0].zero_grad_buffer()
            run_stream_schedule(vigos_model, batches, loss_fn)
            opt.step()

        def run_sft(all_logits=False):
            vigos_model[0].zero_grad_buffer()
            get_forward_backward_func()(
                forward_step_func=partial(sft_step_stage, tp_group=ps.get_tensor_model_parallel_group(),
                                          all_logits=all_logits),
                data_iterator=iter(batches), model=vigos_model, num_microbatches=len(batches),
                seq_length=batches[0].seq_length, micro_batch_size=batches[0].num_student_rows, forward_only=False)
            opt.step()

        def sft_step_stage(data_iterator, model, *, tp_group, all_logits):
            return sft_step(data_iterator, model.module.student, tp_group=tp_group, all_logits=all_logits)

        times = {"vigos": [], "sft": [], "sft-all": []}
        for fn, key in ((run_vigos, "vigos"), (run_sft, "sft"), (partial(run_sft, all_logits=True), "sft-all")):
            fn()  # warm-up
            sync()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - t0)
    pad = tok.pad_token_id
    stud = sum(int((b.student.input_ids != pad).sum()) for b in batches)
    teach = sum(int((b.teacher.input_ids != pad).sum()) for b in batches)
    total = sum(b.stream_length for b in batches)  # the tokens that run: every slot at its own length
    t_v, t_s = statistics.median(times["vigos"]), statistics.median(times["sft"])
    ideal = (3 * stud + teach) / (3 * stud)
    b0 = batches[0]
    ks = b0.student_slots
    stud_padded = sum(b.rollouts * sum(b.slot_lengths[:ks]) for b in batches)
    teach_padded = sum(b.rollouts * sum(b.slot_lengths[ks:]) for b in batches)
    ideal_padded = (3 * stud_padded + teach_padded) / (3 * stud_padded)  # the same units over the padded slots
    print(f"preset {args.preset}, {dtype}, {'cuda' if use_cuda() else 'cpu'}; {args.rollouts} rollouts, "
          f"{len(batches)} micro-batches of B={b0.rollouts} rollouts "
          f"({'consecutive' if args.no_group_by_length else 'grouped by length'}), slot lengths "
          f"{[b.slot_lengths for b in batches]}")
    print(f"{'path':8} {'median s':>9} {'real tokens':>12}")
    print(f"{'sft':8} {t_s:9.3f} {stud:12d}   (logits at the completion positions, as ViGOS)")
    print(f"{'sft-all':8} {statistics.median(times['sft-all']):9.3f} {stud:12d}   (logits at every position)")
    print(f"{'vigos':8} {t_v:9.3f} {stud + teach:12d}")
    print(f"measured ratio vigos/sft {t_v / t_s:.3f}; ideal ratio (3 per student token, 1 per teacher token) "
          f"{ideal:.3f}; measured/ideal {t_v / t_s / ideal:.3f}; padding fraction of the stream "
          f"{1 - (stud + teach) / total:.3f}; ideal ratio of the padded slots {ideal_padded:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
