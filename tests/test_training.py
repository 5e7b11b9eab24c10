"""The training loop (``examples/pretrain_vigos.py``) on the tiny embedded config.

* fast: configuration errors fail before any process group, naming the option;
* fast: a non-finite step is not applied (skip) or stops before any weight changes (stop);
* fast: the frozen teacher runs inside the schedule, once per stage and micro-batch, and its
  logits do not outlive their micro-batch;
* slow: the first step's loss, terms and gradient norm agree across TP1, TP2, PP2, TP2xPP2, DP2
  (the loss from hidden states) and TP1 with the loss from logits (the reference);
* slow: a run stopped after 2 of 4 steps and launched again continues exactly; a checkpoint
  written at TP=2 resumes at TP=1;
* slow: the perception and reasoning terms fall over 20 steps (bad input end to end:
  tests/test_training_bad_input.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "pretrain_vigos.py"
DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

#: first-step quantities compared across layouts (fp32 on CPU)
PARITY_KEYS = ("loss", "term/perception", "term/reasoning", "term/reference", "grad_norm")
PARITY_REL_TOL = 1e-5
#: the terms are per-token KLs of nearly equal distributions (~1e-2): fp32 logits that differ by
#: the reduction order of another layout move them by ~1e-7 absolute, more than 1e-5 relative
PARITY_ABS_TOL = 1e-6


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(PARITY_REL_TOL * abs(b), PARITY_ABS_TOL)


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _launch(torchrun_fn, nproc: int, run_dir: Path, *overrides: str, timeout: float = 600,
            config: str = "tiny_cpu.yaml") -> str:
    return torchrun_fn(ENTRY, nproc, "--config", ROOT / "conf" / config, f"run_dir={run_dir}", *overrides,
                       timeout=timeout)


#: the embedded demo on each model family
DEMO_CONFIGS = pytest.mark.parametrize("config", ["tiny_cpu.yaml", "tiny_qwen3_vl_cpu.yaml"], ids=["qwen2_5_vl", "qwen3_vl"])


@pytest.fixture
def launch(tiny_demo_assets, request):
    """``launch(nproc, run_dir, *overrides)``: the demo entry point under torchrun on the test's
    ``config`` (the demo's assets come from the shared cache; the Qwen3-VL ones are built once, by
    the first launch, at most about 3 minutes)."""
    from vigos_megatron.testing.distributed import run_torchrun

    config = request.node.callspec.params.get("config", "tiny_cpu.yaml") if hasattr(request.node, "callspec") else "tiny_cpu.yaml"

    def run(nproc, run_dir, *ov, **kw):
        return _launch(run_torchrun, nproc, run_dir, *ov, config=config, **kw)

    return run


# ----------------------------------------------------------------------------- fast


def test_bad_config_fails_before_any_process_group(tmp_path):
    from vigos_megatron.testing.distributed import subprocess_env

    cases = {
        "parallel.tp=3": "parallel.tp * parallel.pp = 3 does not divide the world size 1",
        "train.micro_batch_size=3": "train.micro_batch_size: 3 does not divide",
        "train.exit_after=9": "train.exit_after: 9 exceeds train.steps=4",
        "loss.objective=ppo": "loss.objective: must be one of",
        "sampling.temperature=0": "sampling.temperature: must be > 0",
        "optimizer.decay_style=step": "optimizer.decay_style: must be one of",
        "nonsense.key=1": "option 'nonsense'",
    }
    for override, message in cases.items():
        r = subprocess.run([sys.executable, str(ENTRY), "--config", str(ROOT / "conf/tiny_cpu.yaml"),
                            f"run_dir={tmp_path}", override], capture_output=True, text=True, env=subprocess_env(),
                           timeout=120)
        assert r.returncode == 2, (override, r.stdout[-2000:], r.stderr[-2000:])
        assert message in r.stderr, (override, r.stderr[-2000:])
        assert "init_process_group" not in r.stderr


def test_bad_paths_fail_in_one_line_before_any_model(tmp_path):
    """Each bad path option: one line on stderr naming the option and the path, exit code 2, in seconds."""
    import time

    from vigos_megatron.testing.distributed import subprocess_env

    shards, hf = tmp_path / "shards", tmp_path / "hf"
    shards.mkdir()
    hf.mkdir()
    (shards / "manifest.json").write_text("{}")
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    real = ["tiny.enabled=false", f"model.hf_path={hf}", f"data.loader.shards_dir={shards}",
            f"data.context.processor_path={hf}"]
    cases = {
        ("data.context.prompts_path=/nonexistent/p.yaml",): "data.context.prompts_path: /nonexistent/p.yaml: no such file",
        (f"run_dir={tmp_path / 'afile'}",): f"run_dir: {tmp_path / 'afile'}: exists and is not a directory",
        ("run_dir=/proc/no/such/run",): "run_dir: /proc/no/such/run: not a writable directory",
        ("model.init_checkpoint=/nonexistent/ckpt",): "model.init_checkpoint: /nonexistent/ckpt: no such directory",
        (f"model.init_checkpoint={tmp_path}",): f"model.init_checkpoint: {tmp_path}: not a Megatron distributed checkpoint",
        ("model.teacher.hf_path=/nonexistent/t",): "model.teacher.hf_path: /nonexistent/t: no such directory",
        (*real[:1], "model.hf_path=/nonexistent/m", *real[2:]): "model.hf_path: /nonexistent/m: no such directory",
        (*real[:1], f"model.hf_path={tmp_path / 'afile'}", *real[2:]): f"model.hf_path: {tmp_path / 'afile'}: not a directory",
        (*real[:2], "data.loader.shards_dir=/nonexistent/s", *real[3:]): "data.loader.shards_dir: /nonexistent/s: no such directory",
        (*real[:3], "data.context.processor_path=/nonexistent/p"): "data.context.processor_path: /nonexistent/p: no such directory",
    }
    for overrides, message in cases.items():
        run_dir = [] if any(o.startswith("run_dir=") for o in overrides) else [f"run_dir={tmp_path / 'run'}"]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ENTRY), "--config", str(ROOT / "conf/tiny_cpu.yaml"), "parallel.tp=1",
                            *run_dir, *overrides], capture_output=True, text=True, env=subprocess_env(), timeout=120)
        took = time.perf_counter() - t0
        assert r.returncode == 2, (overrides, r.stdout[-2000:], r.stderr[-2000:])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("pretrain_vigos: error: "), \
            (overrides, r.stderr[-2000:])
        assert r.stdout == "" and took < 10, (overrides, took)  # goal: under 5 s; no model was built


def test_validate_layout_is_public_and_needs_no_process_group():
    import torch.distributed as dist

    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    cfg = load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=/nonexistent", "parallel.tp=1",
                                                                      "train.global_batch_size=8"])
    lay = validate_layout(cfg, 4)
    assert (lay.tp, lay.pp, lay.dp, lay.prompts_per_rank, lay.micro_batches) == (1, 1, 4, 2, 1)
    with pytest.raises(ConfigError, match="do not split over 3 data-parallel ranks"):
        validate_layout(cfg, 3)
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def tiny_step(tmp_path_factory):
    """A tiny student+teacher stage under DDP with an optimizer, and one step's inputs (PP=1, in process)."""
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("train_step")
    return {"hf": write_tiny_checkpoint(base / "hf", seed=0)}


