"""The ViGOS training loop, top to bottom: generate, score, update, log, save.

One iteration (``step`` counts optimizer steps; step 1 is the first update), :func:`run_step`:

1. draw this data-parallel rank's prompts from the streaming loader;
2. **generate**: rollouts from the student's current weights (the Megatron-native engine; with
   the distributed optimizer the parameter all-gather is completed first), parsed in the prompt
   template's completion format (:mod:`vigos_megatron.rollout.formats`);
3. **score**: the rows the objective needs, packed micro-batches, its loss (:mod:`.scoring`; VGS with
   ``quantile_scope: global`` first runs its teacher alone over the micro-batches, forward only);
4. **update**: ONE megatron schedule call over the micro-batches, the frozen teacher inside the
   student's pipeline stages, then the optimizer step (student parameters only); on the steps the
   objective probes (``loss.vgs.eta_diagnostics_interval``) its probe losses' gradient norms come
   first, from extra schedule calls that leave the update unchanged (:func:`.update.probe_gradient_norms`);
5. log one line of metrics (and of ``rollouts.jsonl``), save a checkpoint when due (interval, end
   of launch, SIGTERM). With ``checkpoint.async_save`` an interval checkpoint is written in the
   background and completed at the end of a later step (:func:`finish_save`); the last one of a
   launch is written in place, after the one in the background is complete.

A step whose batch is empty on some data-parallel rank (every sample dropped) is skipped by every
rank (:func:`skip_step`). The set-up (models, optimizer, resume, loader, engine) is in :mod:`.setup`;
the metrics in :mod:`.metrics`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch.distributed as dist

from vigos_megatron import objectives
from vigos_megatron.collectives import reduce_int
from vigos_megatron.training.metrics import (
    MetricsWriter,
    TermWatch,
    format_progress,
    is_metrics_rank,
    progress_fields,
    rollout_stats,
    step_metrics,
)
from vigos_megatron.training.rollout_log import RolloutLog
from vigos_megatron.training.rollouts import generate_rollouts
from vigos_megatron.training.scoring import build_gradient_probes, build_step_inputs
from vigos_megatron.training.setup import RunContext, build_run
from vigos_megatron.training.update import NonFiniteStep, probe_gradient_norms, train_step

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import Layout, PretrainConfig


@dataclass
class Run:
    """One launch: the config, its context, where it logs, and its device for collectives."""

    cfg: "PretrainConfig"
    ctx: RunContext
    writer: MetricsWriter
    rollout_log: RolloutLog
    terms: TermWatch
    log: Callable[[str], None]
    rank0: bool
    device: object
    #: the completion parser of the prompt template's format (:func:`~vigos_megatron.rollout.formats.completion_parser`)
    parse: Callable

    def say(self, line: str) -> None:
        if self.rank0:
            self.log(line)


def drop_message(step: int, dp_rank: int, dropped: dict) -> str:
    """One line naming a sample the loader dropped (``batch["dropped"]`` entry), its shard and why."""
    ident = dropped.get("key", "?") + (f" (id {dropped['id']})" if dropped.get("id") is not None else "")
    return (f"[vigos] step {step}: dropped sample {ident} of {dropped.get('shard', '?')} "
            f"(data-parallel rank {dp_rank}): {dropped['reason']}")


def dropped_total(run: Run, ps) -> int:
    """Samples the loaders dropped since the run began, summed over data-parallel ranks."""
    return reduce_int(sum(run.ctx.loader.dropped.values()), ps.get_data_parallel_group(), device=run.device)


def skip_step(run: Run, ps, step: int, t0: float) -> None:
    """Step ``step`` without an update: some data-parallel rank had no usable sample. The loader moved
    on, the LR schedule does not advance, and the metrics line says so (no loss, the drops so far)."""
    run.writer.log(step, {"applied": 0, "skipped": "a data-parallel rank had no usable sample", "rollouts": 0,
                          "lr": float(run.ctx.optimizer.param_groups[0]["lr"]),
                          "step_time_s": time.perf_counter() - t0, "dropped_samples": dropped_total(run, ps)})
    run.say(f"[vigos] step {step}: skipped (a data-parallel rank had no usable sample)")


def run_step(run: Run, ps, step: int, samples: list[dict], t0: float, *, last: int) -> None:
    """Generate, score, update and log step ``step`` (1-based) on this rank's ``samples``."""
    from vigos_megatron.training.optimizer import ensure_params_gathered

    cfg, ctx = run.cfg, run.ctx
    ensure_params_gathered(ctx.models.model)  # rollouts read the post-step weights
    rollouts = generate_rollouts(ctx.engine, samples, cfg.sampling, step=step - 1, tokenizer=ctx.tokenizer,
                                 parse=run.parse)
    t1 = time.perf_counter()
    groups = {"dp_group": ps.get_data_parallel_group(), "tp_group": ps.get_tensor_model_parallel_group()}
    inputs = build_step_inputs(rollouts, cfg, hf_config=ctx.models.builder.hf_config, pad_id=ctx.pad_id, cut=ctx.cut,
                               model=ctx.models.model, **groups)
    probes = build_gradient_probes(cfg, inputs.batches, step, **groups)
    norms = probe_gradient_norms(ctx.models.model, ctx.optimizer, inputs.batches, probes)
    result = train_step(ctx.models.model, ctx.optimizer, ctx.scheduler, inputs.batches, inputs.loss_fn,
                        on_nonfinite=cfg.train.on_nonfinite)
    run.rollout_log.write(step, rollouts, inputs.assembled)
    del inputs  # the stream's buffers go before the next rollouts
    t2 = time.perf_counter()
    stats = rollout_stats(rollouts, ps.get_data_parallel_group(), run.device)
    metrics = step_metrics(result, stats, rollout_s=t1 - t0, update_s=t2 - t1, step_s=t2 - t0,
                           dropped=dropped_total(run, ps), generation=ctx.engine.last_stats)
    objective = objectives.get(cfg.loss.objective)
    metrics.update(objective.probe_metrics(getattr(cfg.loss, objective.name), norms))
    run.writer.log(step, metrics)
    if step % cfg.logging.progress_interval == 0 or step == last:
        run.say(format_progress(step, cfg.train.steps, progress_fields(metrics)))
    notice = run.terms.check(step, metrics)
    if notice:
        run.say(notice)
    if not result.applied:
        run.say(f"[vigos] step {step}: non-finite loss or gradient; update skipped (train.on_nonfinite=skip)")


