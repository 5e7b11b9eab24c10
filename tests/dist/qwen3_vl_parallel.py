"""Worker: Qwen3-VL under TP/PP (gloo) - logit and vision parity with HF, teacher replica, checkpoint at another layout.

Usage: torchrun ... qwen3_vl_parallel.py --tp T --pp P --hf DIR [--ckpt RUN] [--teacher-hf DIR --step-out FILE]

Checks, each printed as one ``RESULT key=value`` line by rank 0 (the test parses them):
1. logits through megatron's pipeline schedule (forward only; one micro-batch of two right-padded
   prompts whose images differ in size; deepstack on) vs HF ``Qwen3VLForConditionalGeneration``
   at the real positions;
2. the vision transformer's output and deepstack features on the first stage (TP-sharded tower)
   vs HF's tower (which equals the TP=1 tower exactly, ``tests/test_qwen3_vl.py``);
3. the teacher replica gives the student's logits; after a student forward/backward and an SGD
   step the teacher has no gradient and unchanged parameters;
4. ``--ckpt RUN``: the converter's TP=1 checkpoint loaded at this layout gives the same logits;
5. ``--teacher-hf DIR --step-out FILE``: one in-schedule ViGOS step with the separate teacher
   ``DIR`` (:func:`schedule_common.run_step`, the loss from hidden states), saved by rank 0 to FILE
   (loss, student gradients by HF name, teacher checks) for the test to compare with PP=1.
"""

import argparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--teacher-hf", default=None)
    ap.add_argument("--step-out", default=None)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    from model_parallel import broadcast_from_last_stage, full_logits, student_step
    from transformers import Qwen3VLForConditionalGeneration

    from vigos_megatron.convert.megatron_checkpoint import load_model_checkpoint, resolve_checkpoint
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.models.stage_forward import image_features
    from vigos_megatron.models.teacher import build_teacher_replica
    from vigos_megatron.testing.distributed import destroy, init_gloo
    from vigos_megatron.testing.tiny_qwen3_vl import image_text_batch

    ps = init_gloo(args.tp, args.pp)
    rank = dist.get_rank()

    def result(key, value):
        if rank == 0:
            print(f"RESULT {key}={value}", flush=True)

    batch = image_text_batch(args.hf)
    real = batch["attention_mask"].bool()
    hf = Qwen3VLForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
        ref_vis = hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    micro = [{k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}]
    shape = tuple(ref.shape)

    builder = QwenVLBuilder.from_hf(args.hf, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    student = builder.build_from_hf(args.hf)
    for m in student:
        m.eval()
    logits = broadcast_from_last_stage(full_logits(student, micro), shape)
    result("parity_max_abs_diff", f"{(logits - ref)[real].abs().max().item():.3e}")

    vis = torch.zeros(2)
    if ps.is_pipeline_first_stage():
        with torch.no_grad():
            feats = image_features(student[0], batch["pixel_values"], batch["image_grid_thw"])
        vis[0] = (torch.cat([f.embeds for f in feats]) - torch.cat(list(ref_vis.pooler_output))).abs().max()
        vis[1] = max((torch.cat([f.deepstack[k] for f in feats]) - ref_vis.deepstack_features[k]).abs().max()
                     for k in range(len(feats[0].deepstack)))
    dist.all_reduce(vis, op=dist.ReduceOp.MAX)
    result("vision_max_abs_diff", f"{vis[0].item():.3e}")
    result("deepstack_max_abs_diff", f"{vis[1].item():.3e}")

    teacher = build_teacher_replica(builder, student)
    t_logits = broadcast_from_last_stage(full_logits(teacher.chunks, micro), shape)
    result("teacher_vs_student_logit_diff", f"{(t_logits - logits).abs().max().item():.3e}")
    t_before = {n: p.detach().clone() for n, p in teacher.chunks[0].named_parameters()}
    for m in student:
        m.train()
    n_grads = torch.tensor([student_step(student, micro)])
    dist.all_reduce(n_grads)
    result("student_params_with_grad", int(n_grads.item()))
    bad = sum(p.grad is not None or p.requires_grad or not torch.equal(p, t_before[n])
              for n, p in teacher.chunks[0].named_parameters())
    flags = torch.tensor([bad])
    dist.all_reduce(flags)
    result("teacher_params_touched", int(flags.item()))

    if args.ckpt:
        ckpt = resolve_checkpoint(args.ckpt)
        b2 = QwenVLBuilder.from_hf(ckpt / "hf", tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        chunks = b2.build(init_weights=False)
        load_model_checkpoint(chunks, ckpt)
        for m in chunks:
            m.eval()
        c_logits = broadcast_from_last_stage(full_logits(chunks, micro), shape)
        result("checkpoint_vs_hf_load_logit_diff", f"{(c_logits - t_logits).abs().max().item():.3e}")
    if args.step_out:
        from schedule_common import run_step, save_step_result

        save_step_result(run_step(args.hf, args.tp, args.pp, ps, teacher_hf=args.teacher_hf), args.step_out)
    destroy()


if __name__ == "__main__":
    main()