def _build(hf):
    import schedule_common as sc

    from vigos_megatron.config.train import OptimizerConfig
    from vigos_megatron.schedule.stage import StudentTeacherStage
    from vigos_megatron.training.optimizer import build_optimizer

    inputs = sc.build_inputs(hf)
    _, student, teacher = sc.build_models(hf, 1, 1)
    stage = StudentTeacherStage(student, teacher)
    model = [sc.wrap_ddp(stage)]
    opt, sched = build_optimizer(OptimizerConfig(lr=1e-2, clip_grad=1.0), model, total_steps=4, dp_size=1)
    return inputs, student, teacher, model, opt, sched


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_nonfinite_step_is_not_applied(tiny_step, action):
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.training.update import NonFiniteStep, train_step

    with local_model_parallel() as ps:
        inputs, student, _, model, opt, sched = _build(tiny_step["hf"])
        _, _, loss_fn = sc.make_loss(inputs.batches, ps)

        def nan_loss(tokens, output):
            loss, n, report = loss_fn(tokens, output)
            return loss * float("nan"), n, report

        before = {k: p.detach().clone() for k, p in student.named_parameters()}
        lr0 = opt.param_groups[0]["lr"]
        if action == "stop":
            with pytest.raises(NonFiniteStep, match="no update was applied"):
                train_step(model, opt, sched, inputs.batches, nan_loss, on_nonfinite="stop")
        else:
            res = train_step(model, opt, sched, inputs.batches, nan_loss, on_nonfinite="skip")
            assert not res.applied
        assert all(torch.equal(p, before[k]) for k, p in student.named_parameters())
        assert opt.param_groups[0]["lr"] == lr0
        # the next, finite step is applied and changes the student
        res = train_step(model, opt, sched, inputs.batches, loss_fn, on_nonfinite=action)
        assert res.applied and res.loss > 0 and res.grad_norm > 0
        assert any(not torch.equal(p, before[k]) for k, p in student.named_parameters())


