"""Training checkpoints, metrics and stop signals (vigos_megatron.training.{checkpoint,optimizer,metrics,signals}).

Real setup (tests/dist/ckpt_common.py): the tiny Qwen2.5-VL student + frozen teacher stage under
megatron DDP, megatron Adam with clipping, weight decay, warmup + cosine decay, ViGOS steps through
megatron's schedule.

* slow, one process (module fixture, ~30 s of model building and steps): 2 steps, save
  ``iter_2``, one more step. A fresh model + optimizer loading ``iter_2`` has bit-identical parameters, optimizer tensors, Adam step count,
  LR, next RNG draws (python, numpy, torch, megatron's tracker) and TrainState, and its next
  step equals the original's (loss, grad norm, LR, parameters) bit for bit;
* a simulated crash between the tensor save and the tracker update leaves the previous
  checkpoint the latest; the next save of that step replaces the partial directory; a save never
  overwrites the latest; a run directory holding only the converter's ``iter_0`` is a fresh start;
* ``tools/convert_megatron_to_hf.py`` exports a training checkpoint: the HF weights equal the
  trained student's;
* slow (torchrun): DP=2 with the distributed optimizer saves and resumes bit-identically; the
  same checkpoint loads at DP=1 into the fp32 optimizer (weights, Adam moments, step), and the
  next step agrees with DP=2's; ``load_optimizer=False`` loads the weights only;
* slow, one process: the fp32 optimizer's checkpoint loads into the distributed optimizer; bf16
  parameters (mixed precision, fp32 main weights) move between the mixed-precision and the
  distributed optimizer both ways; a dtype change of the optimizer state is refused;
* slow (torchrun): a checkpoint written at TP=2 loads at TP=1: weights and Adam moments equal the
  TP=2 ones gathered, and the next step's loss agrees;
* metrics.jsonl truncation on resume, JSON lines, the progress line, TensorBoard's absence;
* StopSignal: the first signal sets the flag, repeats within 2 s are the same stop, a later one stops at
  once (exit code 75); a stop while the checkpoint writer starts is kept, and the writer survives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
ROOT = Path(__file__).resolve().parents[1]
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

SAVE_AT = 2


def _equal_dicts(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (or exist on one side only)."""
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
    return bad


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", seed=0)


@pytest.fixture(scope="module")
def trained(tiny_hf, tmp_path_factory):
    """One process, TP=PP=DP=1: train SAVE_AT steps, save, snapshot, train one more step."""
    import ckpt_common as cc
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.training.checkpoint import TrainState, save_training_checkpoint

    run = tmp_path_factory.mktemp("run")
    t0 = time.perf_counter()
    with local_model_parallel() as ps:
        inputs = sc.build_inputs(tiny_hf)
        a = cc.build(tiny_hf, ps, inputs=inputs)
        history = [cc.train_step(a, ps) for _ in range(SAVE_AT)]
        state = TrainState(step=SAVE_AT, loader={"consumed_positions": 8, "note": "x"})
        t_save = time.perf_counter()
        save_training_checkpoint(run, state, student_chunks=[a.student], model=a.model, optimizer=a.optimizer,
                                 scheduler=a.scheduler, hf_source_dir=tiny_hf)
        save_s = time.perf_counter() - t_save
        snap = {"params": cc.params(a), "opt": cc.optimizer_state(a), "adam_step": cc.adam_step_count(a),
                "lr": float(a.optimizer.param_groups[0]["lr"]), "draws": cc.draws(), "hf": cc.hf_tensors(a)}
        history.append(cc.train_step(a, ps))
        print(f"trained fixture: {SAVE_AT + 1} steps + save ({save_s:.1f}s) in {time.perf_counter() - t0:.1f}s; "
              f"history {history}")
        yield {"ps": ps, "inputs": inputs, "a": a, "run": run, "state": state, "snap": snap, "history": history}


def _fresh(trained, tiny_hf):
    import ckpt_common as cc

    return cc.build(tiny_hf, trained["ps"], inputs=trained["inputs"])


