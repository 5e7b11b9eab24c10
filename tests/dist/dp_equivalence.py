"""ViGOS normalisation over data-parallel ranks and micro-batches, through megatron itself.

A toy last stage (student linear head + frozen teacher head over a stream of
student and teacher rows) is trained for one step with megatron's schedule
(``calculate_per_token_loss=True``), megatron DDP and ``finalize_model_grads`` at
DP = world size with 2 micro-batches per rank. Its gradient must equal the
gradient of the hand-written float64 objective over the whole global batch
(DP=1, one micro-batch): each term a token mean over its own global tokens.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.distributed as dist

from vigos_megatron.testing.distributed import destroy, init_gloo

H, V, S = 16, 256, 6
K = 3  # teacher contexts per rollout: perception, reasoning, reference
ROLLOUTS = 4  # global batch


def rollout(i: int):
    """Features of one rollout's 1 + K rows, and its supervised tokens (segment ids)."""
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(S, 1 + K, H, generator=g)
    if i == 1:  # invalid: every completion token goes to the reference teacher
        tok = [(p, 2, p, 2) for p in range(5)]
    elif i == 2:  # valid, empty description span
        tok = [(p, 1, p - 1, 1) for p in range(1, 5)]
    else:  # valid: description then reasoning
        tok = [(0, 0, 1, 0), (1, 0, 2, 0), (2, 0, 3, 0), (3, 1, 0, 1), (4, 1, 1, 1)][: 3 + i]
    return x, tok  # tok: (student pos, teacher ctx, teacher pos, segment)


class ToyStage(torch.nn.Module):
    """Last-stage stand-in: student head on student rows, frozen teacher head (no grad) on teacher rows."""

    def __init__(self, config):
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        g = torch.Generator().manual_seed(0)
        self.student = torch.nn.Linear(H, V, bias=False)
        self.teacher = torch.nn.Linear(H, V, bias=False)
        with torch.no_grad():
            self.student.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
            self.teacher.weight.copy_(self.student.weight + torch.randn(V, H, generator=g) * 0.3)
        self.teacher.requires_grad_(False)

    def set_input_tensor(self, tensor):  # single stage: nothing is received
        assert tensor is None or tensor == [None] or all(t is None for t in tensor)

    def forward(self, x, n_student_rows):
        s = self.student(x[:, :n_student_rows])
        with torch.no_grad():
            t = self.teacher(x[:, n_student_rows:])
        return torch.cat([s, t], dim=1)


def micro_batch(ids):
    """Stream ``[S, (1+K)*B, H]``: B student rows first, then K blocks of B teacher rows."""
    from vigos_megatron.losses.objectives import DistillTokens

    B = len(ids)
    R = (1 + K) * B
    xs, sidx, tidx, seg = [], [], [], []
    parts = [rollout(i) for i in ids]
    x = torch.zeros(S, R, H)
    for b, (xr, tok) in enumerate(parts):
        x[:, b] = xr[:, 0]
        for c in range(K):
            x[:, B + c * B + b] = xr[:, 1 + c]
        for p, c, q, sg in tok:
            sidx.append(p * R + b)
            tidx.append(q * R + B + c * B + b)
            seg.append(sg)
    t = DistillTokens(torch.tensor(sidx), torch.tensor(tidx), torch.tensor(seg))
    return x, B, t


def reference_grad(weight_s, weight_t):
    """float64 objective over the global batch, written out term by term."""
    from vigos_megatron.testing.kl_reference import kl_reference

    ws = weight_s.double().clone().requires_grad_()
    wt = weight_t.double()
    per_seg = {0: [], 1: [], 2: []}
    for i in range(ROLLOUTS):
        xr, tok = rollout(i)
        xr = xr.double()
        for p, c, q, sg in tok:
            zs = xr[p, 0] @ ws.T
            zt = xr[q, 1 + c] @ wt.T
            per_seg[sg].append(kl_reference(zs, zt, "reverse" if sg == 2 else "forward"))
    lam = (1.0, 1.0, 2.0)
    loss = sum(lam[s] * torch.stack(v).mean() for s, v in per_seg.items() if v)
    loss.backward()
    return loss.detach(), ws.grad


def main():
    ps = init_gloo(1, 1)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from vigos_megatron.objectives.vigos import ViGOSLossConfig, vigos_loss
    from vigos_megatron.losses.objectives import check_schedule_config, global_segment_counts

    rank, dp = dist.get_rank(), dist.get_world_size()
    config = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=1, calculate_per_token_loss=True,
        use_cpu_initialization=True, pipeline_dtype=torch.float32,
    )
    check_schedule_config(config)
    config.finalize_model_grads_func = finalize_model_grads
    module = ToyStage(config)
    ref_loss, ref_grad = reference_grad(module.student.weight.detach(), module.teacher.weight.detach())
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)

    per_rank = ROLLOUTS // dp
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    n_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    groups = [mine[j::n_mb] for j in range(n_mb)]
    batches = [micro_batch(ids) for ids in groups]
    counts = global_segment_counts([t.segment for _, _, t in batches], 3, dp_group=ps.get_data_parallel_group())
    loss_fn = vigos_loss(ViGOSLossConfig(clip=0.0), counts)

    def forward_step(data_iterator, model):
        x, B, tokens = next(data_iterator)
        out = model(x, B)
        return out, partial(loss_fn, tokens)

    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=n_mb,
        seq_length=S, micro_batch_size=(1 + K) * len(groups[0]), forward_only=False,
    )
    grad = module.student.weight.main_grad
    # reported loss = sum(loss) / sum(num_tokens) over micro-batches and ranks
    tot = torch.zeros(2, dtype=torch.float64)
    for i, d in enumerate(losses):
        tot[0] += float(d["kl/perception"][0]) * float(loss_fn.token_weight[0]) + float(d["kl/reasoning"][0]) * float(loss_fn.token_weight[1]) + float(d["kl/reference"][0]) * float(loss_fn.token_weight[2])
        tot[1] += float(d["kl/perception"][1] + d["kl/reasoning"][1] + d["kl/reference"][1])
    dist.all_reduce(tot)
    rel = float((grad.double() - ref_grad).norm() / ref_grad.norm())
    loss_err = abs(float(tot[0] / tot[1]) - float(ref_loss))
    teacher_ok = module.teacher.weight.grad is None and not hasattr(module.teacher.weight, "main_grad")
    print(f"rank {rank}: dp={dp} microbatches={n_mb} grad rel err {rel:.3e} loss err {loss_err:.3e} teacher_untouched={teacher_ok}", flush=True)
    ok = rel < 1e-5 and loss_err < 1e-5 * (1 + abs(float(ref_loss))) and teacher_ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    destroy()
    sys.exit(int(flag) and 1)


if __name__ == "__main__":
    main()