@dataclass
class Outcome:
    """How a launch ended (the entry point reports it; :mod:`.launch` maps exit codes with it)."""

    #: steps done in this launch
    steps: int
    #: the last step of the run with a complete checkpoint (0: none)
    saved_step: int
    #: the signal that stopped the launch after a save ("SIGTERM", "SIGINT"), or None
    signal: str | None = None
    #: the checkpoint directory of ``saved_step`` written by this launch, or None
    saved: str | None = None


def save(run: Run, step: int, last_saved: int, outcome: Outcome, background=None) -> int:
    """Save ``iter_<step>`` (collective). Returns the last step with a complete checkpoint: ``step``, or
    with ``background`` (``checkpoint.async_save``) still ``last_saved``: the save goes on while
    training does, and :func:`finish_save` completes it."""
    from vigos_megatron.training.checkpoint import TrainState, save_training_checkpoint

    ctx = run.ctx
    with save_failures(run, step, last_saved):
        path = save_training_checkpoint(run.cfg.run_dir, TrainState(step=step, loader=ctx.loader.state_dict()),
                                        student_chunks=ctx.models.student, model=ctx.models.model,
                                        optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                                        hf_source_dir=ctx.models.hf_files, settings=ctx.settings,
                                        keep_last=run.cfg.checkpoint.keep_last, log=run.say, background=background)
    if background is not None:
        return last_saved
    run.say(f"[vigos] saved checkpoint {path}")
    outcome.saved = str(path)
    return step


def finish_save(run: Run, background, last_saved: int, outcome: Outcome, *, wait: bool) -> int:
    """Complete the save written in the background once every rank's writer is done (collective;
    ``wait``: wait for them). Returns the last step with a complete checkpoint."""
    if background is None or background.pending is None:
        return last_saved
    with save_failures(run, background.pending[0], last_saved):
        done = background.finish(wait=wait)
    if done is None:
        return last_saved
    run.say(f"[vigos] saved checkpoint {done[1]} (written in the background)")
    outcome.saved = str(done[1])
    return done[0]


@contextlib.contextmanager
def save_failures(run: Run, step: int, last_saved: int):
    """A failed save of ``iter_<step>`` (a full disk, a rank's write error) stops the run with one line
    naming the directory and the last complete checkpoint (exit code 1)."""
    from vigos_megatron.training.checkpoint import disk_note
    from vigos_megatron.training.checkpoint_resume import describe_error, read_errors
    from vigos_megatron.training.signals import RunStopped

    try:
        yield
    except read_errors() as e:  # reported in one line; VIGOS_VERBOSE=1 keeps the traceback
        import os
        import traceback

        from vigos_megatron.training.signals import StopNow

        failures = getattr(e, "failures", None) or {}
        for pair in failures.values():  # torch's checkpoint code wraps whatever a rank raised, StopNow too
            inner = pair[0] if isinstance(pair, tuple) else pair
            if isinstance(inner, StopNow):
                raise inner from e

        from vigos_megatron.training.checkpoint_files import iter_dir_name

        if os.environ.get("VIGOS_VERBOSE", "") == "1":
            traceback.print_exc()
        last = f"{iter_dir_name(last_saved)} (step {last_saved})" if last_saved else "none (a fresh start)"
        raise RunStopped(f"saving checkpoint {iter_dir_name(step)} in {run.cfg.run_dir} failed: {describe_error(e)}"
                         f"{disk_note(run.cfg.run_dir, last_saved)}. The last complete checkpoint is {last}; the next "
                         "launch moves the incomplete directory aside and resumes from it") from e


