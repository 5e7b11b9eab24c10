#!/usr/bin/env python
"""One training step in bf16 against the same step in fp32, on IDENTICAL rollouts.

    python benchmarks/bench_precision.py [--nproc-per-node 2] [--batch 0] [--per-parameter]
                                         [--config conf/tiny_cpu.yaml] [key=value ...]

The rollouts are generated once, by the fp32 ``local`` run's engine from the first batch of the
loader, and fed to every variant: the layer spec (``local``, ``sdpa``) x the parameter dtype
(fp32, bf16 with fp32 main weights) x the logits the loss reads in a bf16 model
(``loss.logits_dtype``: ``model`` = rounded to bf16, ``float32`` = the output layer's fp32
accumulator). Each variant is built by the training's own set-up (``training/setup.py``
``build_run``), scored by ``training/scoring.py`` and differentiated by ``training/update.py``
``compute_gradients`` (the step without the update; :mod:`vigos_megatron.testing.precision`).
Printed per variant, against the fp32 ``local`` step: loss, each term, clip fraction, gradient norm; the per-token KL (max and relative
L2 difference); tokens whose clip decision differs; the per-parameter gradient relative error
``|g - g_fp32| / |g_fp32|`` (median and max over the student's parameter tensors, shards summed
over TP) and the whole gradient's. The last table pairs the two bf16 layer specs: their gradients
against each other (same rounding budget, different rounding: the spread the noise alone gives);
``--per-parameter`` adds every parameter tensor's error.

``--batch K`` generates from the loader's batch ``K`` instead of the first step's; overrides go to
every variant (``loss.vigos.clip=0``: the step without the clip's discontinuity). What the tables
showed on the CPU: ``benchmarks/results/bench_precision_cpu_2core.txt`` and the README.

Layouts: TP x 1 x 1 (``parallel.tp``, ``--nproc-per-node`` = TP; PP = DP = 1: rank 0 holds every
parameter and every token it prints). Objectives with segmented terms (vigos, opsd, opd).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "fp32 local"
#: the comparison reads the logits the loss reads: the loss from logits (the hidden-state path
#: forms fp32 chunks whatever the model's dtype)
LOGITS_PATH = ["loss.from_hidden=false"]
#: name -> overrides; the first is the reference (its engine generates the rollouts)
VARIANTS = {
    REFERENCE: ["model.dtype=float32", "model.transformer_impl=local"],
    "fp32 sdpa": ["model.dtype=float32", "model.transformer_impl=sdpa"],
    "bf16 local, bf16 logits": ["model.dtype=bfloat16", "model.transformer_impl=local", "loss.logits_dtype=model"],
    "bf16 sdpa, bf16 logits": ["model.dtype=bfloat16", "model.transformer_impl=sdpa", "loss.logits_dtype=model"],
    "bf16 local, fp32 logits": ["model.dtype=bfloat16", "model.transformer_impl=local", "loss.logits_dtype=float32"],
    "bf16 sdpa, fp32 logits": ["model.dtype=bfloat16", "model.transformer_impl=sdpa", "loss.logits_dtype=float32"],
}


def print_per_parameter(results: dict, ps, say) -> None:
    """Every student parameter tensor's gradient relative error, one column per variant."""
    from vigos_megatron.testing.precision import grad_errors

    ref = results[REFERENCE]
    cols = {name: dict(grad_errors(r.grads, ref.grads, ps.get_tensor_model_parallel_group())[0])
            for name, r in results.items() if name != REFERENCE}
    say("\n" + f"{'parameter':60} {'|g_fp32|':>9} " + " ".join(f"{n[:22]:>22}" for n in cols))
    for n in sorted(ref.grads):
        say(f"{n[-60:]:60} {float(ref.grads[n].norm()):9.2e} " + " ".join(f"{c[n]:22.4f}" for c in cols.values()))