# ----------------------------------------------------------------------------- one process


@pytest.mark.slow
def test_schedule_and_optimizer_setup(trained):
    """The LR schedule (warmup 1 of 4 steps, cosine to lr/10) and the optimizer's parameters."""
    import math

    import ckpt_common as cc

    h = trained["history"]
    lr, lo = cc.LR, cc.LR / 10
    expected = [0.0, lr, lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * 1 / 3))]
    assert [x["lr"] for x in h] == pytest.approx(expected, rel=1e-12)
    a = trained["a"]
    # clipping is active (grad norm above clip_grad=0.1) and the loss moves once lr > 0
    assert h[1]["grad_norm"] > 0.1 and h[2]["loss"] != h[1]["loss"]
    from vigos_megatron.training.checkpoint import optimizer_kind
    from vigos_megatron.training.optimizer import _optimizer_tensor_ids

    assert optimizer_kind(a.optimizer) == "fp32"
    held = _optimizer_tensor_ids(a.optimizer)
    assert all(id(p) not in held for p in a.teacher.parameters())
    assert all(id(p) in held for p in a.student.parameters())


@pytest.mark.slow
def test_resume_same_layout_is_bit_identical(trained, tiny_hf):
    import ckpt_common as cc

    from vigos_megatron.training.checkpoint import latest_iteration, load_training_checkpoint

    t0 = time.perf_counter()
    assert latest_iteration(trained["run"]) == SAVE_AT
    b = _fresh(trained, tiny_hf)
    snap = trained["snap"]
    assert _equal_dicts(cc.params(b), snap["params"]), "a fresh model should differ before loading"
    state = load_training_checkpoint(trained["run"], student_chunks=[b.student], model=b.model,
                                     optimizer=b.optimizer, scheduler=b.scheduler)
    assert state == trained["state"]
    assert _equal_dicts(cc.params(b), snap["params"]) == []
    opt = cc.optimizer_state(b)
    assert len(opt) == len(snap["opt"]) > 0
    assert _equal_dicts(opt, snap["opt"]) == []
    assert cc.adam_step_count(b) == snap["adam_step"] == SAVE_AT
    assert float(b.optimizer.param_groups[0]["lr"]) == snap["lr"] and b.scheduler.num_steps == SAVE_AT
    assert cc.draws() == snap["draws"]
    nxt = cc.train_step(b, trained["ps"])
    assert nxt == trained["history"][SAVE_AT]
    assert _equal_dicts(cc.params(b), cc.params(trained["a"])) == []
    print(f"resume at the same layout: bit-identical state and next step {nxt} ({time.perf_counter() - t0:.1f}s)")


