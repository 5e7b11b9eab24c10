"""The ViGOS training loop, top to bottom: generate, score, update, log, save.

One iteration (``step`` counts optimizer steps; step 1 is the first update):

1. draw this data-parallel rank's prompts from the streaming loader;
2. **generate**: rollouts from the student's current weights (the Megatron-native engine; with
   the distributed optimizer the parameter all-gather is completed first);
3. **score**: parse them, build the teacher contexts each row needs, pack the micro-batches,
   all-reduce the objective's token counts over data-parallel ranks;
4. **update**: ONE megatron schedule call over the micro-batches, the frozen teacher inside the
   student's pipeline stages, then the optimizer step (student parameters only);
5. log one line of metrics, save a checkpoint when due (interval, end of launch, SIGTERM).

The set-up (models, optimizer, resume) is in :mod:`.setup`, :mod:`.optimizer`, :mod:`.checkpoint`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vigos_megatron.training.rollouts import Rollout, generate_rollouts
from vigos_megatron.training.scoring import build_step_inputs
from vigos_megatron.training.update import NonFiniteStep, train_step


@dataclass
class RunContext:
    """What the loop needs besides the config, built once per launch."""

    models: object  # setup.TrainingModels
    optimizer: object
    scheduler: object
    loader: object
    engine: object
    tokenizer: object
    pad_id: int
    #: the tokenizer's PrefixCut: byte-exact teacher contexts
    cut: object


# --------------------------------------------------------------------------- set-up


def stop_token_ids(tokenizer) -> list[int]:
    """``<|im_end|>`` (the chat turn's end, Qwen's EOS) and ``<|endoftext|>``."""
    ids = []
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i != tokenizer.unk_token_id:
            ids.append(int(i))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has no <|im_end|>, <|endoftext|> or EOS token to stop generation on")
    return ids


def make_loader(cfg, layout, ps, loader_state: dict | None):
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.loader import StreamingLoader

    lc = cfg.data.loader
    loader = StreamingLoader(
        lc.shards_dir, rank=ps.get_data_parallel_rank(), world_size=layout.dp, batch_size=layout.prompts_per_rank,
        seed=lc.seed, num_workers=lc.num_workers, shuffle_shards=lc.shuffle_shards, shuffle_buffer=lc.shuffle_buffer,
        prefetch_factor=lc.prefetch_factor, encode=ContextEncoder.from_config(cfg.data.context),
    )
    if loader_state:
        loader.load_state_dict(loader_state)
    return loader


def build_run(cfg, layout) -> tuple[RunContext, object]:
    """Models, optimizer, resume state, loader and engine of this launch. Returns ``(ctx, state)``."""
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from vigos_megatron.data.contexts import PrefixCut
    from vigos_megatron.rollout.engine import MegatronRolloutEngine
    from vigos_megatron.runtime import use_cuda
    from vigos_megatron.training.checkpoint import load_training_checkpoint
    from vigos_megatron.training.optimizer import build_optimizer, ddp_config
    from vigos_megatron.training.setup import build_training_models

    dtype = cfg.model.torch_dtype(use_cuda())
    models = build_training_models(cfg, dtype=dtype, ddp_config=ddp_config(cfg.optimizer, dp_size=layout.dp))
    optimizer, scheduler = build_optimizer(cfg.optimizer, models.model, total_steps=cfg.train.steps, dp_size=layout.dp)
    state = load_training_checkpoint(cfg.run_dir, student_chunks=models.student, model=models.model,
                                     optimizer=optimizer, scheduler=scheduler,
                                     load_optimizer=cfg.checkpoint.load_optimizer)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.context.processor_path)
    engine = MegatronRolloutEngine(models.student, hf_config=models.builder.hf_config,
                                   stop_token_ids=stop_token_ids(tokenizer), pad_token_id=int(tokenizer.pad_token_id))
    loader = make_loader(cfg, layout, ps, state.loader if state is not None else None)
    ctx = RunContext(models=models, optimizer=optimizer, scheduler=scheduler, loader=loader, engine=engine,
                     tokenizer=tokenizer, pad_id=int(tokenizer.pad_token_id), cut=PrefixCut(tokenizer))
    return ctx, state


# --------------------------------------------------------------------------- metrics


def rollout_stats(rollouts: list[Rollout], dp_group, device) -> dict[str, float]:
    """Invalid-rollout rate, answer accuracy and segment token fractions over the global batch."""
    sums = torch.zeros(7, dtype=torch.float64)
    for r in rollouts:
        n = int(r.completion.numel())
        seg = r.segments
        sums += torch.tensor([
            1.0, float(not seg.valid), float(r.correct), n,
            (seg.description[1] - seg.description[0]) if seg.valid else 0,
            (seg.reasoning[1] - seg.reasoning[0]) if seg.valid else 0,
            float(r.finish_reason == "length"),
        ], dtype=torch.float64)
    sums = sums.to(device)
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)
    rows, invalid, correct, tokens, desc, rea, truncated = sums.tolist()
    rows_d, tok_d = max(rows, 1.0), max(tokens, 1.0)
    return {
        "rollouts": rows, "completion_tokens": tokens,
        "invalid_rate": invalid / rows_d, "rollout_accuracy": correct / rows_d, "truncated_rate": truncated / rows_d,
        "description_token_fraction": desc / tok_d, "reasoning_token_fraction": rea / tok_d,
        "mean_completion_tokens": tokens / rows_d,
    }


def step_metrics(result, stats: dict, *, rollout_s: float, update_s: float, step_s: float, dropped: int) -> dict:
    """The metrics line of one step (``step`` is added by the writer). ``dropped``: samples the loaders
    dropped since the run began, summed over data-parallel ranks."""
    reports = result.reports
    m = {"loss": result.loss, "applied": int(result.applied)}
    for key, value in sorted(reports.items()):
        # a term with no token in this step's global batch has no value (0/0): left out
        if (key.startswith("kl/") or key.startswith("vgs/")) and math.isfinite(value):
            m[f"term/{key.split('/', 1)[1]}"] = value
    m["clip_rate"] = reports.get("clip_fraction", 0.0)
    m.update({k: v for k, v in stats.items()})
    m.update({"grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": stats["completion_tokens"] / step_s,
              "rollout_time_s": rollout_s, "update_time_s": update_s, "step_time_s": step_s,
              "dropped_samples": dropped})
    return m


#: what the console line shows (metrics.jsonl has everything)
PROGRESS_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "rollout_time_s", "update_time_s", "invalid_rate",
                 "rollout_accuracy", "clip_rate")


def progress_fields(metrics: dict) -> dict:
    keys = PROGRESS_KEYS + tuple(k for k in metrics if k.startswith("term/"))
    return {k: metrics[k] for k in keys if k in metrics}


def is_metrics_rank(ps) -> bool:
    """TP rank 0 of the last pipeline stage, DP rank 0: exactly one rank writes metrics."""
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_data_parallel_rank() == 0)


# --------------------------------------------------------------------------- the loop


def _min_over_world(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _sum_over_group(value: int, device, group) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return int(t.item())


def drop_message(step: int, dp_rank: int, dropped: dict) -> str:
    """One line naming a sample the loader dropped (``batch["dropped"]`` entry), its shard and why."""
    ident = dropped.get("key", "?") + (f" (id {dropped['id']})" if dropped.get("id") is not None else "")
    return (f"[vigos] step {step}: dropped sample {ident} of {dropped.get('shard', '?')} "
            f"(data-parallel rank {dp_rank}): {dropped['reason']}")


def train(cfg, layout, *, log=print) -> int:
    """Run ``cfg`` (validated; process groups initialised) until ``train.steps``, ``train.exit_after``
    steps of this launch, or SIGTERM. Returns the number of steps done in this launch."""
    from megatron.core import parallel_state as ps

    from vigos_megatron import objectives
    from vigos_megatron.runtime import compute_device
    from vigos_megatron.training.checkpoint import TrainState, save_training_checkpoint
    from vigos_megatron.training.metrics import MetricsWriter, TermWatch, format_progress
    from vigos_megatron.training.rollout_log import RolloutLog
    from vigos_megatron.training.optimizer import ensure_params_gathered
    from vigos_megatron.training.signals import StopSignal

    device = compute_device()
    rank0 = dist.get_rank() == 0
    ctx, state = build_run(cfg, layout)
    start = state.step if state is not None else 0
    end = cfg.train.steps if cfg.train.exit_after == 0 else min(cfg.train.steps, start + cfg.train.exit_after)
    hf_config = ctx.models.builder.hf_config
    writer = MetricsWriter(cfg.run_dir, enabled=is_metrics_rank(ps), tensorboard=cfg.logging.tensorboard,
                           resume_step=start)
    objective = objectives.get(cfg.loss.objective)
    rollout_log = RolloutLog(cfg.run_dir, count=cfg.logging.dump_rollouts, enabled=is_metrics_rank(ps),
                             resume_step=start, tokenizer=ctx.tokenizer, term_names=objective.terms)
    terms = TermWatch(objective.expected_terms)
    if rank0:
        log(f"[vigos] {'resuming at' if start else 'starting'} step {start} of {cfg.train.steps}; this launch runs "
            f"steps {start + 1}..{end}; layout TP={layout.tp} PP={layout.pp} DP={layout.dp}; "
            f"{cfg.train.global_batch_size} prompts per step; objective {cfg.loss.objective}")

    def save(step: int) -> None:
        st = TrainState(step=step, loader=ctx.loader.state_dict(), consumed_prompts=step * cfg.train.global_batch_size)
        path = save_training_checkpoint(cfg.run_dir, st, student_chunks=ctx.models.student, model=ctx.models.model,
                                        optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                                        hf_source_dir=ctx.models.hf_files)
        if rank0:
            log(f"[vigos] saved checkpoint {path}")

    def dropped_total() -> int:
        """Samples the loaders dropped since the run began, summed over data-parallel ranks."""
        return _sum_over_group(sum(ctx.loader.dropped.values()), device, ps.get_data_parallel_group())

    step, saved_at = start, start
    batches = iter(ctx.loader)
    # each data-parallel rank reads its own samples: the first rank of its TP x PP group names its drops
    log_drops = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
    try:
        with StopSignal() as stop:
            while step < end:
                t0 = time.perf_counter()
                batch = next(batches)
                samples = batch["samples"]
                if log_drops:
                    for d in batch["dropped"]:
                        log(drop_message(step + 1, ps.get_data_parallel_rank(), d))
                if _min_over_world(len(samples), device) == 0:
                    # every sample of some rank's batch was dropped: no rank can run the schedule alone.
                    # The step counts (the loader moved on), the LR schedule does not advance, and its
                    # metrics line says so (no loss, the drops so far)
                    step += 1
                    dropped = dropped_total()
                    writer.log(step, {"applied": 0, "skipped": "a data-parallel rank had no usable sample",
                                      "rollouts": 0, "lr": float(ctx.optimizer.param_groups[0]["lr"]),
                                      "step_time_s": time.perf_counter() - t0, "dropped_samples": dropped})
                    if rank0:
                        log(f"[vigos] step {step}: skipped (a data-parallel rank had no usable sample)")
                    continue
                ensure_params_gathered(ctx.models.model, ctx.optimizer)  # rollouts read the post-step weights
                rollouts = generate_rollouts(ctx.engine, samples, cfg.sampling, step=step, tokenizer=ctx.tokenizer)
                t1 = time.perf_counter()
                inputs = build_step_inputs(rollouts, cfg, hf_config=hf_config, pad_id=ctx.pad_id, cut=ctx.cut,
                                           dp_group=ps.get_data_parallel_group(),
                                           tp_group=ps.get_tensor_model_parallel_group())
                result = train_step(ctx.models.model, ctx.optimizer, ctx.scheduler, inputs.batches, inputs.loss_fn,
                                    on_nonfinite=cfg.train.on_nonfinite)
                rollout_log.write(step + 1, rollouts, inputs.assembled)
                del inputs  # the stream's buffers go before the next rollouts
                t2 = time.perf_counter()
                step += 1
                stats = rollout_stats(rollouts, ps.get_data_parallel_group(), device)
                dropped = dropped_total()
                metrics = step_metrics(result, stats, rollout_s=t1 - t0, update_s=t2 - t1, step_s=t2 - t0,
                                       dropped=dropped)
                writer.log(step, metrics)
                if rank0 and (step % cfg.logging.progress_interval == 0 or step == end):
                    log(format_progress(step, cfg.train.steps, progress_fields(metrics)))
                notice = terms.check(step, metrics)
                if rank0 and notice:
                    log(notice)
                if not result.applied and rank0:
                    log(f"[vigos] step {step}: non-finite loss or gradient; update skipped (train.on_nonfinite=skip)")
                interval = cfg.checkpoint.save_interval
                if stop.agreed(None):
                    if rank0:
                        log(f"[vigos] stop signal received: saving at step {step} and exiting")
                    break
                if interval and step % interval == 0 and step < end:
                    save(step)
                    saved_at = step
    except NonFiniteStep as e:
        writer.close()
        if rank0:
            log(f"[vigos] stopped: {e}. The last checkpoint ({saved_at}) is intact.")
        raise
    if step > saved_at:
        save(step)
    writer.close()
    return step - start
