"""The GPU configuration's step on the CPU against the same step in fp32, on identical rollouts.

    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 precision_worker.py RUN_DIR

DP=2 (TP=1, PP=1), ``conf/tiny_cpu.yaml`` with the demo's cached assets. The reference run (fp32,
``local`` spec, the torch KL, the fp32 distributed optimizer) generates this rank's rollouts once;
the GPU configuration (bf16 parameters with fp32 main weights in megatron's distributed optimizer,
the ``sdpa`` spec, ``loss.impl=triton`` under Triton's interpreter, fp32 logits for the loss)
computes its step's gradients on the same rollouts (:func:`vigos_megatron.testing.precision.step_gradients`).
Prints ``PREC {json}`` per rank (keys in :func:`compare`) and ``RESUME {json}`` (the steps each
launch of the loop ran).

Then the training loop itself (:func:`vigos_megatron.training.loop.train`) in that configuration,
in this process group: 2 steps straight (``RUN_DIR/straight``), and 1 step, a checkpoint, and the
resumed second step (``RUN_DIR/split``); the test compares their ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf" / "tiny_cpu.yaml"
# the comparison reads the logits the loss reads: the logits path (loss.from_hidden=false)
BASE = ["parallel.tp=1", "optimizer.distributed_optimizer=true", "loss.from_hidden=false"]
REFERENCE = ["model.dtype=float32", "model.transformer_impl=local", "loss.impl=torch"]
GPU_CONFIG = ["model.dtype=bfloat16", "model.transformer_impl=sdpa", "loss.impl=triton", "loss.logits_dtype=float32"]


def config(run_dir: Path, *overrides: str):
    from vigos_megatron.training.launch import load_run_config
    from vigos_megatron.training.tiny_demo import with_tiny_paths

    cfg, layout = load_run_config(str(CONFIG), [f"run_dir={run_dir}", *BASE, *overrides],
                                  int(os.environ["WORLD_SIZE"]))
    return with_tiny_paths(cfg), layout


def compare(run_dir: Path, ps) -> dict:
    """The GPU configuration's step against the fp32 one on this rank's identical rollouts."""
    from vigos_megatron.testing.precision import grad_errors, step_gradients
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.training.rollouts import generate_rollouts
    from vigos_megatron.training.setup import build_run

    ref_cfg, layout = config(run_dir, *REFERENCE)
    gpu_cfg, _ = config(run_dir, *GPU_CONFIG)
    ctx, _ = build_run(ref_cfg, layout)
    samples = next(iter(ctx.loader))["samples"]
    rollouts = generate_rollouts(ctx.engine, samples, ref_cfg.sampling, step=0, tokenizer=ctx.tokenizer,
                                 parse=parse_completion)
    optimizer_kinds = {"fp32": type(ctx.optimizer.chained_optimizers[0]).__name__}
    del ctx
    ref = step_gradients(ref_cfg, layout, rollouts, ps)
    ctx, _ = build_run(gpu_cfg, layout)
    optimizer_kinds["bf16"] = type(ctx.optimizer.chained_optimizers[0]).__name__
    param_dtypes = sorted({str(p.dtype) for p in ctx.models.student[0].parameters()})
    main_dtypes = sorted({str(p.dtype) for g in ctx.optimizer.param_groups for p in g["params"]})
    spec = type(ctx.models.student[0].language_model.decoder.layers[0].self_attention.core_attention).__name__
    del ctx
    gpu = step_gradients(gpu_cfg, layout, rollouts, ps)
    per, whole = grad_errors(gpu.grads, ref.grads, ps.get_tensor_model_parallel_group())
    errs = [e for _, e in per]
    lm = [e for n, e in per if n.startswith("language_model.")]
    terms = sorted(k for k in ref.reports if k.startswith("kl/") and ref.reports[k] == ref.reports[k])
    return {
        "rank": int(os.environ["RANK"]), "tokens": int(ref.kl.numel()), "optimizers": optimizer_kinds,
        "param_dtypes": param_dtypes, "main_param_dtypes": main_dtypes, "core_attention": spec,
        "logits_dtype": str(gpu.logits_dtype), "loss": [gpu.loss, ref.loss],
        "terms": {k: [gpu.reports[k], ref.reports[k]] for k in terms},
        "grad_norm": [gpu.grad_norm, ref.grad_norm], "grad_whole": whole,
        "grad_median": statistics.median(errs), "grad_lm_median": statistics.median(lm), "grad_lm_max": max(lm),
        "kl_rel": float((gpu.kl - ref.kl).norm() / ref.kl.norm()),
        "clip_flips": int((gpu.clipped != ref.clipped).sum()),
    }


def main() -> int:
    from vigos_megatron import startup
    from vigos_megatron.training.console import quiet_library_logs
    from vigos_megatron.training.loop import train
    from vigos_megatron.training.tiny_demo import prepare_tiny_run

    quiet_library_logs(int(os.environ["RANK"]))
    run_dir = Path(sys.argv[1])
    ps = startup.init_distributed(1, 1, seed=1234)
    try:
        prepare_tiny_run(config(run_dir)[0], log=lambda _line: None)
        print("PREC " + json.dumps(compare(run_dir / "compare", ps)), flush=True)
        quiet = lambda _line: None  # noqa: E731
        done = [train(*config(run_dir / "straight", *GPU_CONFIG, "train.steps=2"), log=quiet).steps,
                train(*config(run_dir / "split", *GPU_CONFIG, "train.steps=2", "train.exit_after=1"), log=quiet).steps,
                train(*config(run_dir / "split", *GPU_CONFIG, "train.steps=2"), log=quiet).steps]  # resumes at step 1
        print("RESUME " + json.dumps({"rank": int(os.environ["RANK"]), "steps_per_launch": done}), flush=True)
    finally:
        startup.destroy_distributed()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
