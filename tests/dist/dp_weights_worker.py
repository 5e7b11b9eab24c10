"""DP=2 (TP=1, PP=1): the rollouts after an optimizer step are generated from the post-step weights.

    torchrun --nproc_per_node 2 dp_weights_worker.py RUN_DIR OVERLAP STEPS

Built exactly as the training loop builds a run (``conf/tiny_cpu.yaml`` at TP=1, the demo's
cached checkpoint and shards, :func:`vigos_megatron.training.setup.build_run`: megatron
DDP + the distributed optimizer, ``optimizer.overlap_param_gather=OVERLAP``). One fixed batch of
this rank's prompts is generated, scored and trained on, ``STEPS`` times, as in the loop:
``ensure_params_gathered -> generate_rollouts -> build_step_inputs -> train_step``.

After each step the post-step weights are rebuilt independently of DDP's gather: every rank
takes the slice of each parameter that its distributed-optimizer shard owns from the optimizer's
main parameters (``_get_model_param_range_map``), the slices are summed over the data-parallel
group (they partition each parameter: a coverage count checks it). The engine's first-token
(prefill) logits, captured with a forward hook on the student's output layer, are compared with
those of a second engine over an independent model loaded with those reference weights, and with
the logits the same prompts got before the step. The megatron DDP bucket groups' gather state is
recorded around each generation: an all-gather issued inside the engine shows as a change.

Prints ``DPW0 {json}`` per rank (before any step: the reference engine over an identical model
reproduces the engine's logits) and ``DPW {json}`` per rank and step (keys in :func:`main`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf" / "tiny_cpu.yaml"


class PrefillLogits:
    """``with PrefillLogits(chunk) as cap: engine.generate(...)``; then ``cap.logits``: the output
    layer (the module, with this chunk's weights) on the final norm's first output inside the
    block, i.e. the logits ``[B, V]`` of the prefill's last column (B prompts of the round, in the
    engine's order). The engine's own output product may round differently (oneDNN on the CPU):
    compare captures with captures."""

    def __init__(self, chunk):
        from vigos_megatron.rollout.engine import _unwrap

        self.lm = _unwrap(chunk).language_model
        self.layer = self.lm.decoder.final_layernorm
        self.logits: torch.Tensor | None = None

    def _hook(self, module, args, out):
        if self.logits is None:
            lm = self.lm
            weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
            with torch.no_grad():
                logits, _ = lm.output_layer(out.detach(), weight=weight, runtime_gather_output=False)
            self.logits = logits[0].clone()  # [1, B, V] -> [B, V]

    def __enter__(self):
        self.logits = None
        self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        assert exc[0] is not None or self.logits is not None, "the engine never reached the output layer"


def trainable(chunks) -> dict[str, torch.nn.Parameter]:
    return {n: p for c in chunks for n, p in c.named_parameters() if p.requires_grad}


def snapshot(params: dict) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def owned_ranges(optimizer) -> dict[int, tuple[int, int, torch.Tensor]]:
    """``id(model param) -> (start, end, main shard)``: the flat slice this DP rank's optimizer owns."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        assert hasattr(opt, "_get_model_param_range_map"), f"not a distributed optimizer: {type(opt).__name__}"
        pairs = list(zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)) + list(
            zip(opt.model_fp32_groups, opt.shard_fp32_groups))
        for model_group, main_group in pairs:
            for mp, main in zip(model_group, main_group):
                r = opt._get_model_param_range_map(mp)["param"]
                out[id(mp)] = (r.start, r.end, main)
    return out