def train(cfg: "PretrainConfig", layout: "Layout", *, log=print) -> Outcome:
    """Run ``cfg`` (validated; process groups initialised) until ``train.steps``, ``train.exit_after``
    steps of this launch, or SIGTERM / SIGINT (then it saves and returns). Returns the :class:`Outcome`."""
    from megatron.core import parallel_state as ps

    from vigos_megatron.data.prompts import load_templates
    from vigos_megatron.rollout.formats import completion_parser
    from vigos_megatron.runtime import compute_device
    from vigos_megatron.training.checkpoint import BackgroundSaves, start_checkpoint_writer
    from vigos_megatron.training.signals import StopNow, StopSignal

    rank0 = dist.get_rank() == 0
    run, saved_at, background = None, None, None
    try:
        # from the start: a stop during the set-up ends the launch after its first step (with a checkpoint)
        with StopSignal() as stop:
            ctx, state = build_run(cfg, layout, log=log if rank0 else (lambda _line: None))
            start = state.step if state is not None else 0
            end = cfg.train.steps if cfg.train.exit_after == 0 else min(cfg.train.steps, start + cfg.train.exit_after)
            objective = objectives.get(cfg.loss.objective)
            logs_here = is_metrics_rank(ps)
            run = Run(cfg=cfg, ctx=ctx, log=log, rank0=rank0, device=compute_device(),
                      parse=completion_parser(load_templates(cfg.data.context.prompts_path).format),
                      writer=MetricsWriter(cfg.run_dir, enabled=logs_here, tensorboard=cfg.logging.tensorboard,
                                           resume_step=start),
                      rollout_log=RolloutLog(cfg.run_dir, count=cfg.logging.dump_rollouts, enabled=logs_here,
                                             resume_step=start, tokenizer=ctx.tokenizer, term_names=objective.terms),
                      terms=TermWatch(objective.expected_terms))
            run.say(f"[vigos] {'resuming at' if start else 'starting'} step {start} of {cfg.train.steps}; this launch "
                    f"runs steps {start + 1}..{end}; layout TP={layout.tp} PP={layout.pp} DP={layout.dp}; "
                    f"{cfg.train.global_batch_size} prompts per step; objective {cfg.loss.objective}")
            dropped_lines = getattr(run.writer, "dropped_on_resume", 0)
            if dropped_lines:
                log(f"[vigos] {run.writer.path} held {dropped_lines} step(s) after step {start}, done by an earlier "
                    "launch after its last complete checkpoint: they are repeated")
            step, saved_at = start, start
            outcome = Outcome(steps=0, saved_step=start)
            batches = iter(ctx.loader)
            # each data-parallel rank reads its own samples: the first rank of its TP x PP group names its drops
            log_drops = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
            start_checkpoint_writer()
            background = BackgroundSaves() if cfg.checkpoint.async_save else None
            while step < end:
                t0 = time.perf_counter()
                batch = next(batches)
                step += 1
                if log_drops:
                    for d in batch["dropped"]:
                        log(drop_message(step, ps.get_data_parallel_rank(), d))
                if reduce_int(len(batch["samples"]), dist.group.WORLD, dist.ReduceOp.MIN, device=run.device) == 0:
                    skip_step(run, ps, step, t0)  # no rank can run the schedule alone
                    continue
                run_step(run, ps, step, batch["samples"], t0, last=end)
                saved_at = finish_save(run, background, saved_at, outcome, wait=False)
                if stop.agreed(None):
                    outcome.signal = stop.signal_name or "a signal (on another rank)"
                    run.say(f"[vigos] stop signal received: saving at step {step} and exiting")
                    break
                interval = cfg.checkpoint.save_interval
                if interval and step % interval == 0 and step < end:
                    saved_at = finish_save(run, background, saved_at, outcome, wait=True)  # one at a time
                    saved_at = save(run, step, saved_at, outcome, background)
            # inside the handlers: a repeated signal during the final save is one stop, not two; a stop
            # and the end of the launch wait for the save in the background, then save the last step
            saved_at = finish_save(run, background, saved_at, outcome, wait=True)
            if step > saved_at:
                saved_at = save(run, step, saved_at, outcome)
    except NonFiniteStep as e:
        run.writer.close()
        run.say(f"[vigos] stopped: {e}. The last checkpoint ({saved_at}) is intact.")
        raise
    except StopNow as e:
        e.saved_step = saved_at  # None: before any step of this launch
        if background is not None:
            background.abandon()  # its directory stays incomplete: the next launch moves it aside
        if run is not None:
            run.writer.close()
        raise
    run.writer.close()
    outcome.steps, outcome.saved_step = step - start, saved_at
    if outcome.signal:
        where = outcome.saved or f"{cfg.run_dir} (step {saved_at})"
        run.say(f"[vigos] stopped on {outcome.signal} after step {step}: checkpoint {where} is complete; "
                "exit code 0 (the same command resumes)")
    return outcome
