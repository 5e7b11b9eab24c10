"""Demo: the ViGOS objective on random vocabulary-sharded logits under tensor parallelism.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \
        examples/demo_vigos_loss.py [--config conf/demo_loss.yaml] [key=value ...]

A synthetic batch of rollouts (some valid, with description and reasoning spans;
some malformed) is laid out as the last pipeline stage would see it: one stream
``[S, (1+3)*B, V/tp]`` of student rows and perception/reasoning/reference teacher
rows. The configured objective is computed with the vocabulary sharded over the
tensor-parallel group (no all-gather of logits), back-propagated, and each term
is printed. The configuration is validated before any process group starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vigos_megatron.config.demo import DemoConfig  # noqa: E402
from vigos_megatron.config.loader import ConfigError, load_config  # noqa: E402


def synthetic_batch(cfg: DemoConfig, v_local: int, rank: int):
    """Stream logits (this rank's shard) and the DistillTokens of one micro-batch."""
    import torch

    from vigos_megatron.losses.objectives import PERCEPTION, REASONING, REFERENCE, DistillTokens

    B, L, K = cfg.rollouts, cfg.completion_tokens, 3
    S, R = L + 8, (1 + K) * B
    g = torch.Generator().manual_seed(cfg.seed)
    n_invalid = round(cfg.invalid_fraction * B)
    sidx, tidx, seg = [], [], []
    offsets = torch.randint(2, 8, (B,), generator=g)  # prompt lengths differ per row
    for b in range(B):
        off = int(offsets[b])
        if b < n_invalid:  # malformed: every completion token to the reference teacher
            spans = [(REFERENCE, 2, range(L))]
        else:
            d_end = int(torch.randint(L // 4, L // 2, (1,), generator=g))
            spans = [(PERCEPTION, 0, range(0, d_end)), (REASONING, 1, range(d_end + 3, L - 2))]
        for s_id, ctx, positions in spans:
            for p in positions:
                sidx.append((off + p) * R + b)
                # teacher contexts have their own prompt lengths: shift by the context id
                tidx.append((min(S - 1, off + p + ctx)) * R + B + ctx * B + b)
                seg.append(s_id)
    gen = torch.Generator().manual_seed(cfg.seed * 100 + rank)  # each rank its own vocabulary shard
    stream = torch.randn(S, R, v_local, generator=gen) * 2.0
    # each teacher row scored against a student row is a noisy copy of it (KL ~ 0.5 sigma^2),
    # noise level drawn per token so that some tokens fall above the clip and some below
    flat = stream.view(S * R, v_local)
    sigma = 0.1 + 0.35 * torch.rand(len(sidx), generator=g)
    for i, (si, ti) in enumerate(zip(sidx, tidx)):
        flat[ti] = flat[si] + float(sigma[i]) * torch.randn(v_local, generator=gen)
    tokens = DistillTokens(torch.tensor(sidx), torch.tensor(tidx), torch.tensor(seg))
    return stream, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "conf" / "demo_loss.yaml"))
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.vigos.clip=0.1")
    args = p.parse_args()
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.tensor_parallel:
        sys.exit(f"config error: tensor_parallel={cfg.tensor_parallel} but launched on {world} processes")

    import torch
    import torch.distributed as dist

    from vigos_megatron import platform
    from vigos_megatron import objectives
    from vigos_megatron.losses.objectives import VGSTokens
    from vigos_megatron.objectives.vgs import VGS

    from vigos_megatron.training.console import quiet_known_warnings

    quiet_known_warnings(int(os.environ.get("RANK", "0")))  # known library warnings kept off the console
    platform.activate()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp_group = dist.group.WORLD if world > 1 else None
    v_local = cfg.vocab_size // cfg.tensor_parallel
    stream, tokens = synthetic_batch(cfg, v_local, rank)
    stream.requires_grad_()
    objective = objectives.get(cfg.loss.objective)
    # a one-term objective gives every token its term 0
    seg = tokens.segment if len(objective.terms) == 3 else torch.zeros_like(tokens.segment)
    tokens = type(tokens)(tokens.student_index, tokens.teacher_index, seg)
    # DP=1 here: pass the DP group in training
    loss_fn = objective.build_loss(getattr(cfg.loss, objective.name), [tokens], chunk_bytes=cfg.loss.chunk_bytes,
                                   impl=cfg.loss.impl, dp_group=None, tp_group=tp_group)
    if isinstance(objective, VGS):
        # reuse the stream's rows as (student I,x), (student x), (teacher I,x), (teacher x)
        B, R = cfg.rollouts, stream.shape[1]
        pos = tokens.student_index // R
        b = tokens.student_index % R
        batch = VGSTokens(pos * R + b, tokens.teacher_index, pos * R + B + b, pos * R + 2 * B + b)
    else:
        batch = tokens
    loss, num_tokens, report = loss_fn(batch, stream)
    (loss / num_tokens).backward()
    grad_sq = stream.grad.double().pow(2).sum()
    dist.all_reduce(grad_sq)
    if rank == 0:
        print(f"objective={cfg.loss.objective} tp={world} vocab={cfg.vocab_size} (shard {v_local}/rank) "
              f"rollouts={cfg.rollouts} supervised tokens={int(num_tokens)}")
        for key, (s, c) in sorted((k, v.tolist()) for k, v in report.items()):
            mean = s / c if c else float("nan")
            print(f"  {key:<32} {mean:>10.5f}   ({s:.4g} / {c:.0f})")
        print(f"  {'loss (normalised)':<32} {float(loss.detach() / num_tokens):>10.5f}")
        print(f"  {'grad norm (all shards)':<32} {float(grad_sq.sqrt()):>10.5f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