@pytest.mark.slow
def test_fp32_checkpoint_into_distributed_optimizer(trained, tiny_hf):
    """Another optimizer kind: the distributed optimizer (one shard) takes the fp32 optimizer's
    moments and step, and its fp32 main weights from the checkpoint's model weights."""
    import ckpt_common as cc

    from vigos_megatron.training.checkpoint import load_training_checkpoint, optimizer_kind

    b = cc.build(tiny_hf, trained["ps"], inputs=trained["inputs"], force_distributed=True)
    assert optimizer_kind(b.optimizer) == "distributed"
    state = load_training_checkpoint(trained["run"], student_chunks=[b.student], model=b.model, optimizer=b.optimizer,
                                     scheduler=b.scheduler)  # same layout: only the optimizer kind differs
    assert state == trained["state"]
    snap = trained["snap"]
    assert _equal_dicts(cc.params(b), snap["params"]) == []
    opt = cc.optimizer_state(b)  # distributed: param (main weights), exp_avg, exp_avg_sq
    moments = {k: v for k, v in opt.items() if ".exp_avg" in k}
    assert _equal_dicts(moments, snap["opt"]) == []
    mains = {k.replace("optimizer.state.param.", ""): v for k, v in opt.items() if k.startswith("optimizer.state.param.")}
    assert len(mains) == len(moments) // 2
    assert cc.adam_step_count(b) == SAVE_AT
    nxt = cc.train_step(b, trained["ps"])
    assert cc.adam_step_count(b) == SAVE_AT + 1  # one counter per parameter (platform fix, torch AdamW)
    ref = trained["history"][SAVE_AT]
    assert nxt["lr"] == ref["lr"]
    assert abs(nxt["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"] < 1e-5, (nxt, ref)
    assert abs(nxt["loss"] - ref["loss"]) / ref["loss"] < 1e-5, (nxt, ref)


@pytest.mark.slow
def test_bf16_mixed_precision_and_distributed_optimizer_checkpoints(trained, tiny_hf, tmp_path):
    """bf16 parameters with fp32 main weights (the GPU path, here on CPU): the mixed-precision
    optimizer's checkpoint loads into the distributed optimizer and back (main weights
    ``fp32_param`` <-> ``param``, moments, step); an fp32 checkpoint's optimizer state is refused."""
    import ckpt_common as cc

    from vigos_megatron.models.hf_checkpoint import CheckpointError
    from vigos_megatron.training.checkpoint import (
        TrainState,
        load_training_checkpoint,
        optimizer_kind,
        save_training_checkpoint,
    )

    ps, inputs, bf16 = trained["ps"], trained["inputs"], torch.bfloat16

    def canon(opt):  # the two kinds' names of the fp32 main weights
        return {k.replace("optimizer.state.fp32_param.", "optimizer.state.param."): v for k, v in opt.items()}

    def load(s, run):
        return load_training_checkpoint(run, student_chunks=[s.student], model=s.model, optimizer=s.optimizer,
                                        scheduler=s.scheduler)

    a = cc.build(tiny_hf, ps, inputs=inputs, dtype=bf16)
    assert optimizer_kind(a.optimizer) == "mixed_precision"
    assert all(p.dtype == bf16 for p in a.student.parameters())
    for _ in range(SAVE_AT):
        cc.train_step(a, ps)
    save_training_checkpoint(tmp_path / "mixed", TrainState(step=SAVE_AT), student_chunks=[a.student], model=a.model,
                             optimizer=a.optimizer, scheduler=a.scheduler, hf_source_dir=tiny_hf)
    a_params, a_opt = cc.params(a), canon(cc.optimizer_state(a))
    assert any(k.startswith("optimizer.state.param.") and v.dtype == torch.float32 for k, v in a_opt.items())
    a_next = cc.train_step(a, ps)

    b = cc.build(tiny_hf, ps, inputs=inputs, dtype=bf16, force_distributed=True)
    assert optimizer_kind(b.optimizer) == "distributed"
    assert load(b, tmp_path / "mixed").step == SAVE_AT
    assert _equal_dicts(cc.params(b), a_params) == []
    assert _equal_dicts(canon(cc.optimizer_state(b)), a_opt) == []
    assert cc.adam_step_count(b) == SAVE_AT
    b_next = cc.train_step(b, ps)
    for key in ("loss", "grad_norm", "lr"):
        assert abs(b_next[key] - a_next[key]) <= 1e-5 * abs(a_next[key]), (key, b_next, a_next)
    save_training_checkpoint(tmp_path / "dist", TrainState(step=SAVE_AT + 1), student_chunks=[b.student],
                             model=b.model, optimizer=b.optimizer, scheduler=b.scheduler, hf_source_dir=tiny_hf)

    c = cc.build(tiny_hf, ps, inputs=inputs, dtype=bf16)
    assert load(c, tmp_path / "dist").step == SAVE_AT + 1
    assert _equal_dicts(cc.params(c), cc.params(b)) == []
    assert _equal_dicts(canon(cc.optimizer_state(c)), canon(cc.optimizer_state(b))) == []
    assert cc.adam_step_count(c) == SAVE_AT + 1

    with pytest.raises(CheckpointError, match="dtype changed"):
        load(c, trained["run"])  # fp32 optimizer state into bf16 mixed precision


@pytest.mark.slow
def test_crash_before_tracker_update_keeps_previous_latest(trained, tiny_hf, monkeypatch):
    import ckpt_common as cc

    from vigos_megatron.convert import megatron_checkpoint as mc
    from vigos_megatron.models.hf_checkpoint import CheckpointError
    from vigos_megatron.training.checkpoint import (
        TrainState,
        latest_iteration,
        load_training_checkpoint,
        save_training_checkpoint,
    )

    a, run = trained["a"], trained["run"]
    kwargs = dict(student_chunks=[a.student], model=a.model, optimizer=a.optimizer, scheduler=a.scheduler,
                  hf_source_dir=tiny_hf)

    class Crash(RuntimeError):
        pass

    def crash(*_a, **_k):
        raise Crash("simulated crash after the tensors were written, before the tracker update")

    step = SAVE_AT + 1
    monkeypatch.setattr(mc, "write_tracker", crash)
    with pytest.raises(Crash):
        save_training_checkpoint(run, TrainState(step=step), **kwargs)
    partial = run / mc.iter_dir_name(step)
    assert (partial / "metadata.json").is_file(), "the tensors were on disk when the 'crash' happened"
    assert latest_iteration(run) == SAVE_AT
    assert mc.resolve_checkpoint(run).name == mc.iter_dir_name(SAVE_AT)
    b = _fresh(trained, tiny_hf)
    state = load_training_checkpoint(run, student_chunks=[b.student], model=b.model, optimizer=b.optimizer,
                                     scheduler=b.scheduler)
    assert state.step == SAVE_AT and _equal_dicts(cc.params(b), trained["snap"]["params"]) == []

    monkeypatch.undo()
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        save_training_checkpoint(run, TrainState(step=step), **kwargs)
    assert latest_iteration(run) == step
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_training_checkpoint(run, TrainState(step=step), **kwargs)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_training_checkpoint(run, TrainState(step=SAVE_AT), **kwargs)


@pytest.mark.slow
def test_initial_weights_only_is_a_fresh_start(trained, tiny_hf, tmp_path):
    from vigos_megatron.convert.megatron_checkpoint import save_model_checkpoint
    from vigos_megatron.training.checkpoint import latest_iteration, load_training_checkpoint

    a = trained["a"]
    assert latest_iteration(tmp_path / "nothing") is None
    save_model_checkpoint([a.student], tmp_path, 0, hf_source_dir=tiny_hf)  # what convert_hf_to_megatron writes
    assert latest_iteration(tmp_path) == 0
    assert load_training_checkpoint(tmp_path, student_chunks=[a.student], model=a.model, optimizer=a.optimizer,
                                    scheduler=a.scheduler) is None


@pytest.mark.slow
def test_converter_exports_a_training_checkpoint(trained, tmp_path):
    import importlib.util

    from vigos_megatron.convert.converters import load_hf_state
    from vigos_megatron.models.hf_checkpoint import canonical_hf_name

    spec = importlib.util.spec_from_file_location("convert_megatron_to_hf", ROOT / "tools" / "convert_megatron_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ckpt = trained["run"] / f"iter_{SAVE_AT:07d}"
    assert tool.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "out"), "--quiet"]) == 0
    exported = load_hf_state(tmp_path / "out")  # canonical HF names
    want = {canonical_hf_name(k): v for k, v in trained["snap"]["hf"].items()}
    assert sorted(exported) == sorted(want)
    bad = [k for k in want if not torch.equal(exported[k].double(), want[k])]
    assert bad == []


