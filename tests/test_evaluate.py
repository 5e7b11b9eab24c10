"""tools/evaluate.py: answer scoring, metrics on known grades, benchmark files, and end-to-end runs on
the tiny model (TP=1 from the HF directory; TP=2 from a Megatron checkpoint: the same report)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "evaluate.py"
VGS_PROMPTS = ROOT / "conf" / "prompts" / "vgs.yaml"
GEN_ARGS = ["--samples", "2", "--greedy", "--max-new-tokens", "10", "--min-pixels", "3136", "--max-pixels", "12544"]


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("evaluate_tool", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_tool"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny checkpoint + 4 synthetic shard samples, and two jsonl benchmarks (one ViLP-shaped)."""
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.training.tiny_demo import write_tiny_assets

    root = tmp_path_factory.mktemp("eval")
    paths = write_tiny_assets(root / "run", samples=4, seed=0)
    bench = root / "bench"
    (bench / "img").mkdir(parents=True)
    for i in range(6):
        (bench / "img" / f"{i}.png").write_bytes(image_bytes(56 + 28 * (i % 3), 56, fmt="PNG", seed=i))
    rows = [
        {"id": "q0", "question": "How many circles?", "image": "img/0.png", "answer": "3"},
        {"id": "q1", "question": "<image> What colour is the square?", "image": "img/1.png", "answer": "\\boxed{red}"},
        {"id": "q2", "question": "Which option is right? (A) up (B) down", "image": "img/2.png", "answer": "B"},
    ]
    (bench / "standard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vilp = {"id": "v0", "question": "What is on the table?", "images": ["img/3.png", "img/4.png", "img/5.png"],
            "answers": ["cup", "shoe", "fish"]}
    (bench / "vilp.jsonl").write_text(json.dumps(vilp) + "\n")
    return {"hf": paths["hf"], "shards": paths["shards"], "standard": bench / "standard.jsonl",
            "vilp": bench / "vilp.jsonl", "root": root}


# --------------------------------------------------------------------------- scoring and metrics


def test_score_sample_takes_the_last_box_and_grades_it(ev):
    full = "<description>two red circles</description><think>count them</think> \\boxed{3}"
    assert ev.score_sample(full, "3") == ("3", True)
    assert ev.score_sample("\\boxed{2} no, \\boxed{3}.", "3") == ("3", True)  # the last box
    assert ev.score_sample("\\boxed{\\frac{1}{2}}", "0.5") == ("\\frac{1}{2}", True)  # nested braces, numbers
    assert ev.score_sample("\\boxed{x^{2}+1}", "x^{2}+1") == ("x^{2}+1", True)
    assert ev.score_sample("the answer is 3", "3") == (None, False)  # no box: wrong
    assert ev.score_sample("\\boxed{3", "3") == (None, False)  # unclosed
    assert ev.score_sample("\\boxed{(B)}", "B") == ("(B)", True)
    assert ev.score_sample("\\boxed{Red}", "red")[1] and not ev.score_sample("\\boxed{blue}", "red")[1]


def test_metrics_on_known_grades_equal_hand_computed_values(ev):
    std = ev.Benchmark("std", [ev.Item("std", f"q{i}", "?", "a", "a", 0, ("file", "x")) for i in range(4)])
    grades = {("std", "q0", 0): [True, False, False, False, False],   # n=5, c=1: pass@5 1, avg 0.2
              ("std", "q1", 0): [False] * 5,                          # 0, 0
              ("std", "q2", 0): [True, True, False, False, False],    # 1, 0.4
              ("std", "q3", 0): [True] * 5}                           # 1, 1
    m = ev.aggregate(std, grades, 5)
    assert m["pass@5"] == pytest.approx(3 / 4) and m["avg@5"] == pytest.approx((0.2 + 0 + 0.4 + 1) / 4)
    # Pass@2 from 5 samples: the unbiased estimator 1 - C(n-c,2)/C(n,2)
    m2 = ev.aggregate(std, grades, 2)
    hand = [1 - 6 / 10, 0.0, 1 - 3 / 10, 1.0]  # C(4,2)/C(5,2), C(3,2)/C(5,2)
    assert m2["pass@2"] == pytest.approx(sum(hand) / 4) and m2["avg@2"] == pytest.approx(m["avg@5"])
    vilp = ev.Benchmark("vilp", [ev.Item("vilp", q, "?", "a", "a", i, ("file", "x")) for q in ("v0", "v1") for i in range(3)],
                        vilp=True)
    res = {("vilp", "v0", 0): [True], ("vilp", "v0", 1): [False], ("vilp", "v0", 2): [True],
           ("vilp", "v1", 0): [False], ("vilp", "v1", 1): [True], ("vilp", "v1", 2): [True]}
    v = ev.aggregate(vilp, res, 1)
    assert (v["prior"], v["score"], v["avg"]) == (pytest.approx(0.5), pytest.approx(0.75), pytest.approx(4 / 6))
    assert v["questions"] == 2 and v["prompts"] == 6 and v["evaluated"] == 6