def test_teacher_runs_inside_the_schedule_once_per_micro_batch(tiny_step):
    """Counts teacher forward calls per micro-batch (test-only hooks) and checks that the stage output
    holding micro-batch i's teacher logits is freed before micro-batch i+1 runs."""
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.training.update import train_step

    calls, outputs, alive_at_next = [], [], []
    with local_model_parallel() as ps:
        inputs, student, teacher, model, opt, sched = _build(tiny_step["hf"])
        _, _, loss_fn = sc.make_loss(inputs.batches, ps)
        stage = model[0].module

        def on_teacher(mod, args, kwargs, out):
            alive_at_next.append(sum(ref() is not None for ref in outputs))
            calls.append(tuple(kwargs["position_ids"].shape[1:]))  # [3, rows, S_c]
            assert out.shape == (int(slot_positions.pop(0)), out.shape[-1])  # logits at the loss positions only

        def on_stage(mod, args, out):  # the last stage's (student rows, teacher rows)
            outputs.extend(weakref.ref(t) for t in out)

        ks = inputs.batches[0].student_slots
        slot_positions = [p.numel() for b in inputs.batches for p in b.positions[ks:]]
        h1 = teacher.language_model.register_forward_hook(on_teacher, with_kwargs=True)
        h2 = stage.register_forward_hook(on_stage)
        try:
            train_step(model, opt, sched, inputs.batches, loss_fn)
        finally:
            h1.remove()
            h2.remove()
    # one teacher pass per micro-batch and teacher slot, each at the slot's own length (the micro-batch's)
    assert calls == [(b.rollouts, s_c) for b in inputs.batches for s_c in b.slot_lengths[b.student_slots:] if s_c]
    assert alive_at_next == [0] * len(calls)  # the previous micro-batch's logits were already freed
    assert all(ref() is None for ref in outputs)


# ----------------------------------------------------------------------------- slow (torchrun)


@pytest.mark.slow
@DEMO_CONFIGS
def test_first_step_parity_across_layouts(launch, tmp_path, config):
    # the self-distillation teacher (the initial student, primed with the completion format): at
    # step 1 the terms come from the contexts alone (~0.02 per token, some tokens at the 0.05 clip).
    # A separate random teacher would put every token at the clip: constant terms, zero gradient.
    layouts = {"tp1": (1, ["parallel.tp=1", "loss.from_hidden=false"]), "tp1-hidden": (1, ["parallel.tp=1"]),
               "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.tp=1", "parallel.pp=2"]),
               "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]), "dp2": (2, ["parallel.tp=1"])}
    first = {}
    for name, (nproc, ov) in layouts.items():
        run = tmp_path / name
        _ = launch(nproc, run, "train.steps=1", *ov)
        first[name] = _metrics(run)[0]
    ref = first["tp1"]
    assert ref["step"] == 1 and ref["loss"] > 0 and ref["invalid_rate"] < 0.5, ref
    assert "term/perception" in ref and "term/reasoning" in ref, ref  # the primed student's rollouts parse
    assert ref["grad_norm"] > 0 and ref["clip_rate"] < 1, ref  # not every token at the clip
    print({n: {k: m.get(k) for k in PARITY_KEYS} for n, m in first.items()})
    for name, m in first.items():
        for key in PARITY_KEYS:
            if key in ref:
                assert _close(m[key], ref[key]), (name, key, m[key], ref[key])
        assert m["completion_tokens"] == ref["completion_tokens"], name