# ----------------------------------------------------------------------------- torchrun


def _rank_results(out: Path, world: int) -> list[dict]:
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.slow
def test_dp2_distributed_optimizer_resume_and_dp1_load(torchrun, tiny_hf, tmp_path):
    import ckpt_common as cc
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.training.checkpoint import load_training_checkpoint, optimizer_kind

    run, out = tmp_path / "run", tmp_path / "dp2"
    t0 = time.perf_counter()
    torchrun("ckpt_worker.py", 2, "--tp", 1, "--hf", tiny_hf, "--run-dir", run, "--out", out)
    wall = time.perf_counter() - t0
    res = _rank_results(out, 2)
    for r, x in enumerate(res):
        assert x["kind"] == "distributed"
        assert _equal_dicts(x["after_load"]["params"], x["at_save"]["params"]) == [], r
        assert _equal_dicts(x["after_load"]["opt"], x["at_save"]["opt"]) == [], r
        assert x["after_load"]["adam_step"] == x["at_save"]["adam_step"] == SAVE_AT
        assert x["after_load"]["draws"] == x["at_save"]["draws"], r
        assert x["history_b"][0] == x["history_a"][SAVE_AT], r
        assert x["next_b"]["adam_step"] == x["next_a"]["adam_step"] == SAVE_AT + 1, r
        assert _equal_dicts(x["next_b"]["params"], x["next_a"]["params"]) == [], r
        assert x["train_state"].loader["dp_rank"] == r and x["train_state"].loader["rank"] == r
    # DP rank 0 holds the gathered optimizer tensors (fully_reshardable format)
    assert len(res[0]["at_save"]["opt"]) > 0 and res[1]["at_save"]["opt"] == {}
    print(f"DP=2 distributed optimizer: save {res[0]['save_s']:.1f}s, load {res[0]['load_s']:.1f}s, "
          f"step {SAVE_AT + 1} {res[0]['history_b'][0]} identical after resume ({wall:.1f}s launch)")

    # the same checkpoint at DP=1 (one process): the fp32 optimizer, another kind, takes the
    # distributed optimizer's gathered moments; then the next step agrees with DP=2's
    with local_model_parallel() as ps:
        b = cc.build(tiny_hf, ps, inputs=sc.build_inputs(tiny_hf))
        assert optimizer_kind(b.optimizer) == "fp32"
        with pytest.warns(UserWarning, match="written at"):
            state = load_training_checkpoint(run, student_chunks=[b.student], model=b.model, optimizer=b.optimizer,
                                             scheduler=b.scheduler)
        assert state.step == SAVE_AT and state.loader["rank"] == 0
        assert _equal_dicts(cc.params(b), res[0]["at_save"]["params"]) == []
        opt, ref_opt = cc.optimizer_state(b), res[0]["at_save"]["opt"]
        moments = [k for k in ref_opt if ".exp_avg" in k]
        assert sorted(opt) == sorted(moments) and len(moments) > 0
        assert _equal_dicts(opt, {k: ref_opt[k] for k in moments}) == []
        assert cc.adam_step_count(b) == SAVE_AT and b.scheduler.num_steps == SAVE_AT
        nxt = cc.train_step(b, ps)
        # load_optimizer=False: the weights and the schedule position, fresh moments
        with pytest.warns(UserWarning, match="written at"):
            load_training_checkpoint(run, student_chunks=[b.student], model=b.model, optimizer=b.optimizer,
                                     scheduler=b.scheduler, load_optimizer=False)
        assert _equal_dicts(cc.params(b), res[0]["at_save"]["params"]) == []
    ref = res[0]["history_a"][SAVE_AT]
    assert nxt["lr"] == ref["lr"]
    assert abs(nxt["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"] < 1e-5, (nxt, ref)
    assert abs(nxt["loss"] - ref["loss"]) / ref["loss"] < 5e-5, (nxt, ref)
    print(f"DP=2 checkpoint at DP=1 (fp32 optimizer): next step {nxt} vs DP=2 {ref}")


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1(torchrun, tiny_hf, tmp_path):
    import ckpt_common as cc
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.training.checkpoint import load_training_checkpoint

    run, out = tmp_path / "run", tmp_path / "tp2"
    t0 = time.perf_counter()
    torchrun("ckpt_worker.py", 2, "--tp", 2, "--hf", tiny_hf, "--run-dir", run, "--out", out)
    wall = time.perf_counter() - t0
    res = _rank_results(out, 2)
    assert res[0]["kind"] == "fp32"
    for x in res:  # same-layout resume at TP=2 too
        assert x["history_b"][0] == x["history_a"][SAVE_AT]
        assert _equal_dicts(x["next_b"]["params"], x["next_a"]["params"]) == []
    tp2_params, tp2_exp_avg = res[0]["hf_params"], res[0]["hf_exp_avg"]

    with local_model_parallel() as ps:
        b = cc.build(tiny_hf, ps, inputs=sc.build_inputs(tiny_hf))
        with pytest.warns(UserWarning, match="written at"):
            state = load_training_checkpoint(run, student_chunks=[b.student], model=b.model, optimizer=b.optimizer,
                                             scheduler=b.scheduler)
        assert state.step == SAVE_AT
        params, exp_avg = cc.hf_tensors(b), cc.hf_tensors(b, "exp_avg")
        assert sorted(params) == sorted(tp2_params)
        assert [k for k in params if not torch.equal(params[k], tp2_params[k])] == []
        assert [k for k in exp_avg if not torch.equal(exp_avg[k], tp2_exp_avg[k])] == []
        assert cc.adam_step_count(b) == SAVE_AT
        nxt = cc.train_step(b, ps)
    # same weights and optimizer state, TP=1 vs TP=2 arithmetic: the grad norm agrees to fp32
    # reduction-order noise; the loss is a KL between a student and a teacher that differ by two
    # small Adam steps (a difference of nearly equal log-probabilities), so its relative noise is
    # larger (measured 5.6e-6)
    ref = res[0]["history_a"][SAVE_AT]
    assert nxt["lr"] == ref["lr"]
    assert abs(nxt["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"] < 1e-5, (nxt, ref)
    assert abs(nxt["loss"] - ref["loss"]) / ref["loss"] < 5e-5, (nxt, ref)
    print(f"TP=2 -> TP=1: weights and exp_avg equal the gathered TP=2 ones; next step at TP=1 {nxt} vs TP=2 {ref} "
          f"({wall:.1f}s launch)")


# ----------------------------------------------------------------------------- LR schedule


class _Groups:
    """What megatron's scheduler touches on an optimizer: its parameter groups."""

    def __init__(self):
        self.param_groups = [{"lr": None}]


def _lrs(total: int, **cfg) -> list[float]:
    """The LR of each of the ``total`` updates (read before the update, stepped after it)."""
    from vigos_megatron.config.train import OptimizerConfig
    from vigos_megatron.training.optimizer import build_scheduler

    opt = _Groups()
    sched = build_scheduler(OptimizerConfig(**cfg), opt, total_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    return out


def test_lr_schedule_warmup_clamped_and_decay_styles():
    from vigos_megatron.training.optimizer import OptimizerBuildError, lr_schedule_steps

    assert lr_schedule_steps(0, 1) == (0, 1) and lr_schedule_steps(5, 1) == (1, 2) and lr_schedule_steps(2, 10) == (2, 10)
    with pytest.raises(OptimizerBuildError, match="total_steps"):
        lr_schedule_steps(0, 0)
    assert _lrs(1, lr=1.0) == [1.0]  # train.steps=1: one update at lr
    assert _lrs(1, lr=1.0, warmup_steps=5) == [0.0]  # warmup clamped to the run: megatron/HF start at 0
    assert _lrs(4, lr=1.0, decay_style="linear") == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert _lrs(5, lr=1.0, min_lr=0.2, warmup_steps=2, decay_style="linear") == pytest.approx([0.0, 0.5, 1.0, 0.2 + 0.8 * 2 / 3, 0.2 + 0.8 / 3])
    assert _lrs(3, lr=1.0, warmup_steps=3) == pytest.approx([0.0, 1 / 3, 2 / 3])  # all warmup
    assert _lrs(3, lr=2.0, min_lr=1.0, decay_style="constant") == [2.0, 2.0, 2.0]
    assert _lrs(3, lr=1.0, decay_style="cosine") == pytest.approx([1.0, 0.75, 0.25])


# ----------------------------------------------------------------------------- metrics


def test_metrics_truncated_on_resume(tmp_path):
    from vigos_megatron.training.metrics import METRICS_FILE, MetricsWriter

    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=None) as w:
        for step in range(1, 6):
            w.log(step, {"loss": 1.0 / step, "grad_norm": float("nan"), "tokens": step * 10})
    path = tmp_path / METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # torn line of a killed writer
    lines = [json.loads(x) for x in path.read_text().splitlines()[:5]]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    assert lines[1] == {"step": 2, "loss": 0.5, "grad_norm": None, "tokens": 20}

    before = path.stat().st_ino
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=3) as w:
        assert w.dropped_on_resume == 3
        w.log(4, {"loss": 0.4})
    assert path.stat().st_ino != before  # rewritten through a temporary file + rename
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".*.tmp"))

    # a disabled writer touches nothing; a fresh run starts the file over
    MetricsWriter(tmp_path, enabled=False, tensorboard=True, resume_step=None).log(1, {"loss": 9.0})
    assert len(path.read_text().splitlines()) == 4
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=None).close()
    assert path.read_text() == ""


