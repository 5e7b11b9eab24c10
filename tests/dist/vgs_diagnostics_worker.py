"""VGS eta diagnostics and ``reduction: sequence`` inside the training schedule (one gloo rank).

    torchrun --nproc_per_node 1 vgs_diagnostics_worker.py RUN_DIR

``conf/tiny_cpu.yaml`` at TP1 with ``loss.objective=vgs`` (the privileged self-teacher, setting b),
``loss.vgs.reduction=sequence`` and ``loss.vgs.eta_diagnostics_interval=1``. On the first step's
rollouts: the probes' gradient norms (:func:`~vigos_megatron.training.update.probe_gradient_norms`, the
optimizer's norm, cosine and eta by polarisation) against the gradients of the same probe losses taken
from the parameters' ``main_grad`` and combined by hand; and the step's own gradient before and
after the probes. Then the loop itself, 2 steps with the diagnostics on and off. Prints ``DIAG {json}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf" / "tiny_cpu.yaml"
BASE = ["parallel.tp=1", "loss.objective=vgs", "loss.vgs.reduction=sequence", "train.steps=2"]


def config(run_dir: Path, *overrides: str):
    from vigos_megatron.training.launch import load_run_config
    from vigos_megatron.training.tiny_demo import with_tiny_paths

    cfg, layout = load_run_config(str(CONFIG), [f"run_dir={run_dir}", *BASE, *overrides], int(os.environ["WORLD_SIZE"]))
    return with_tiny_paths(cfg), layout


def gradient(model) -> torch.Tensor:
    """The student's gradient as one float64 vector (TP1, PP1, DP1: every parameter whole here)."""
    params = [p for m in model for p in m.parameters() if p.requires_grad]
    return torch.cat([p.main_grad.detach().double().reshape(-1) for p in params])


def probes_against_hand(run_dir: Path, ps) -> dict:
    from vigos_megatron import objectives
    from vigos_megatron.objectives.vgs import ETA_PROBES
    from vigos_megatron.rollout.formats import completion_parser
    from vigos_megatron.schedule.forward_step import ReportedLoss
    from vigos_megatron.training.rollouts import generate_rollouts
    from vigos_megatron.training.scoring import build_gradient_probes, build_step_inputs
    from vigos_megatron.training.setup import build_run
    from vigos_megatron.training.update import compute_gradients, probe_gradient_norms

    cfg, layout = config(run_dir, "loss.vgs.eta_diagnostics_interval=1")
    ctx, _ = build_run(cfg, layout)
    model, opt = ctx.models.model, ctx.optimizer
    samples = next(iter(ctx.loader))["samples"]
    rollouts = generate_rollouts(ctx.engine, samples, cfg.sampling, step=0, tokenizer=ctx.tokenizer,
                                 parse=completion_parser("vigos"))
    groups = {"dp_group": ps.get_data_parallel_group(), "tp_group": ps.get_tensor_model_parallel_group()}
    inputs = build_step_inputs(rollouts, cfg, hf_config=ctx.models.builder.hf_config, pad_id=ctx.pad_id,
                               cut=ctx.cut, model=model, **groups)
    compute_gradients(model, opt, inputs.batches, inputs.loss_fn)
    before = gradient(model).clone()
    probes = build_gradient_probes(cfg, inputs.batches, 1, **groups)
    norms = probe_gradient_norms(model, opt, inputs.batches, probes)
    compute_gradients(model, opt, inputs.batches, inputs.loss_fn)
    after = gradient(model)
    by_hand = {}
    for name, fn in build_gradient_probes(cfg, inputs.batches, 1, **groups).items():
        compute_gradients(model, opt, inputs.batches, ReportedLoss(fn))
        by_hand[name] = gradient(model).clone()
    g_std, g_vis = by_hand["std"], by_hand["vis"]
    gamma = cfg.loss.vgs.gamma
    return {
        "probes": sorted(probes), "expected_probes": sorted(ETA_PROBES),
        "none_at_step_2": build_gradient_probes(config(run_dir, "loss.vgs.eta_diagnostics_interval=3")[0],
                                                inputs.batches, 2, **groups) == {},
        "metrics": objectives.get("vgs").probe_metrics(cfg.loss.vgs, norms),
        "hand": {"vgs/grad_norm_std": float(g_std.norm()), "vgs/grad_norm_vis": float(g_vis.norm()),
                 "vgs/grad_cosine": float(g_std @ g_vis / (g_std.norm() * g_vis.norm())),
                 "vgs/implied_eta": float(g_std.norm() / (g_std + gamma * g_vis).norm())},
        "sum_probe_rel": float((by_hand["std+vis"] - g_std - g_vis).norm() / by_hand["std+vis"].norm()),
        "step_gradient_unchanged": bool(torch.equal(before, after)), "step_grad_norm": float(before.norm()),
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
        out = probes_against_hand(run_dir / "probes", ps)
        quiet = lambda _line: None  # noqa: E731
        for name, k in (("on", 1), ("off", 0)):
            train(*config(run_dir / name, f"loss.vgs.eta_diagnostics_interval={k}"), log=quiet)
            out[f"metrics_{name}"] = [json.loads(x) for x in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        print("DIAG " + json.dumps(out), flush=True)
    finally:
        startup.destroy_distributed()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
