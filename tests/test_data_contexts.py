"""Sample -> image tensors + ViGOS prompt contexts (issue 4), with the offline tiny Qwen2.5-VL processor."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from vigos_megatron.config.data import CONTEXT_NAMES, DataConfig
from vigos_megatron.config.loader import ConfigError, load_config
from vigos_megatron.data.contexts import ContextEncoder
from vigos_megatron.data.loader import DropSample, StreamingLoader
from vigos_megatron.data.prompts import load_templates
from vigos_megatron.data.synthetic import image_bytes, write_edge_case_dataset
from vigos_megatron.data.webdataset_writer import convert

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "conf" / "prompts" / "vigos.yaml"

# The student prompt exactly as the ViGOS-7B model card's f-string evaluates it ("How to Use").
QUESTION = "How many red circles are there?"
CARD_PROMPT = f"""Problem: {QUESTION}

You are tasked with analyzing an image to generate a detailed description that can help you answer the question. First analyze the image and produce a self-contained description, detailed enough to lead to the correct answer. Do not include the final answer in the description. Wrap the entire description in <description> </description> tags.

Next, reason step by step based on the image description and the image, and enclose this part within <think> </think> tags.

Finally, provide a single word or phrase answer to the question in \\boxed{{}}.
The output format should be: <description> image description here </description><think> reasoning process here </think> \\boxed{{FINAL ANSWER here}}.
"""


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen import write_tiny_processor

    return write_tiny_processor(tmp_path_factory.mktemp("proc"))


def _encoder(processor_dir, **kw):
    args = dict(min_pixels=56 * 56, max_pixels=640 * 480, max_prompt_tokens=32768)
    args.update(kw)
    return ContextEncoder(processor_dir, PROMPTS, **args)


def _record(problem=QUESTION, answer="3"):
    return {"id": "r1", "problem": problem, "answer": answer, "answer_raw": answer, "source": "t"}


def test_image_tokens_match_the_processor(processor_dir):
    enc = _encoder(processor_dir)
    data = image_bytes(500, 333, seed=1)
    out = enc("k", _record(), data)
    proc = enc.processor
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = out["image_grid_thw"]
    assert grid.shape == (1, 3) and out["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    assert out["num_image_tokens"] == int(grid.prod()) // 4
    w, h = out["image_size"]
    assert (h // 14, w // 14) == (grid[0, 1].item(), grid[0, 2].item()) and w % 28 == 0 and h % 28 == 0
    for name, ids in out["contexts"].items():
        assert (ids == pad).sum().item() == (out["num_image_tokens"] if "text" not in name else 0), name
    # the processor itself, on the same text and sized image, gives identical ids and pixels
    from vigos_megatron.data.images import load_image

    img = load_image(data, min_pixels=enc.min_pixels, max_pixels=enc.max_pixels)
    ref = proc(text=[enc.render("student", QUESTION, "3")], images=[img], do_resize=False, return_tensors="pt")
    assert torch.equal(ref["input_ids"][0], out["contexts"]["student"])
    assert torch.equal(ref["image_grid_thw"], grid) and torch.equal(ref["pixel_values"], out["pixel_values"])


def test_image_sizing_follows_min_max_pixels(processor_dir):
    big = _encoder(processor_dir, max_pixels=200 * 28 * 28)("k", _record(), image_bytes(3000, 2250, seed=2))
    w, h = big["image_size"]
    assert w * h <= 200 * 28 * 28 and abs(w / h - 4 / 3) < 0.1
    assert big["num_image_tokens"] == w * h // (28 * 28)
    small = _encoder(processor_dir, min_pixels=16 * 28 * 28)("k", _record(), image_bytes(30, 20, seed=3))
    w, h = small["image_size"]
    assert w * h >= 16 * 28 * 28


def _text(enc, ids):
    s = enc.processor.tokenizer.decode(ids)
    return re.sub(r"(<\|image_pad\|>)+", "<IMG>", s)


def test_contexts_differ_exactly_where_the_spec_says(processor_dir):
    enc = _encoder(processor_dir)
    # a leftover literal <image> (the converter strips it) stays plain text: no extra image tokens
    raw = enc("k", _record(problem="<image>\n" + QUESTION), image_bytes(64, 64))
    pad = enc.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (raw["contexts"]["student"] == pad).sum().item() == raw["num_image_tokens"]
    out = enc("k", _record(answer="3"), image_bytes(64, 64))
    c = {k: _text(enc, v) for k, v in out["contexts"].items()}
    assert set(c) == set(CONTEXT_NAMES)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    vision = "<|vision_start|><IMG><|vision_end|>"
    tail = "<|im_end|>\n<|im_start|>assistant\n"
    # student: [image] + the model card prompt, verbatim; pre-filled <description>
    assert c["student"] == system + vision + CARD_PROMPT + tail + "<description>"
    # perception: the image only
    assert c["perception"] == system + vision + tail + "<description>"
    # reasoning: problem + answer + reasoning format, pre-filled <think>
    assert c["reasoning"].startswith(system + vision + f"Problem: {QUESTION}\n\nReference answer: 3\n\n")
    assert c["reasoning"].endswith(tail + "<think>") and "<description>" not in c["reasoning"]
    # reference: the student prompt with the reference answer inserted after the problem
    assert c["reference"] == c["student"].replace(f"Problem: {QUESTION}\n\n", f"Problem: {QUESTION}\n\nReference answer: 3\n\n")
    assert c["opsd"] == c["reference"]
    # VGS text-only contexts: the same token ids without the vision span
    for text_name, image_name in (("student_text", "student"), ("opsd_text", "opsd")):
        ids, img_ids = out["contexts"][text_name], out["contexts"][image_name]
        tok = enc.processor.tokenizer
        vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
        i, j = (img_ids == vs).nonzero().item(), (img_ids == ve).nonzero().item()
        assert torch.equal(ids, torch.cat([img_ids[:i], img_ids[j + 1:]])), text_name
    # only the privileged contexts see the answer
    for name in ("student", "perception", "student_text"):
        assert "Reference answer" not in c[name]


def test_empty_answer_and_description_option(processor_dir):
    enc = _encoder(processor_dir, contexts=("reasoning", "reference"))
    out = enc("k", _record(answer=""), image_bytes(64, 64))
    for name in ("reasoning", "reference"):
        t = _text(enc, out["contexts"][name])
        assert "No reference answer was provided." in t and "Reference answer:" not in t
    seen = _encoder(processor_dir, contexts=("reasoning",), reasoning_teacher_sees_description=True)
    t = _text(seen, seen("k", _record(), image_bytes(64, 64))["contexts"]["reasoning"])
    assert t.endswith("<|im_start|>assistant\n<description>") and "Reference answer: 3" in t


def test_long_prompt_is_dropped_not_truncated(processor_dir):
    enc = _encoder(processor_dir, contexts=("student", "perception"))
    n = enc("k", _record(), image_bytes(64, 64))["contexts"]["student"].numel()
    tight = _encoder(processor_dir, contexts=("student", "perception"), max_prompt_tokens=n - 1)
    with pytest.raises(DropSample, match=rf"prompt too long: context student has {n} tokens > max_prompt_tokens {n - 1}"):
        tight("k", _record(), image_bytes(64, 64))
    ok = _encoder(processor_dir, contexts=("student",), max_prompt_tokens=n)("k", _record(), image_bytes(64, 64))
    assert ok["contexts"]["student"].numel() == n


@pytest.mark.slow
def test_parquet_to_contexts_two_ranks_two_workers(tmp_path, processor_dir):
    """Real-schema parquet (edge cases) -> shards -> loader + contexts: every valid row exactly once."""
    info = write_edge_case_dataset(tmp_path / "in", large_side=2400)
    manifest = convert(info["files"], tmp_path / "shards", samples_per_shard=3, progress=None)
    assert {s["id"]: s["reason"].split(" (")[0].split(":")[0] for s in manifest["skipped"]} == info["skipped"]
    enc = _encoder(processor_dir, max_pixels=64 * 28 * 28, contexts=("student", "perception", "reasoning"))
    n = len(info["valid_ids"])
    world, batch = 2, 2
    steps = -(-n // (world * batch))
    seen = []
    for rank in range(world):
        ld = StreamingLoader(tmp_path / "shards", rank=rank, world_size=world, batch_size=batch, seed=3, num_workers=2,
                             shuffle_buffer=4, encode=enc, num_steps=steps)
        batches = list(ld)
        assert len(batches) == steps
        for b in batches:
            assert not b["dropped"], b["dropped"]
            for s in b["samples"]:
                w, h = s["image_size"]
                assert w * h <= 64 * 28 * 28
                assert s["contexts"]["student"].dtype == torch.long
                if s["epoch"] == 0:
                    seen.append(s["id"])
    assert Counter(seen) == Counter(info["valid_ids"])


def test_config_files_and_errors(tmp_path):
    cfg = load_config(DataConfig, ROOT / "conf" / "data" / "vision_sr1_47k.yaml",
                      ["loader.shards_dir=/x", "context.processor_path=/p"])
    assert cfg.context.max_pixels == 12845056 and cfg.context.max_prompt_tokens == 32768
    assert list(cfg.context.contexts) == list(CONTEXT_NAMES) and cfg.context.reasoning_teacher_sees_description is False
    templates = load_templates(ROOT / cfg.context.prompts_path)
    assert set(templates.contexts) == set(CONTEXT_NAMES)
    base = ["loader.shards_dir=/x", "context.processor_path=/p"]
    for override, option in [("loader.batch_size=0", "batch_size"), ("context.max_pixels=10", "max_pixels"),
                             ("context.contexts=[student,bogus]", "contexts"), ("loader.num_workers=-1", "num_workers")]:
        with pytest.raises(ConfigError, match=option):
            load_config(DataConfig, ROOT / "conf" / "data" / "vision_sr1_47k.yaml", base + [override])
    with pytest.raises(ConfigError, match="shards_dir"):
        load_config(DataConfig, None, ["context.processor_path=/p"])
    bad = tmp_path / "p.yaml"
    bad.write_text("reference_block: {present: 'A: {answer}', missing: none}\ncontexts:\n  s: {image: true, prefill: 1}\n")
    with pytest.raises(ConfigError, match=r"contexts.s.prefill"):
        load_templates(bad)
    bad.write_text("reference_block: {present: 'A', missing: none}\ncontexts: {}\n")
    with pytest.raises(ConfigError, match=r"\{answer\}"):
        load_templates(bad)
    bad.write_text("reference_block: {present: 'A {answer}', missing: n}\ncontexts:\n  a: {inherit: b}\n  b: {inherit: a}\n")
    with pytest.raises(ConfigError, match="inherit cycle"):
        load_templates(bad)


def test_pixel_bounds_are_in_the_model_family_unit():
    from vigos_megatron.config.data import ContextConfig

    # 0: qwen-vl-utils' defaults of 4 and 16,384 image tokens, in the family's unit (Qwen2.5-VL 28, Qwen3-VL 32)
    assert ContextConfig().pixel_bounds(28) == (4 * 28 * 28, 16384 * 28 * 28)
    assert ContextConfig().pixel_bounds(32) == (4 * 32 * 32, 16384 * 32 * 32)
    assert ContextConfig(min_pixels=900, max_pixels=1000).pixel_bounds(28) == (900, 1000)
    # 1,000 pixels are more than one 28 x 28 token, less than one 32 x 32 token
    with pytest.raises(ConfigError, match=r"^data.context.max_pixels: 1000 is below one image token .*32 x 32 = 1024"):
        ContextConfig(max_pixels=1000).pixel_bounds(32)
    with pytest.raises(ConfigError, match=r"^data.context.max_pixels: 2048 is below min_pixels 4096 \(2 < 4 image tokens"):
        ContextConfig(max_pixels=2048).pixel_bounds(32)


def test_placeholders_are_substituted_once(processor_dir):
    enc = _encoder(processor_dir, contexts=("reference",))
    t = enc.templates.render_text("reference", problem="Solve {answer} and \\boxed{x} {reference_block}", answer="7")
    assert t.startswith("Problem: Solve {answer} and \\boxed{x} {reference_block}\n\nReference answer: 7\n\n")