def test_metrics_reject_garbage_and_step_key(tmp_path):
    from vigos_megatron.training.metrics import METRICS_FILE, MetricsWriter

    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2: not a metrics line"):
        MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=1)
    with MetricsWriter(tmp_path / "x", enabled=True, tensorboard=False, resume_step=None) as w:
        with pytest.raises(ValueError, match="'step'"):
            w.log(1, {"step": 3})


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    import builtins

    from vigos_megatron.training import metrics

    real_import = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    monkeypatch.setattr(metrics, "_TB_WARNED", False)
    with pytest.warns(UserWarning, match="TensorBoard logging disabled") as rec:
        w1 = metrics.MetricsWriter(tmp_path / "a", enabled=True, tensorboard=True, resume_step=None)
        w2 = metrics.MetricsWriter(tmp_path / "b", enabled=True, tensorboard=True, resume_step=None)
    assert sum("TensorBoard" in str(r.message) for r in rec) == 1
    w1.log(1, {"loss": 1.0})
    w1.close(), w2.close()
    assert json.loads((tmp_path / "a" / metrics.METRICS_FILE).read_text()) == {"step": 1, "loss": 1.0}


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vigos_megatron.training.metrics import TENSORBOARD_DIR, MetricsWriter

    with MetricsWriter(tmp_path, enabled=True, tensorboard=True, resume_step=None) as w:
        w.log(1, {"loss": 0.5, "lr": 1e-3})
        w.log(2, {"loss": 0.25, "lr": 1e-3})
    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    # resume from step 1: the launch's step-2 event is superseded (purge_step), as in metrics.jsonl
    with MetricsWriter(tmp_path, enabled=True, tensorboard=True, resume_step=1) as w:
        w.log(2, {"loss": 0.125, "lr": 1e-3})
    acc = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.125)]


