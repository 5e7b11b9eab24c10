"""Shared by tests/test_training_checkpoint.py and its torchrun worker (tests/dist/ckpt_worker.py).

A real training setup on the tiny Qwen2.5-VL: the student+teacher stage under megatron DDP
(:func:`vigos_megatron.training.optimizer.ddp_config`), megatron Adam + LR schedule
(:func:`~vigos_megatron.training.optimizer.build_optimizer`), and steps of the ViGOS loss through
megatron's schedule on the fixed micro-batches of ``schedule_common.build_inputs`` (data-parallel
rank ``r`` of ``dp`` takes micro-batches ``r::dp``).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import schedule_common as sc  # noqa: E402

#: large enough that one Adam step visibly moves every weight; clipping on (model-card style)
LR = 1e-3
TOTAL_STEPS = 4
WARMUP = 1


@dataclass
class Setup:
    builder: object
    student: object
    teacher: object
    model: list
    optimizer: object
    scheduler: object
    batches: list
    loss_fn: object


def optimizer_config(distributed: bool = True):
    from vigos_megatron.config.train import OptimizerConfig

    return OptimizerConfig(lr=LR, min_lr=LR / 10, weight_decay=0.01, clip_grad=0.1, warmup_steps=WARMUP,
                           decay_style="cosine", distributed_optimizer=distributed)


def build(hf_dir, ps, *, inputs=None, distributed: bool = True, force_distributed: bool = False,
          dtype=torch.float32) -> Setup:
    """Student + teacher stage, DDP, optimizer and scheduler at the current parallel state.

    ``force_distributed``: the distributed optimizer even at DP=1 (one shard; build_optimizer only
    picks it for DP > 1), to load another optimizer kind's checkpoint in one process."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    from vigos_megatron.schedule.stage import StudentTeacherStage
    from vigos_megatron.training.optimizer import build_optimizer, ddp_config

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    inputs = inputs if inputs is not None else sc.build_inputs(hf_dir)
    builder, student, teacher = sc.build_models(hf_dir, tp, pp, dtype=dtype)
    stage = StudentTeacherStage(student, teacher)
    config = stage.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ocfg = optimizer_config(distributed)
    opt_dp = max(dp, 2) if force_distributed else dp
    model = [DistributedDataParallel(config, ddp_config(ocfg, dp_size=opt_dp), stage)]
    optimizer, scheduler = build_optimizer(ocfg, model, total_steps=TOTAL_STEPS, dp_size=opt_dp)
    batches = inputs.batches[dp_rank::dp]
    _, _, loss_fn = sc.make_loss(batches, ps)
    return Setup(builder, student, teacher, model, optimizer, scheduler, batches, loss_fn)


def train_step(s: Setup, ps) -> dict:
    """One optimizer step; returns {"loss", "grad_norm", "lr"} (loss: the last stage's, broadcast)."""
    from vigos_megatron.runtime import compute_device
    from vigos_megatron.schedule.forward_step import LOSS_KEY, reduce_reports, run_stream_schedule

    s.model[0].train()
    s.model[0].zero_grad_buffer()
    s.optimizer.zero_grad()
    reports = run_stream_schedule(s.model, s.batches, s.loss_fn)
    red = reduce_reports(reports, ps.get_data_parallel_group())
    lr = float(s.optimizer.param_groups[0]["lr"])
    ok, grad_norm, _ = s.optimizer.step()
    assert ok
    s.scheduler.step(increment=1)
    loss = sc.broadcast_from_last_stage(
        torch.tensor([red.get(LOSS_KEY, float("nan"))], dtype=torch.float64, device=compute_device()), ps).cpu()
    return {"loss": float(loss), "grad_norm": float(grad_norm), "lr": lr}


def params(s: Setup) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in s.student.named_parameters()}


def optimizer_state(s: Setup) -> dict[str, torch.Tensor]:
    """This rank's optimizer tensors by ``key@offset`` (megatron's model-space sharded view).

    With the distributed optimizer only data-parallel rank 0 returns tensors (gathered)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, apply_factories

    from vigos_megatron.training.checkpoint import OPTIMIZER_METADATA

    sd = s.optimizer.sharded_state_dict(s.student.sharded_state_dict(), metadata=dict(OPTIMIZER_METADATA))
    apply_factories(sd)  # e.g. the gated fc1 -> its two stored halves, each with its layer offset
    out = {}
    for v in nested_values(sd):
        assert not isinstance(v, ShardedTensorFactory)
        if isinstance(v, ShardedTensor):
            key = f"{v.key}@{tuple(v.global_offset)}"
            assert key not in out, key
            out[key] = v.data.detach().cpu().clone()
    return out


def adam_step_count(s: Setup) -> float:
    st = s.optimizer.state_dict()
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("step", "common_step") and not isinstance(v, (dict, list)):
                    found.append(float(v))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(st)
    assert found, "no Adam step count in the optimizer state"
    return max(found)


def draws() -> list:
    """The next values of every RNG stream (python, numpy, torch, megatron's tracker)."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(), tracked]


def hf_tensors(s: Setup, what: str = "params") -> dict[str, torch.Tensor]:
    """The student's full tensors under HF names, gathered over TP/PP (collective).

    ``what``: "params", or an optimizer state name ("exp_avg", "exp_avg_sq") carried through the
    same export (a carrier chunk holds the local state shards in place of the weights).
    """
    if what == "params":
        chunks = [s.student]
    else:
        carrier = s.builder.build(init_weights=False)
        src = dict(s.student.named_parameters())
        local = _local_optimizer_state(s, what)
        with torch.no_grad():
            for name, p in carrier[0].named_parameters():
                p.copy_(local[id(src[name])])
        chunks = carrier
    return {n: t.detach().double().clone() for n, t in s.builder.export_hf_weights(chunks, show_progress=False)}


def _local_optimizer_state(s: Setup, what: str) -> dict[int, torch.Tensor]:
    """id(model param) -> this rank's full local ``what`` tensor (non-distributed optimizers)."""
    out = {}
    for opt in s.optimizer.chained_optimizers:
        inner = opt.optimizer
        groups = getattr(opt, "float16_groups", None)
        mains = getattr(opt, "fp32_from_float16_groups", None)
        if groups is not None:  # mixed precision: state keyed by the fp32 main params
            for g_model, g_main in zip(groups, mains):
                for p, m in zip(g_model, g_main):
                    out[id(p)] = inner.state[m][what]
        for group in inner.param_groups:
            for p in group["params"]:
                if p in inner.state and id(p) not in out:
                    out[id(p)] = inner.state[p][what]
    return out