@pytest.mark.slow
@DEMO_CONFIGS
def test_resume_continues_exactly_and_across_layouts(launch, tmp_path, config):
    straight, split = tmp_path / "straight", tmp_path / "split"
    launch(2, straight, "train.steps=4")
    out = launch(2, split, "train.steps=4", "train.exit_after=2")
    assert "saved checkpoint" in out
    assert [m["step"] for m in _metrics(split)] == [1, 2]
    out = launch(2, split, "train.steps=4")
    assert "resuming at step 2" in out
    a, b = _metrics(straight), _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    if config == "tiny_qwen3_vl_cpu.yaml":
        # mostly well-formed rollouts, some not: all three ViGOS teachers score rows in the first steps
        invalid = [m["invalid_rate"] for m in a]
        assert 0 < sum(invalid) / len(invalid) < 0.5, invalid
        assert any(m.get("term/reference", 0) > 0 for m in a), a
    for x, y in zip(a, b):
        for key in ("loss", "term/perception", "term/reasoning", "term/reference", "grad_norm", "lr",
                    "completion_tokens", "invalid_rate"):
            if key in x:
                assert x[key] == y[key], (x["step"], key, x[key], y[key])
    # a checkpoint written at TP=2 resumes at TP=1 (1 process)
    tp_change = tmp_path / "tp_change"
    launch(2, tp_change, "train.steps=4", "train.exit_after=2")
    out = launch(1, tp_change, "train.steps=4", "parallel.tp=1")
    assert "resuming at step 2" in out
    c = _metrics(tp_change)
    assert [m["step"] for m in c] == [1, 2, 3, 4]
    for x, y in zip(a[2:], c[2:]):
        # another TP size sums the vocabulary shards in another order: relative 1e-4, and the
        # parity test's absolute floor for losses of ~1e-3 (the tiny Qwen3-VL's)
        assert abs(x["loss"] - y["loss"]) <= max(1e-4 * abs(x["loss"]), PARITY_ABS_TOL), (x["step"], x["loss"], y["loss"])


@pytest.mark.slow
def test_loss_falls_over_twenty_steps(tiny_demo_assets, tmp_path):
    from vigos_megatron.runtime import FORCE_CPU_ENV
    from vigos_megatron.testing.distributed import subprocess_env

    run = tmp_path / "learn"
    # the documented launch without torchrun and without --nproc-per-node: one process
    r = subprocess.run([sys.executable, str(ENTRY), "--config", str(ROOT / "conf" / "tiny_cpu.yaml"), f"run_dir={run}",
                        "parallel.tp=1", "train.steps=20", "optimizer.warmup_steps=2"],
                       capture_output=True, text=True, env=subprocess_env({FORCE_CPU_ENV: "1"}), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 20/20" in r.stdout and "Traceback" not in r.stderr
    ms = _metrics(run)
    assert len(ms) == 20
    # rollouts.jsonl: the demo's first 2 rollouts of every step, with the text each teacher read
    dumped = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert [d["step"] for d in dumped] == [s for s in range(1, 21) for _ in range(2)]
    for d in dumped:
        assert d["prompt"].endswith("<description>") and "<|image_pad|>x" in d["prompt"], d["prompt"][-200:]
        for t in d["teachers"]:
            assert "<think>>" not in t["text"] and t["scored"], t
    # the primed tiny student writes well-formed completions: the perception and reasoning teachers
    # score them, and training keeps the format (a teacher without the format would train it out)
    invalid = sum(m["invalid_rate"] for m in ms) / 20
    perception = [m["term/perception"] for m in ms if "term/perception" in m]
    reasoning = [m["term/reasoning"] for m in ms if "term/reasoning" in m]
    print(f"invalid rate {invalid:.2f}; perception {[round(x, 4) for x in perception]}; "
          f"reasoning {[round(x, 4) for x in reasoning]}; loss {[round(m['loss'], 4) for m in ms]}")
    assert invalid < 0.5 and len(perception) >= 10
    # the student learns the teachers' context-conditioned distributions: each term is a per-token KL
    # of its own segment, comparable across steps (the total mixes terms with the step's invalid rate).
    # Step 1 scores the student against its own initial weights under the teachers' contexts.
    early, late = sum(perception[:5]) / 5, sum(perception[-5:]) / 5
    assert late < 0.8 * early, (early, late)
    half = len(reasoning) // 2
    assert sum(reasoning[half:]) / (len(reasoning) - half) < sum(reasoning[:half]) / half