def test_format_progress():
    from vigos_megatron.training.metrics import format_progress

    line = format_progress(3, 20, {"perception": 0.0121, "loss": 0.04123, "lr": 7.75e-4, "grad_norm": 0.6407,
                                   "tokens_per_s": 812.3, "rollout_time_s": 1.2, "update_time_s": 0.8,
                                   "invalid_rate": float("nan")})
    assert line == ("step 3/20 | loss 0.04123 | gnorm 0.6407 | lr 7.750e-04 | tok/s 812.3 | rollout s 1.2 | "
                    "update s 0.8 | invalid_rate nan | perception 0.0121")


# ----------------------------------------------------------------------------- signals


def test_stop_signal_repeats_are_one_stop_and_a_later_signal_stops_at_once():
    """The first signal sets the flag; repeats within the window (Slurm + torchrun + the launcher passing one
    stop on) are ignored; a signal after the window raises StopNow in the main thread; handlers restored."""
    import io

    from vigos_megatron.training.signals import StopNow, StopSignal

    previous = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()
    with pytest.raises(StopNow) as info:
        with StopSignal(window_s=0.5, stream=out) as stop:
            assert not stop.requested and stop.agreed() is False
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.wait_noticed() and stop.signal_name == "SIGTERM" and stop.agreed() is True
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat within the window: the same stop
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.6)
            os.kill(os.getpid(), signal.SIGINT)  # after the window: stop at once
            t0 = time.time()
            while time.time() - t0 < 5:
                sum(range(1000))
    assert info.value.signal_name == "SIGINT"
    text = out.getvalue()
    assert text.count("received SIGTERM") == 1 and "again within 0.5 s: the same stop" in text
    assert "SIGINT again: stopping at once" in text
    assert signal.getsignal(signal.SIGTERM) is previous and signal.set_wakeup_fd(-1) == -1