def reference_params(params: dict, optimizer, dp_group) -> tuple[dict, dict, float]:
    """The full post-step parameters from the optimizer's main shards, summed over DP ranks.

    Returns ``(reference, owned_mask, coverage_error)``: ``owned_mask[name]`` is this rank's
    flat slice (bool), ``coverage_error`` the largest deviation of the per-element owner count from 1.
    """
    ranges = owned_ranges(optimizer)
    ref, mask, cover_err = {}, {}, 0.0
    for name, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
        count = torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
        owned = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        if id(p) in ranges:
            s, e, main = ranges[id(p)]
            flat[s:e] = main.detach().to(p.dtype).double()  # what megatron copies into the model param
            count[s:e] = 1
            owned[s:e] = True
        dist.all_reduce(flat, group=dp_group)
        dist.all_reduce(count, group=dp_group)
        cover_err = max(cover_err, float((count - 1).abs().max()))
        ref[name] = flat.to(p.dtype).view_as(p)
        mask[name] = owned.view_as(p)
    return ref, mask, cover_err


def gather_state(model) -> list[tuple[bool, bool]]:
    """Per megatron DDP bucket group: (all-gather dispatched since the last gradient reduction, none in flight)."""
    return [(bool(g.param_gather_dispatched), g.param_gather_handle is None)
            for c in model for g in list(c.bucket_groups) + list(c.expert_parallel_bucket_groups)]


def max_diff(a: dict, b: dict, where: dict | None = None) -> float:
    out = 0.0
    for n in a:
        d = (a[n].double() - b[n].double()).abs()
        if where is not None:
            d = d[where[n]]
        if d.numel():
            out = max(out, float(d.max()))
    return out