def test_greedy_metrics_on_known_grades(ev):
    std = ev.Benchmark("std", [ev.Item("std", f"q{i}", "?", "a", "a", 0, ("file", "x")) for i in range(4)])
    grades = {("std", "q0", 0): [True], ("std", "q1", 0): [False], ("std", "q2", 0): [True]}  # q3 not evaluated
    assert ev.greedy_metrics(std, grades) == {"acc@1": pytest.approx(2 / 3)}
    assert ev.greedy_metrics(std, {}) == {}
    vilp = ev.Benchmark("vilp", [ev.Item("vilp", "v0", "?", "a", "a", i, ("file", "x")) for i in range(3)], vilp=True)
    res = {("vilp", "v0", 0): [True], ("vilp", "v0", 1): [False], ("vilp", "v0", 2): [True]}
    assert ev.greedy_metrics(vilp, res) == {"score": 0.5, "prior": 1.0, "avg": pytest.approx(2 / 3)}


def test_benchmark_files_shapes_and_errors(ev, assets, tmp_path):
    std, = ev.load_jsonl(assets["standard"])
    assert std.name == "standard" and not std.vilp and len(std.items) == 3
    assert std.items[1].question == "What colour is the square?" and std.items[1].answer == "red"  # cleaned, normalised
    vilp, = ev.load_jsonl(assets["vilp"])
    assert vilp.vilp and [i.image_index for i in vilp.items] == [0, 1, 2] and vilp.items[2].answer == "fish"
    assert len(ev.load_jsonl(assets["standard"], limit=2)[0].items) == 2
    shards = ev.load_shards(assets["shards"])
    assert shards.name == "shards" and len(shards.items) == 4 and all(i.image_ref[0] == "shard" for i in shards.items)
    # grouping by the benchmark field
    img = assets["standard"].parent / "img" / "0.png"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"benchmark": "a", "question": "q", "image": str(img), "answer": "1"}) + "\n"
                     + json.dumps({"benchmark": "b", "question": "q", "image": str(img), "answer": "2"}) + "\n")
    assert [b.name for b in ev.load_jsonl(mixed)] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    cases = [
        ({"question": "q", "image": "missing.png", "answer": "1"}, r"bad.jsonl:1: image file not found"),
        ({"question": "q", "answer": "1"}, r"bad.jsonl:1: missing 'image'"),
        ({"image": str(img), "answer": "1"}, r"bad.jsonl:1: missing 'question' \(or 'problem'\)"),
        ({"question": "q", "images": [str(img), str(img)], "answers": ["1"]}, r"needs 'answers', a list of 2 strings"),
        ({"question": 3, "image": str(img), "answer": "1"}, r"'question' must be a string"),
    ]
    for obj, msg in cases:
        bad.write_text(json.dumps(obj) + "\n")
        with pytest.raises(ev.BenchmarkError, match=msg):
            ev.load_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ev.BenchmarkError, match=r"bad.jsonl:1: invalid JSON"):
        ev.load_jsonl(bad)
    with pytest.raises(ev.BenchmarkError, match=r"manifest.json not found"):
        ev.load_shards(tmp_path)
    with pytest.raises(ev.BenchmarkError, match=r"unique"):
        ev.load_benchmarks([str(assets["standard"]), str(assets["standard"])])


def test_prefill_is_on_by_default_and_switchable(ev, assets):
    from vigos_megatron.data.synthetic import image_bytes

    on = ev.encoder_for(ev.parse_args(["--checkpoint", "x", "--data", "y", "--output", "z"]), assets["hf"])
    off = ev.encoder_for(ev.parse_args(["--checkpoint", "x", "--data", "y", "--output", "z", "--no-prefill"]), assets["hf"])
    rec, img = {"problem": "How many?", "answer": "3"}, image_bytes(56, 56, seed=0)
    a, b = on("k", rec, img)["contexts"]["student"], off("k", rec, img)["contexts"]["student"]
    tok = on.processor.tokenizer
    assert tok.decode(a).endswith("<|im_start|>assistant\n<description>")
    assert tok.decode(b).endswith("<|im_start|>assistant\n") and a[: b.numel()].tolist() == b.tolist()


def test_the_vgs_template_gives_the_papers_prompt(ev, assets):
    from vigos_megatron.data.synthetic import image_bytes

    args = ev.parse_args(["--checkpoint", "x", "--data", "y", "--output", "z", "--prompts", str(VGS_PROMPTS)])
    enc = ev.encoder_for(args, assets["hf"])
    text = enc.processor.tokenizer.decode(enc("k", {"problem": "How many?", "answer": "3"}, image_bytes(56, 56))["contexts"]["student"])
    assert text.startswith("<|im_start|>system\nA conversation between user and assistant.")
    assert "<reason></reason>tags. The final answer MUST BE put in \\boxed{}.<|im_end|>" in text
    assert text.endswith("<|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n")  # no prefill
    assert enc.templates.format == "vgs"


# --------------------------------------------------------------------------- end to end


def run_tool(torchrun, nproc, *args):
    return torchrun(str(SCRIPT), nproc, *map(str, args))  # an absolute path: not under tests/dist