def print_tables(results: dict, ps, *, per_parameter: bool = False) -> None:
    import torch

    from vigos_megatron.testing.precision import grad_errors

    ref = results[REFERENCE]
    terms = sorted(k for k in ref.reports if k.startswith("kl/"))
    rank0 = torch.distributed.get_rank() == 0
    say = print if rank0 else (lambda *_a, **_k: None)
    n = ref.kl.numel()
    say(f"\none step on identical rollouts ({n} scored tokens), TP={ps.get_tensor_model_parallel_world_size()}; "
        f"reference: {REFERENCE}")
    head = f"{'variant':26} {'logits':>8} {'loss':>9} " + " ".join(f"{t[3:]:>10}" for t in terms)
    say(head + f" {'clip':>6} {'grad norm':>9} {'norm err':>8}")
    for name, r in results.items():
        vals = " ".join(f"{r.reports.get(t, float('nan')):10.6f}" for t in terms)
        err = r.grad_norm / ref.grad_norm - 1
        say(f"{name:26} {str(r.logits_dtype).replace('torch.', ''):>8} {r.loss:9.6f} {vals} "
            f"{r.reports.get('clip_fraction', float('nan')):6.4f} {r.grad_norm:9.5f} {err:+8.2%}")
    say(f"\n{'variant':26} {'KL max abs':>10} {'KL rel L2':>9} {'clip flips':>10} {'grad rel err: median':>20} "
        f"{'max':>7} {'whole':>7}  worst parameter")
    for name, r in results.items():
        dkl = (r.kl - ref.kl).abs()
        rel_kl = float((r.kl - ref.kl).norm() / ref.kl.norm())
        flips = int((r.clipped != ref.clipped).sum())
        per, total = grad_errors(r.grads, ref.grads, ps.get_tensor_model_parallel_group())
        errs = [e for _, e in per]
        worst = max(per, key=lambda x: x[1])
        say(f"{name:26} {float(dkl.max()):10.2e} {rel_kl:9.2e} {flips:10d} {statistics.median(errs):20.4f} "
            f"{max(errs):7.4f} {total:7.4f}  {worst[0]}")
    pairs = [("bf16 local, bf16 logits", "bf16 sdpa, bf16 logits"), ("bf16 local, fp32 logits", "bf16 sdpa, fp32 logits"),
             ("fp32 local", "fp32 sdpa")]
    say(f"\n{'local vs sdpa (same dtype)':50} {'grad rel err: median':>20} {'max':>7} {'whole':>7}")
    for a, b in pairs:
        per, total = grad_errors(results[b].grads, results[a].grads, ps.get_tensor_model_parallel_group())
        errs = [e for _, e in per]
        say(f"{a + ' / ' + b:50} {statistics.median(errs):20.4f} {max(errs):7.4f} {total:7.4f}")
    if per_parameter:
        print_per_parameter(results, ps, say)


def rank_main(config: str, overrides: list[str], *, per_parameter: bool, batch: int) -> int:
    from vigos_megatron import startup
    from vigos_megatron.training.console import quiet_library_logs
    from vigos_megatron.training.launch import load_run_config

    quiet_library_logs(int(os.environ.get("RANK", "0")))
    from vigos_megatron.testing.precision import step_gradients
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.training.rollouts import generate_rollouts

    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [*LOGITS_PATH, *overrides]
    cfg, layout = load_run_config(config, overrides + VARIANTS[REFERENCE], world)
    if layout.pp != 1 or layout.dp != 1:
        raise SystemExit(f"bench_precision: TP x 1 x 1 layouts only (got TP={layout.tp} PP={layout.pp} DP={layout.dp})")
    ps = startup.init_distributed(cfg.parallel.tp, 1, seed=cfg.train.seed)
    try:
        if cfg.tiny.enabled:
            from vigos_megatron.training.tiny_demo import prepare_tiny_run

            cfg = prepare_tiny_run(cfg)  # the tiny demo's assets (a cache; built once, about a minute)
        results, rollouts = {}, None
        for name, extra in VARIANTS.items():
            vcfg, _ = load_run_config(config, overrides + extra, world)
            if vcfg.tiny.enabled:
                from vigos_megatron.training.tiny_demo import with_tiny_paths

                vcfg = with_tiny_paths(vcfg)
            if rollouts is None:  # the reference: its engine samples the step's rollouts once
                from vigos_megatron.training.setup import build_run

                ctx, _ = build_run(vcfg, layout)
                batches = iter(ctx.loader)
                for _ in range(batch):  # the loader's batch number ``batch`` (0: the first step's)
                    next(batches)
                samples = next(batches)["samples"]
                rollouts = generate_rollouts(ctx.engine, samples, vcfg.sampling, step=0, tokenizer=ctx.tokenizer,
                                             parse=parse_completion)
                del ctx
            results[name] = step_gradients(vcfg, layout, rollouts, ps)
        print_tables(results, ps, per_parameter=per_parameter)
    finally:
        startup.destroy_distributed()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--config", default=str(ROOT / "conf" / "tiny_cpu.yaml"))
    ap.add_argument("--nproc-per-node", type=int, default=2, help="ranks (= parallel.tp)")
    ap.add_argument("--batch", type=int, default=0, help="the loader's batch to generate from (0: the first step's)")
    ap.add_argument("--per-parameter", action="store_true", help="also print every parameter's gradient error")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. parallel.tp=1)")
    args = ap.parse_args()
    from vigos_megatron.training import launch

    if launch.under_torchrun():
        return rank_main(args.config, args.overrides, per_parameter=args.per_parameter, batch=args.batch)
    overrides = [f"parallel.tp={args.nproc_per_node}", *args.overrides]
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.append(f"run_dir={tempfile.mkdtemp(prefix='bench-precision-')}/run")  # never resumes a checkpoint
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}",
            str(Path(__file__).resolve()), "--config", args.config, "--batch", str(args.batch),
            *(["--per-parameter"] if args.per_parameter else []),
            *overrides]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 1


if __name__ == "__main__":
    sys.exit(main())