def test_stop_now_is_exit_75_and_agreed_is_collective():
    """Subprocess: a repeated SIGTERM after the window ends the entry point with exit code 75 and one line;
    agreed() over a gloo group of one."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        import torch.distributed as dist
        from vigos_megatron.training.console import run_cli
        from vigos_megatron.training.signals import StopSignal

        def main(argv):
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
            with StopSignal(window_s=0.2) as stop:
                os.kill(os.getpid(), signal.SIGTERM); stop.wait_noticed()
                print("agreed", stop.agreed(), flush=True)
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGTERM); time.sleep(2)
                print("still alive", flush=True)
            return 0

        sys.exit(run_cli(main, "probe"))
    """)
    from vigos_megatron.testing.distributed import subprocess_env

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "agreed True" in proc.stdout and "still alive" not in proc.stdout
    assert "received SIGTERM" in proc.stderr
    assert "probe: stopped at once on a repeated SIGTERM before saving" in proc.stderr


def test_a_stop_while_the_checkpoint_writer_starts_is_kept_and_the_writer_survives_it():
    """Subprocess: a SIGTERM that arrives while start_checkpoint_writer spawns megatron's write-results server
    reaches the stop handler (a preemption right after a resume must stop the run), and the server, started
    with the stop signals blocked, survives the SIGTERM that a scheduler sends every process of the job."""
    code = textwrap.dedent("""
        import os, signal, threading, time
        import psutil
        from vigos_megatron.training.checkpoint import start_checkpoint_writer
        from vigos_megatron.training.signals import StopSignal

        def servers():
            return [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]

        def stop_during_the_start():  # the server process exists, its start (a handshake) is not over
            while not servers():
                time.sleep(0.002)
            os.kill(os.getpid(), signal.SIGTERM)

        with StopSignal() as stop:
            threading.Thread(target=stop_during_the_start, daemon=True).start()
            start_checkpoint_writer()
            print("stop noticed", stop.wait_noticed(5), flush=True)
            server = servers()[0]
            server.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            print("server alive", server.is_running() and server.status() != psutil.STATUS_ZOMBIE, flush=True)
    """)
    from vigos_megatron.testing.distributed import subprocess_env

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=subprocess_env({"VIGOS_FORCE_CPU": "1"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stop noticed True" in proc.stdout and "server alive True" in proc.stdout, proc.stdout + proc.stderr


def test_the_checkpoint_writer_server_ends_with_a_killed_rank():
    """Subprocess: the write-results server ignores stop signals (above), so a rank killed with SIGKILL
    cannot shut it down: its watchdog kills it once the rank is gone, and ends too."""
    import psutil

    code = textwrap.dedent("""
        import multiprocessing, time
        from vigos_megatron.training.checkpoint import start_checkpoint_writer

        start_checkpoint_writer()
        print("server", *[p.pid for p in multiprocessing.active_children()], flush=True)
        time.sleep(300)
    """)
    from vigos_megatron.testing.distributed import subprocess_env

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env({"VIGOS_FORCE_CPU": "1"}))
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["server"] and len(line) == 2, line
        server = psutil.Process(int(line[1]))
        watchdogs = [c for c in psutil.Process(proc.pid).children() if "pidfd_open" in " ".join(c.cmdline())]
        assert len(watchdogs) == 1 and server.is_running()
    finally:
        proc.kill()
        proc.wait()

    def gone(p):
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 30
    while not (gone(server) and gone(watchdogs[0])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(server) and gone(watchdogs[0])