def check_run(ev, out: Path, assets):
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(l) for l in (out / "per_question.jsonl").read_text().splitlines()]
    b = report["benchmarks"]
    assert set(b) == {"standard", "vilp", "shards"}
    assert b["vilp"]["vilp"] and b["vilp"]["samples_per_prompt"] == 1 and {"score", "prior"} <= set(b["vilp"])
    assert b["standard"]["samples_per_prompt"] == 2 and "pass@2" in b["standard"] and "avg@2" in b["standard"]
    assert report["sampling"]["temperature"] == 1.0 and report["sampling"]["top_p"] == 0.9
    assert report["sampling"]["top_k"] == 20 and report["sampling"]["seed"] == 42 and report["prefill"] == "<description>"
    assert report["format"] == "vigos" and not report["sampling"]["greedy"]
    assert len(records) == 2 + 3 + 2 and [r["index"] for r in records] == list(range(7))  # --limit 2 questions
    results, greedy = {}, {}
    for r in records:
        k = 1 if r["benchmark"] == "vilp" else 2
        assert [s["sample_id"] for s in r["samples"]] == [r["index"] * 2 + j for j in range(k)]
        for s in r["samples"] + [r["greedy"]]:
            assert 1 <= s["tokens"] <= 10 and s["finish_reason"] in ("stop", "length") and isinstance(s["valid"], bool)
            assert (s["extracted"], s["correct"]) == ev.score_sample(s["completion"], r["answer"])
        results[(r["benchmark"], r["question_id"], r["image_index"])] = [s["correct"] for s in r["samples"]]
        greedy[(r["benchmark"], r["question_id"], r["image_index"])] = [r["greedy"]["correct"]]
    benches = ev.load_benchmarks([str(assets["standard"]), str(assets["vilp"]), str(assets["shards"])], limit=2)
    for bench in benches:
        k = 1 if bench.vilp else 2
        got = dict(b[bench.name])
        assert got.pop("greedy") == pytest.approx(ev.greedy_metrics(bench, greedy)), bench.name
        assert got == pytest.approx({"vilp": bench.vilp, **ev.aggregate(bench, results, k)}), bench.name
    return report, records


def test_evaluate_end_to_end_tp1(ev, assets, torchrun):
    out = assets["root"] / "out_tp1"
    log = run_tool(torchrun, 1, "--checkpoint", assets["hf"], "--data", assets["standard"], "--data", assets["vilp"],
                   "--data", assets["shards"], "--limit", 2, "--output", out, *GEN_ARGS)
    assert "[evaluate] wrote" in log and "data-parallel rank 0: 7/7 prompts" in log and "greedy acc@1" in log
    check_run(ev, out, assets)


@pytest.mark.slow
def test_megatron_checkpoint_at_tp2_gives_the_same_report(ev, assets, torchrun):
    """The tiny model converted to a Megatron checkpoint and evaluated at TP=2 gives the TP=1 (HF
    directory) report and completions exactly (same seeds)."""
    from vigos_megatron.convert.converters import hf_to_megatron

    out1 = assets["root"] / "out_tp1"
    if not (out1 / "report.json").is_file():
        run_tool(torchrun, 1, "--checkpoint", assets["hf"], "--data", assets["standard"], "--data", assets["vilp"],
                 "--data", assets["shards"], "--limit", 2, "--output", out1, *GEN_ARGS)
    ckpt = assets["root"] / "megatron"
    if not (ckpt / "latest_checkpointed_iteration.txt").is_file():
        hf_to_megatron(assets["hf"], ckpt, quiet=True)
    out2 = assets["root"] / "out_tp2"
    run_tool(torchrun, 2, "--checkpoint", ckpt, "--tp", 2, "--data", assets["standard"], "--data", assets["vilp"],
             "--data", assets["shards"], "--limit", 2, "--output", out2, *GEN_ARGS)
    r1, q1 = check_run(ev, out1, assets)
    r2, q2 = check_run(ev, out2, assets)
    assert r2["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    for r in (r1, r2):
        r.pop("layout"), r.pop("checkpoint")
    assert r1 == r2 and q1 == q2


def test_bad_arguments_fail_before_any_process_group(assets, tmp_path):
    env_py = [sys.executable, str(SCRIPT), "--output", str(tmp_path / "o")]
    proc = subprocess.run(env_py + ["--checkpoint", str(tmp_path), "--data", str(assets["standard"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a Megatron distributed checkpoint" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(env_py + ["--checkpoint", str(assets["hf"]), "--data", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "none.jsonl: no such file" in proc.stderr
    proc = subprocess.run(env_py + ["--checkpoint", str(assets["hf"]), "--data", str(assets["standard"]), "--tp", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not divide the world size 1" in proc.stderr


def test_default_pixel_limits_are_in_the_family_unit(ev, tmp_path):
    from vigos_megatron.testing.tiny_qwen import tiny_hf_config as qwen25_config
    from vigos_megatron.testing.tiny_qwen3_vl import tiny_hf_config as qwen3_config

    for name, cfg, unit in (("q25", qwen25_config(), 28), ("q3", qwen3_config(), 32)):
        d = tmp_path / name
        d.mkdir()
        cfg.save_pretrained(d)
        assert ev.pixel_unit(d) == unit
