"""The tiny demo's format warm start (vigos_megatron.testing.format_prior) and its asset cache.

* what it teaches parses, boxes the sample's answer or another digit, and fits ``max_new_tokens``;
* its rows are the training's byte-exact rows (the reasoning teacher's prefix cut where ``>`` of
  ``<think>`` joins the first reasoning token) and the HF model gets the Megatron student's mrope
  positions, not 1-D ones;
* the cache: the demo's entry holds a passed self-check, a second request builds nothing, other
  settings get another entry, and a warm start that cannot reach the valid rate fails naming it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from vigos_megatron.testing.tiny_qwen import write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def _cfg(*overrides):
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig

    return load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=unused", *overrides])


def test_completions_parse(tok):
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.testing.format_prior import drawn_answer, format_completion

    rng = random.Random(0)
    answers = set()
    for _ in range(40):
        text = format_completion(drawn_answer("4", rng, 0.5))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seg = parse_completion(ids, tok)
        assert seg.valid and seg.answer is not None, text
        answers.add(seg.answer)
        assert len(ids) <= _cfg().sampling.max_new_tokens
    assert "4" in answers and len(answers) > 1  # right and wrong answers both occur


def _decode(tb, ids) -> bytes:
    return b"".join(tb([int(i) for i in ids]))


def test_rows_are_the_training_rows_and_positions_are_mrope(tiny_demo_assets):
    """The four rows of a sample decode to context + the intended completion bytes; the HF batch
    carries the stage's mrope positions (3-D for image tokens): the old warm start taught 1-D
    positions, which the Megatron student never sees."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.data.contexts import ContextEncoder, PrefixCut
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.rollout.segments import token_bytes_for
    from vigos_megatron.testing.format_prior import CONTEXTS, hf_batch, sample_rows

    hf = tiny_demo_assets["hf"]
    tok = AutoTokenizer.from_pretrained(hf)
    tb = token_bytes_for(tok)
    enc = ContextEncoder(hf, ROOT / "conf/prompts/vigos.yaml", min_pixels=3136, max_pixels=3136,
                         max_prompt_tokens=4096, contexts=CONTEXTS)
    sample = enc("k", {"id": "s", "problem": "How many shapes?", "answer": "3"}, image_bytes(56, 56, seed=1))
    ctx = sample["contexts"]
    rows = sample_rows(sample, tok, PrefixCut(tok), random.Random(0), p_correct=1.0)
    completion = b" shapes</description><think> count</think>\\boxed{3}<|im_end|>"
    think_end = completion.index(b"<think>") + len(b"<think>")
    want = [_decode(tb, ctx["student"]) + completion,
            _decode(tb, ctx["perception"]) + completion[: completion.index(b"</description>")],
            _decode(tb, ctx["reasoning"]) + completion[think_end: completion.index(b"<|im_end|>")],
            _decode(tb, ctx["reference"]) + completion]
    for row, w in zip(rows, want):
        got = _decode(tb, row.ids)
        # a row ends at a token boundary: a scored span's last token may carry the next tag's first bytes
        assert w.startswith(got[: len(w)]) and got.startswith(w[: len(w) - 2]), (got[-60:], w[-60:])
        assert b"<think>>" not in got
        assert 0 < row.targets < row.ids.numel()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    batch = hf_batch(rows, model, int(tok.pad_token_id))
    pos = batch["position_ids"]
    assert pos.shape == (3, len(rows), batch["input_ids"].shape[1])
    for i, row in enumerate(rows):
        n = row.ids.numel()
        # HF's own get_rope_index on the unpadded row (modality types from the ids, as HF's processor gives them)
        mm = (row.ids[None] == model.config.image_token_id).to(torch.int)
        ref, _ = model.model.get_rope_index(row.ids[None], mm, sample["image_grid_thw"], None, second_per_grid_ts=None,
                                            attention_mask=None)
        assert torch.equal(pos[:, i, :n], ref[:, 0])
        assert not torch.equal(pos[0, i, :n], torch.arange(n))  # the image gives 3-D positions, not 1-D
    labels = batch["labels"]
    assert [int((labels[i] != -100).sum()) for i in range(len(rows))] == [r.targets for r in rows]


def test_the_demo_assets_passed_their_self_check(tiny_demo_assets, capfd):
    import json

    from vigos_megatron.training.tiny_demo import asset_key, asset_spec, ensure_tiny_assets

    cfg = _cfg()
    report = json.loads(tiny_demo_assets["report"].read_text())
    assert report["valid_rate"] >= cfg.tiny.min_valid_rate
    assert report["format_prior_steps"] == report["checks"][-1]["steps"] <= cfg.tiny.format_prior_max_steps
    t0 = time.perf_counter()
    assert ensure_tiny_assets(cfg, log=print) == tiny_demo_assets  # cached: nothing rebuilt
    assert time.perf_counter() - t0 < 5 and "building" not in capfd.readouterr().out
    assert asset_key(asset_spec(_cfg("tiny.seed=1"))) != asset_key(asset_spec(cfg))
    assert asset_key(asset_spec(_cfg("sampling.temperature=1.0"))) != asset_key(asset_spec(cfg))
    same = ("parallel.tp=1", "train.steps=9", "sampling.max_new_tokens=6")  # the check samples 40 tokens anyway
    assert asset_key(asset_spec(_cfg(*same))) == asset_key(asset_spec(cfg))


@pytest.mark.slow
def test_a_warm_start_short_of_the_valid_rate_fails_naming_it(tmp_path, monkeypatch, capfd):
    from vigos_megatron.training.tiny_demo import ensure_tiny_assets

    monkeypatch.setenv("VIGOS_CACHE_DIR", str(tmp_path))
    cfg = _cfg("tiny.samples=4", "tiny.check_prompts=4", "tiny.format_prior_steps=1", "tiny.format_prior_max_steps=2")
    with pytest.raises(RuntimeError, match="failed"):
        ensure_tiny_assets(cfg, log=print)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "self-check after 1 steps: 0/4" in text and "self-check after 2 steps" in text, text[-3000:]
    assert "reached a valid rate of 0% < tiny.min_valid_rate 70% after 2 steps" in text, text[-3000:]
    assert not any((tmp_path / "tiny").glob("*/report.json"))  # nothing half-made is left as an entry


def test_tiny_settings_are_validated():
    from vigos_megatron.config.loader import ConfigError

    for override, message in {"tiny.format_prior_steps=-1": "format_prior_steps: must be >= 0",
                              "tiny.format_prior_max_steps=10": "format_prior_max_steps: 10 is below",
                              "tiny.check_prompts=64": "check_prompts: must be in [1, samples=32]",
                              "tiny.min_valid_rate=1.5": "min_valid_rate: must be in [0, 1]"}.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            _cfg(override)