def main():
    run_dir, overlap, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])

    from vigos_megatron import startup
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(PretrainConfig, CONFIG, [
        f"run_dir={run_dir}", "parallel.tp=1", "parallel.pp=1", "train.global_batch_size=4",
        "train.micro_batch_size=2", f"train.steps={steps}", "sampling.max_new_tokens=6",
        "optimizer.distributed_optimizer=true", f"optimizer.overlap_param_gather={str(overlap).lower()}",
    ])
    layout = validate_layout(cfg, world)
    assert layout.dp == 2, layout
    startup.init_distributed(1, 1, seed=cfg.train.seed)
    import megatron.bridge  # noqa: F401
    from megatron.core import parallel_state as ps

    from vigos_megatron.rollout.engine import MegatronRolloutEngine
    from vigos_megatron.rollout.segments import stop_token_ids
    from vigos_megatron.training.setup import build_run
    from vigos_megatron.training.optimizer import ensure_params_gathered
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.training.rollouts import generate_rollouts
    from vigos_megatron.training.scoring import build_step_inputs
    from vigos_megatron.training.tiny_demo import prepare_tiny_run
    from vigos_megatron.training.update import train_step

    cfg = prepare_tiny_run(cfg)
    ctx, state = build_run(cfg, layout)
    assert state is None, "fresh run_dir expected"
    ddp = ctx.models.model[0].ddp_config
    assert ddp.use_distributed_optimizer and ddp.overlap_param_gather == overlap, ddp
    dp_group = ps.get_data_parallel_group()
    hf_config = ctx.models.builder.hf_config
    samples = next(iter(ctx.loader))["samples"]
    assert samples, "this rank drew no usable sample"

    student = ctx.models.student
    params = trainable(student)

    reference = ctx.models.builder.build(init_weights=False)
    ref_params = dict(reference[0].named_parameters())
    assert set(params) <= set(ref_params), "reference model lacks student parameters"
    with torch.no_grad():
        for n, p in student[0].named_parameters():  # frozen ones (if any) as they are
            ref_params[n].copy_(p)
    ref_engine = MegatronRolloutEngine(reference, hf_config=hf_config, stop_token_ids=stop_token_ids(ctx.tokenizer),
                                       pad_token_id=ctx.pad_id)

    # step 0's rollouts, from the initial weights (exactly the loop's pre-generation path)
    ensure_params_gathered(ctx.models.model)
    with PrefillLogits(student[0]) as cap:
        rollouts = generate_rollouts(ctx.engine, samples, cfg.sampling, step=0, tokenizer=ctx.tokenizer,
                                     parse=parse_completion)
    logits_before = cap.logits
    with PrefillLogits(reference[0]) as cap:
        ref_out = ref_engine.generate([_prompt(s) for s in samples], cfg.sampling, step=0)
    logits_ref0 = cap.logits
    print("DPW0 " + json.dumps({
        "rank": dist.get_rank(), "prompts": len(samples), "logits_shape": list(logits_before.shape),
        "ref_vs_engine": float((logits_ref0.double() - logits_before.double()).abs().max()),
        "tokens_equal_ref": [r.completion.tolist() for r in rollouts] == [c.token_ids.tolist() for c in ref_out],
    }), flush=True)

    for step in range(1, steps + 1):
        pre = snapshot(params)
        inputs = build_step_inputs(rollouts, cfg, hf_config=hf_config, pad_id=ctx.pad_id, cut=ctx.cut,
                                   model=ctx.models.model, dp_group=dp_group,
                                   tp_group=ps.get_tensor_model_parallel_group())
        result = train_step(ctx.models.model, ctx.optimizer, ctx.scheduler, inputs.batches, inputs.loss_fn,
                            on_nonfinite="stop")
        del inputs
        raw = snapshot(params)  # what a reader sees right after optimizer.step()
        ref, owned, cover_err = reference_params(params, ctx.optimizer, dp_group)
        not_owned = {n: ~m for n, m in owned.items()}

        # the loop's pre-generation path
        forced = ensure_params_gathered(ctx.models.model)
        forced_again = ensure_params_gathered(ctx.models.model)
        after_guard = snapshot(params)
        state_before = gather_state(ctx.models.model)
        with PrefillLogits(student[0]) as cap:
            rollouts = generate_rollouts(ctx.engine, samples, cfg.sampling, step=step, tokenizer=ctx.tokenizer,
                                         parse=parse_completion)
        logits_after = cap.logits
        engine_gathered = gather_state(ctx.models.model) != state_before

        with torch.no_grad():
            for n, t in ref.items():
                ref_params[n].copy_(t)
        with PrefillLogits(reference[0]) as cap:
            ref_out = ref_engine.generate([_prompt(s) for s in samples], cfg.sampling, step=step)
        logits_ref = cap.logits

        line = {
            "rank": dist.get_rank(), "step": step, "overlap": overlap, "applied": bool(result.applied),
            "loss": result.loss, "grad_norm": result.grad_norm,
            "coverage_error": cover_err,
            "ref_vs_pre": max_diff(ref, pre),
            "raw_vs_ref_owned": max_diff(raw, ref, owned),
            "raw_vs_ref_not_owned": max_diff(raw, ref, not_owned),
            "raw_vs_pre_not_owned": max_diff(raw, pre, not_owned),
            "forced": forced, "forced_again": forced_again,
            "guard_vs_ref": max_diff(after_guard, ref),
            "engine_gathered": engine_gathered,
            "logits_shape": list(logits_after.shape),
            "logits_vs_ref": float((logits_after.double() - logits_ref.double()).abs().max()),
            "logits_vs_before": float((logits_after.double() - logits_before.double()).abs().max()),
            "logits_scale": float(logits_ref.double().abs().max()),
            "tokens_equal_ref": [r.completion.tolist() for r in rollouts] == [c.token_ids.tolist() for c in ref_out],
        }
        print("DPW " + json.dumps(line), flush=True)
        logits_before = logits_after

    startup.destroy_distributed()


def _prompt(sample):
    """The engine prompt :func:`~vigos_megatron.training.rollouts.generate_rollouts` builds for ``sample``."""
    from vigos_megatron.rollout.engine import RolloutPrompt

    return RolloutPrompt(input_ids=sample["contexts"]["student"], pixel_values=sample["pixel_values"],
                         image_grid_thw=sample["image_grid_thw"], sample_id=int(sample["position"]))


if __name__ == "__main__":
    main()
