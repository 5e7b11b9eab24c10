"""A teacher of its own, of another size, inside the student's pipeline schedule (``model.teacher``).

The schedule-level parity (the larger teacher in the stage at PP1 against the teacher run on its own,
and at PP2 / TP2 / TP2 x PP2 against PP1) is in tests/test_schedule.py (``larger-teacher`` cases).
Here:

* fast: what a teacher must share with the student is refused before any model or process group, in
  one line naming both checkpoints (family, vocabulary, tokenizer, image patching, heads over TP,
  layers over the stages); the layer split per stage; the command line refuses a teacher with another
  vocabulary in one line, quickly;
* fast: the memory estimate counts a teacher of another size; the VGS paper's recipes
  (``conf/vgs_qwen3_vl_{2b,4b}_from_8b.yaml``) validate without a process group and state the estimate;
* slow: ``conf/tiny_vgs_teacher_cpu.yaml`` (a tiny student, hidden 64 / 2 layers / 4 heads, and a
  teacher of hidden 96 / 3 layers / 6 heads): VGS's first step equal across TP1 / TP2 / PP2 / TP2 x PP2
  / DP2, ``opd`` and ViGOS at TP2 x PP2 and DP2 equal TP1; ``loss.vgs.quantile_scope=global`` at PP2 x DP2
  with one rollout per micro-batch equals the step with the whole batch in one micro-batch (the default
  micro-batch scope does not); a run stopped after 2 steps resumes exactly;
  VGS with the student's own checkpoint as the teacher gives a loss and gradient of exactly zero.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "pretrain_vigos.py"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from vigos_megatron.testing import tiny_qwen, tiny_qwen3_vl

    base = tmp_path_factory.mktemp("pair")
    return {
        "student": tiny_qwen.write_tiny_checkpoint(base / "student", seed=0),
        "larger": tiny_qwen.write_tiny_checkpoint(base / "larger", seed=1, text_size=tiny_qwen.TEACHER_TEXT_SIZE),
        "other_vocab": tiny_qwen.write_tiny_checkpoint(base / "other_vocab", seed=2, text_size={"vocab_size": 512}),
        "qwen3": tiny_qwen3_vl.write_tiny_checkpoint(base / "qwen3", seed=3),
        "qwen3_larger": tiny_qwen3_vl.write_tiny_checkpoint(base / "qwen3_larger", seed=4,
                                                            text_size=tiny_qwen3_vl.TEACHER_TEXT_SIZE),
    }


# ----------------------------------------------------------------------------- fast


def test_stage_layers_and_provider_split():
    from vigos_megatron.config.teacher import provider_split, stage_layers
    from vigos_megatron.errors import ConfigError

    assert stage_layers(3, 1) == [3]
    assert stage_layers(3, 2) == [2, 1]  # the remainder on the first stage
    assert stage_layers(36, 4) == [9, 9, 9, 9]
    assert stage_layers(10, 4) == [4, 2, 2, 2]
    assert stage_layers(3, 2, [1, 2]) == [1, 2]
    assert provider_split([9, 9, 9, 9]) == {}
    assert provider_split([4, 2, 2, 2]) == {"num_layers_in_first_pipeline_stage": 4,
                                            "num_layers_in_last_pipeline_stage": 2}
    for n, pp, conf, msg in ((3, 2, [1, 1], "sum to 2"), (3, 2, [3], "1 counts for parallel.pp=2"),
                             (8, 4, [1, 3, 2, 2], "middle stages need equal counts"), (2, 3, (), "cannot fill 3")):
        with pytest.raises(ConfigError, match=msg):
            stage_layers(n, pp, conf)


def test_check_pair_accepts_another_size_and_refuses_what_must_be_shared(pair, tmp_path):
    import shutil

    from vigos_megatron.config.teacher import check_pair
    from vigos_megatron.errors import ConfigError

    assert check_pair(pair["student"], pair["larger"], tp=2, pp=2) == [2, 1]
    assert check_pair(pair["qwen3"], pair["qwen3_larger"], tp=2, pp=2) == [3, 3]
    cases = {
        "other_vocab": ("vocabularies differ: the teacher has 512 tokens, the student 384", dict(tp=1, pp=1)),
        "qwen3": ("the teacher is a 'qwen3_vl' model, the student a 'qwen2_5_vl' one", dict(tp=1, pp=1)),
        "larger": ("parallel.tp: 4 does not divide the teacher's num_attention_heads=6", dict(tp=4, pp=1)),
    }
    for name, (msg, layout) in cases.items():
        with pytest.raises(ConfigError) as e:
            check_pair(pair["student"], pair[name], **layout)
        line = str(e.value)
        assert msg in line and "\n" not in line and str(pair[name]) in line and str(pair["student"]) in line, line
    # a tokenizer with another added token: same sizes, another tokenizer
    other_tok = tmp_path / "other_tok"
    shutil.copytree(pair["larger"], other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    tok["added_tokens"][-1]["content"] = "<|something_else|>"
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"the tokenizers differ in their added tokens \(tokenizer.json\)"):
        check_pair(pair["student"], other_tok, tp=1, pp=1)
    # Qwen3-VL: the teacher's 2 deepstack layers must be on the first stage
    with pytest.raises(ConfigError, match="leaves 1 language-model layers .* fewer than the 2 deepstack layers"):
        check_pair(pair["qwen3"], pair["qwen3_larger"], tp=1, pp=2, pipeline_layers=[1, 5])


def test_teacher_from_a_megatron_checkpoint_equals_the_hf_one(pair, tmp_path):
    """``model.teacher.init_checkpoint``: the larger teacher converted to a Megatron checkpoint loads the same
    weights as from its HF directory, frozen (no grad)."""
    import torch

    from vigos_megatron.config.model import TeacherConfig
    from vigos_megatron.config.teacher import teacher_hf_dir
    from vigos_megatron.convert.converters import hf_to_megatron
    from vigos_megatron.models.teacher import load_teacher
    from vigos_megatron.startup import local_model_parallel

    ckpt = hf_to_megatron(pair["larger"], tmp_path / "larger_megatron", quiet=True)
    tc = TeacherConfig(init_checkpoint=str(tmp_path / "larger_megatron"))
    kw = dict(pipeline_layers=[3], tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
              dtype=torch.float32, transformer_impl="local")
    with local_model_parallel():
        a = load_teacher(teacher_hf_dir(tc), tc.init_checkpoint, **kw)
        b = load_teacher(pair["larger"], pair["larger"], **kw)
    assert teacher_hf_dir(tc) == ckpt / "hf"
    pa, pb = dict(a.chunks[0].named_parameters()), dict(b.chunks[0].named_parameters())
    assert sorted(pa) == sorted(pb) and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not any(p.requires_grad for p in pa.values()) and a.local_param_count == b.local_param_count > 0


def test_command_line_refuses_another_vocabulary_in_one_line(tiny_demo_assets, pair, tmp_path):
    from vigos_megatron.testing.distributed import subprocess_env

    hf, shards = tiny_demo_assets["hf"], tiny_demo_assets["shards"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ENTRY), "--config", str(ROOT / "conf/tiny_vgs_teacher_cpu.yaml"),
                        f"run_dir={tmp_path / 'run'}", "tiny.enabled=false", "tiny.teacher=none", f"model.hf_path={hf}",
                        f"model.teacher.hf_path={pair['other_vocab']}", f"data.loader.shards_dir={shards}",
                        f"data.context.processor_path={hf}", "parallel.tp=1"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    took = time.perf_counter() - t0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("pretrain_vigos: error: model.teacher.hf_path: vocabularies differ"), lines[0]
    assert str(pair["other_vocab"]) in lines[0] and r.stdout == ""
    print(f"refused in {took:.1f} s: {lines[0]}")
    assert took < 10  # goal: under 5 s on an idle machine (no model, no process group)


def test_memory_estimate_counts_a_teacher_of_another_size():
    from vigos_megatron.recipes.memory import LayoutError, Workload, estimate_memory
    from vigos_megatron.recipes.shapes import as_model_shape

    w = Workload(prompt_tokens=4096, completion_tokens=1024, image_tokens=1024, objective="vgs")
    own = estimate_memory("qwen3_vl_2b", tp=1, pp=2, dp=4, workload=w)
    big = estimate_memory("qwen3_vl_2b", tp=1, pp=2, dp=4, workload=w, teacher="qwen3_vl_8b")
    key = "teacher parameters (bf16, frozen)"
    t = as_model_shape("qwen3_vl_8b")
    # the 8B teacher's 36 layers split [18, 18]; the student's stage 0 holds its embedding and ViT
    assert big.static[key] == 2 * sum(t.stage_params(1, 2, big.stage, layers=18))
    assert sum(2 * sum(t.stage_params(1, 2, s, layers=18)) for s in range(2)) == 2 * t.param_count() + (
        2 * t.vocab_size * t.hidden_size if t.tie_word_embeddings else 0)  # the tied copy on the last stage
    assert big.static[key] > own.static[key] and big.peak_bytes > own.peak_bytes
    with pytest.raises(LayoutError, match="differs from the student"):
        estimate_memory("qwen3_vl_2b", tp=1, pp=1, dp=1, workload=w, teacher="qwen2_5_vl_7b")


@pytest.mark.parametrize("student", ["2b", "4b"])
def test_vgs_paper_recipes_validate_without_a_process_group(student):
    import re

    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout
    from vigos_megatron.recipes.memory import Workload, estimate_memory

    path = ROOT / "conf" / f"vgs_qwen3_vl_{student}_from_8b.yaml"
    cfg = load_config(PretrainConfig, path, ["run_dir=/tmp/unused"])
    assert cfg.loss.objective == "vgs" and cfg.loss.vgs.eta == {"2b": 0.41, "4b": 0.36}[student]
    assert cfg.model.teacher.hf_path and cfg.own_teacher
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.decay_style) == (1e-6, 0.01, "constant")
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k) == (1.0, 1.0, 0)
    assert (cfg.data.context.max_prompt_tokens, cfg.sampling.max_new_tokens, cfg.train.global_batch_size) == (
        16384, 2048, 512)
    layout = validate_layout(cfg, 8)
    est = estimate_memory(f"qwen3_vl_{student}", tp=layout.tp, pp=layout.pp, dp=layout.dp, teacher="qwen3_vl_8b",
                          workload=Workload.from_config(cfg, f"qwen3_vl_{student}"))
    stated = float(re.search(r"peak = static \+ max\(training, rollout\): ([\d.]+) GiB", path.read_text()).group(1))
    assert abs(stated - est.peak_gib) < 0.01 and est.fits(), (stated, est.peak_gib)


# ----------------------------------------------------------------------------- slow (torchrun)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _close(a: float, b: float, rel: float = 1e-5, floor: float = 1e-6) -> bool:
    return abs(a - b) <= max(rel * abs(b), floor)


@pytest.fixture(scope="module")
def vgs_launch():
    from vigos_megatron.testing.distributed import run_torchrun

    def run(layout: str, run_dir: Path, *overrides: str) -> str:
        """``layout``: a key of :data:`LAYOUTS`."""
        nproc, ov = LAYOUTS[layout]
        return run_torchrun(ENTRY, nproc, "--config", ROOT / "conf" / "tiny_vgs_teacher_cpu.yaml", f"run_dir={run_dir}",
                            *ov, *overrides, timeout=900)

    return run


LAYOUTS = {"tp1": (1, ["parallel.tp=1"]), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.tp=1", "parallel.pp=2"]),
           "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]), "dp2": (2, ["parallel.tp=1"]),
           "pp2xdp2": (4, ["parallel.tp=1", "parallel.pp=2"])}
VGS_KEYS = ("loss", "term/l_std", "term/l_vis", "term/l_lp", "grad_norm")


@pytest.fixture(scope="module")
def vgs_straight(vgs_launch, tmp_path_factory):
    """VGS with the larger teacher at PP=2 (its 3 layers split [2, 1]), 4 straight steps: the PP2 point of the
    first-step parity and the reference of the resume test."""
    run = tmp_path_factory.mktemp("vgs") / "straight"
    vgs_launch("pp2", run, "train.steps=4")
    return _metrics(run)


@pytest.fixture(scope="module")
def first_step(vgs_launch, tmp_path_factory):
    """``first_step(layout, *overrides)``: the metrics of a one-step launch, launched once per module."""
    cache = {}

    def first(layout: str, *overrides: str) -> dict:
        key = (layout, overrides)
        if key not in cache:
            run = tmp_path_factory.mktemp("first") / layout
            vgs_launch(layout, run, "train.steps=1", *overrides)
            cache[key] = _metrics(run)[0]
        return cache[key]

    return first


@pytest.mark.slow
@pytest.mark.parametrize("objective,layouts,keys", [
    ("vgs", ("tp1", "tp2", "tp2xpp2", "dp2"), VGS_KEYS),
    ("opd", ("tp1", "tp2xpp2", "dp2"), ("loss", "term/std", "grad_norm")),
    ("vigos", ("tp1", "tp2xpp2", "dp2"), ("loss", "term/perception", "term/reasoning", "grad_norm")),
])
def test_larger_teacher_first_step_parity(first_step, vgs_straight, objective, layouts, keys):
    first = {"pp2": vgs_straight[0]} if objective == "vgs" else {}
    for name in layouts:
        first[name] = first_step(name, f"loss.objective={objective}")
    ref = first["tp1"]
    print(objective, {n: {k: m.get(k) for k in keys} for n, m in first.items()})
    assert ref["loss"] > 1e-4 and ref["grad_norm"] > 0, ref
    for name, m in first.items():
        for key in keys:
            assert key in ref, (key, ref)
            assert _close(m[key], ref[key]), (objective, name, key, m[key], ref[key])
        assert m["completion_tokens"] == ref["completion_tokens"], name


@pytest.mark.slow
def test_vgs_global_quantile_scope_equals_one_micro_batch_of_the_whole_batch(first_step):
    """``loss.vgs.quantile_scope=global`` at PP2 x DP2 with one rollout per micro-batch (4 micro-batches on 2
    data-parallel ranks; the teacher pass through the pipeline, the VDS gathered over the ranks) equals the
    step that holds all 4 rollouts in one micro-batch at TP1 (whose micro-batch quantile is the global one); the
    default micro-batch scope with 2 micro-batches of 2 (the parity test's TP1 step) selects other tokens."""
    ref = first_step("tp1", "loss.objective=vgs", "train.micro_batch_size=4")
    scope = first_step("pp2xdp2", "loss.objective=vgs", "train.micro_batch_size=1", "loss.vgs.quantile_scope=global")
    micro = first_step("tp1", "loss.objective=vgs")
    keys = (*VGS_KEYS, "term/vds", "term/lp_selected_fraction")
    print({n: {k: m[k] for k in keys} for n, m in (("one micro-batch", ref), ("global", scope), ("micro", micro))})
    assert ref["term/l_lp"] > 0 and scope["completion_tokens"] == ref["completion_tokens"]
    for key in keys:
        assert _close(scope[key], ref[key]), (key, scope[key], ref[key])
    assert _close(micro["term/vds"], ref["term/vds"]) and not _close(micro["term/l_lp"], ref["term/l_lp"], rel=1e-3)


@pytest.mark.slow
def test_larger_teacher_resumes_exactly(vgs_launch, vgs_straight, tmp_path):
    split = tmp_path / "split"
    vgs_launch("pp2", split, "train.steps=4", "train.exit_after=2")
    out = vgs_launch("pp2", split, "train.steps=4")
    assert "resuming at step 2" in out
    b = _metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(vgs_straight, b):
        for key in (*VGS_KEYS, "completion_tokens"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])


@pytest.mark.slow
def test_vgs_is_exactly_zero_with_the_students_own_checkpoint_as_teacher(tiny_demo_assets, vgs_launch, tmp_path):
    """VGS under equal contexts (the student's own, as with any teacher of its own) with the teacher built from the
    student's checkpoint by its own builder, through the stage at PP=2: the loss and the gradient vanish (to the
    rounding of ``log q* = log p_S(x) + log q_T(I,x) - log q_T(x)``, as in the loss-level test; the same step
    with the larger teacher has a loss ~1e-2 and a gradient norm ~1e-1)."""
    run = tmp_path / "own"
    vgs_launch("pp2", run, "train.steps=1", "tiny.teacher=none", f"model.teacher.hf_path={tiny_demo_assets['hf']}")
    m = _metrics(run)[0]
    print({k: m[k] for k in ("loss", "term/l_std", "term/l_vis", "term/l_lp", "grad_norm")})
    assert max(abs(m[k]) for k in ("loss", "term/l_std", "term/l_vis", "term/l_lp")) < 1e-6 and m["grad_norm"] < 1e-5, m
