"""Worker: Qwen2.5-VL under TP/PP (gloo) - logit parity with HF, frozen teacher, checkpoint reload.

Usage: torchrun ... model_parallel.py --tp T --pp P --hf DIR [--reload RUN OUT]...

Checks, each printed as one ``RESULT key=value`` line by rank 0 (the test parses them):
1. logits of the Megatron model (through the pipeline schedule, forward_only, 2 micro-batches)
   vs HF ``Qwen2_5_VLForConditionalGeneration`` on the same image+text batch;
2. the teacher replica (built from the student's shards) gives the same logits, and after a
   student forward/backward + SGD step the teacher has no grad anywhere and bit-identical
   parameters, while the student changed; teacher memory (bytes of parameters);
3. ``--reload RUN OUT``: load a Megatron checkpoint (any layout) at this TP/PP, save it again
   to OUT at this layout with extra (optimizer-like) sharded entries.
"""

import argparse
import dataclasses
from functools import partial


def make_batch(hf_dir):
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(56, 84, 3) * 255).astype("uint8")) for _ in range(2)]
    texts = []
    for i in range(2):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"<think>count {i}</think> \\boxed{{"}]}]
        texts.append(proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    inp = proc(text=texts, images=images, return_tensors="pt")
    assert inp["attention_mask"].all(), "test batch must not need padding"
    return {k: inp[k] for k in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")}


def split_batch(batch):
    """Two micro-batches of one sample each (pixel rows split by each image's patch count)."""
    n0 = int(batch["image_grid_thw"][0].prod())
    batch = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}  # the Megatron model derives it
    return [
        {"input_ids": batch["input_ids"][:1], "pixel_values": batch["pixel_values"][:n0],
         "image_grid_thw": batch["image_grid_thw"][:1]},
        {"input_ids": batch["input_ids"][1:], "pixel_values": batch["pixel_values"][n0:],
         "image_grid_thw": batch["image_grid_thw"][1:]},
    ]


def full_logits(chunks, micro):
    import torch

    from vigos_megatron.models.forward import gather_vocab_shards, pipeline_forward_logits

    outs = pipeline_forward_logits(chunks, micro)
    if outs is None:
        return None
    return torch.cat([gather_vocab_shards(o) for o in outs], dim=0)


def broadcast_from_last_stage(t, shape):
    """Make the last stage's tensor available on every rank (for comparisons on rank 0)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    last = ps.get_pipeline_model_parallel_last_rank()
    buf = t.contiguous() if t is not None else torch.empty(shape)
    dist.broadcast(buf, src=last, group=ps.get_pipeline_model_parallel_group())
    return buf


def student_step(chunks, micro):
    """Forward+backward through the schedule (sum of squared logits), then SGD on the student."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from vigos_megatron.models.forward import chunk_forward

    def step(data_iterator, model):
        out = chunk_forward(model, next(data_iterator))

        def loss_func(o):
            loss = o.float().pow(2).mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    b, s = micro[0]["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro), model=chunks, num_microbatches=len(micro),
        seq_length=s, micro_batch_size=b, forward_only=False,
    )
    n_grads = 0
    with torch.no_grad():
        for p in chunks[0].parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                n_grads += 1
                p.add_(p.grad, alpha=-0.5)
    return n_grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--reload", nargs=2, action="append", default=[], metavar=("RUN", "OUT"))
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from vigos_megatron.testing.distributed import destroy, init_gloo

    ps = init_gloo(args.tp, args.pp)
    rank = dist.get_rank()
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.convert.megatron_checkpoint import (
        load_model_checkpoint, model_sharded_state_dict, resolve_checkpoint, save_model_checkpoint,
    )
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.models.teacher import build_teacher_replica

    def result(key, value):
        if rank == 0:
            print(f"RESULT {key}={value}", flush=True)

    batch = make_batch(args.hf)
    micro = split_batch(batch)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
    shape = tuple(ref.shape)

    builder = QwenVLBuilder.from_hf(args.hf, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    result("transformer_impl", builder.transformer_impl)
    student = builder.build_from_hf(args.hf)
    for m in student:
        m.eval()  # dropout is 0 anyway; parity in eval mode

    # 1. parity
    logits = broadcast_from_last_stage(full_logits(student, micro), shape)
    result("parity_max_abs_diff", f"{(logits - ref).abs().max().item():.3e}")
    result("has_visual_on_first_stage", int(hasattr(student[0], "visual") == ps.is_pipeline_first_stage()))

    # 2. teacher replica
    teacher = build_teacher_replica(builder, student)
    t_logits = broadcast_from_last_stage(full_logits(teacher.chunks, micro), shape)
    result("teacher_vs_student_logit_diff", f"{(t_logits - logits).abs().max().item():.3e}")
    t_before = {n: p.detach().clone() for n, p in teacher.chunks[0].named_parameters()}
    s_before = {n: p.detach().clone() for n, p in student[0].named_parameters()}
    for m in student:
        m.train()
    n_grads = student_step(student, micro)
    tot = torch.tensor([n_grads])
    dist.all_reduce(tot)
    result("student_params_with_grad", int(tot.item()))
    bad = [n for n, p in teacher.chunks[0].named_parameters() if p.grad is not None or p.requires_grad]
    changed = [n for n, p in teacher.chunks[0].named_parameters() if not torch.equal(p, t_before[n])]
    s_changed = sum(not torch.equal(p, s_before[n]) for n, p in student[0].named_parameters())
    flags = torch.tensor([len(bad), len(changed), s_changed])
    dist.all_reduce(flags)
    result("teacher_params_with_grad_or_requires_grad", int(flags[0]))
    result("teacher_params_changed", int(flags[1]))
    result("student_params_changed", int(flags[2]))
    result("teacher_is_ddp", int(any(type(m).__name__ == "DistributedDataParallel" for m in teacher.chunks)))
    result("teacher_local_param_bytes_rank0", teacher.local_param_bytes)
    result("teacher_param_bytes_model_parallel_total", teacher.total_param_bytes(ps.get_model_parallel_group()))
    report = teacher.report(ps.get_model_parallel_group())
    if rank == 0:
        print(report, flush=True)

    # 3. reload a checkpoint at this layout and save it again (with optimizer-like entries)
    for i, (run, out) in enumerate(args.reload):
        ckpt = resolve_checkpoint(run)
        b2 = QwenVLBuilder.from_hf(ckpt / "hf", tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        chunks = b2.build(init_weights=False)
        load_model_checkpoint(chunks, ckpt)
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

        fake_optim = model_sharded_state_dict(chunks)["model"]

        def as_exp_avg(sh):
            if isinstance(sh, ShardedTensor):
                return dataclasses.replace(sh, key="optimizer.state.exp_avg." + sh.key, data=torch.randn_like(sh.data))
            return None

        fake_optim = dict_list_map_inplace(as_exp_avg, fake_optim)
        fake_optim = {k: v for k, v in fake_optim.items() if v is not None}
        save_model_checkpoint(chunks, out, 7, hf_source_dir=ckpt / "hf", extra_sharded_state={"optimizer": fake_optim})
        result(f"resaved_{i}", out)

    destroy()


if __name__ == "__main__":
    main()
