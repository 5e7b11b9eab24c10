"""What a run tells its user besides the metrics: ``rollouts.jsonl`` and the empty-term notice.

* a rollout record holds the prompt and completion as text (image pads collapsed), validity, the
  answer and its grade, and for each teacher row the exact text it read and the tokens each term
  scored; the file is cut back to the checkpoint's step on resume;
* the notice for a loss term without tokens comes once, and again when the set of such terms changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vigos_megatron.data.contexts import ContextEncoder, PrefixCut
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.testing.tiny_qwen import write_tiny_processor

    d = write_tiny_processor(tmp_path_factory.mktemp("proc"))
    enc = ContextEncoder(d, ROOT / "conf/prompts/vigos.yaml", min_pixels=3136, max_pixels=3136, max_prompt_tokens=4096,
                         contexts=("student", "perception", "reasoning", "reference"))
    sample = enc("k0", {"id": "r0", "problem": "How many shapes?", "answer": "2"}, image_bytes(56, 56, seed=3))
    tok = enc.processor.tokenizer
    return {"sample": sample, "tok": tok, "cut": PrefixCut(tok)}


def _rollout(env, text: str):
    from vigos_megatron.evaluation import grade
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.schedule.assembly import assemble_vigos
    from vigos_megatron.training.rollouts import Rollout

    ids = torch.tensor(env["tok"](text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    seg = parse_completion(ids, env["tok"])
    correct = seg.answer is not None and grade(seg.answer, "2")
    r = Rollout(sample={**env["sample"], "position": 0}, completion=ids, finish_reason="stop", segments=seg,
                correct=bool(correct))
    return r, assemble_vigos(env["sample"]["contexts"], ids, seg, cut=env["cut"], correct=r.correct)


def test_rollout_record_shows_what_each_teacher_read(env):
    from vigos_megatron import objectives
    from vigos_megatron.rollout.segments import token_bytes_for
    from vigos_megatron.training.rollout_log import rollout_record

    r, a = _rollout(env, " two shapes.</description><think>The count is 2.</think>\\boxed{2}<|im_end|>")
    rec = rollout_record(r, a, token_bytes_for(env["tok"]), objectives.get("vigos").terms)
    assert json.loads(json.dumps(rec)) == rec
    assert rec["valid"] and rec["correct"] and rec["answer"] == "2" and rec["reference_answer"] == "2"
    assert rec["prompt"].endswith("<|im_start|>assistant\n<description>")
    assert "<|image_pad|>x4" in rec["prompt"] and "<|image_pad|><|image_pad|>" not in rec["prompt"]
    assert rec["completion"] == " two shapes.</description><think>The count is 2.</think>\\boxed{2}<|im_end|>"
    perception, reasoning = rec["teachers"]
    assert perception["context"] == "perception" and perception["text"].endswith("<description> two shapes.</")
    assert list(perception["scored"]) == ["perception"] and perception["scored"]["perception"]["text"] == " two shapes.</"
    assert reasoning["text"].endswith("<think>The count is 2.</think>\\boxed{2}")
    assert reasoning["scored"]["reasoning"]["text"] == ">The count is 2.</think>\\boxed{2}"  # the first token carries the tag's >

    r, a = _rollout(env, " no tags here<|im_end|>")
    rec = rollout_record(r, a, token_bytes_for(env["tok"]), objectives.get("vigos").terms)
    assert not rec["valid"] and rec["reason"] == "no </description>" and not rec["correct"]
    (reference,) = rec["teachers"]
    assert reference["context"] == "reference" and reference["scored"]["reference"]["text"] == " no tags here<|im_end|>"


def test_rollout_log_appends_and_drops_lines_after_the_resume_step(env, tmp_path):
    from vigos_megatron.training.rollout_log import ROLLOUTS_FILE, RolloutLog

    rolls = [_rollout(env, " a</description><think> b</think>\\boxed{2}<|im_end|>"), _rollout(env, " bad<|im_end|>")]
    log = RolloutLog(tmp_path, count=1, enabled=True, resume_step=None, tokenizer=env["tok"], term_names=("p", "r", "f"))
    for step in (1, 2, 3):
        log.write(step, [r for r, _ in rolls], [a for _, a in rolls])
    lines = [json.loads(x) for x in (tmp_path / ROLLOUTS_FILE).read_text().splitlines()]
    assert [(x["step"], x["index"]) for x in lines] == [(1, 0), (2, 0), (3, 0)]
    RolloutLog(tmp_path, count=1, enabled=True, resume_step=2, tokenizer=env["tok"], term_names=("p", "r", "f"))
    assert [json.loads(x)["step"] for x in (tmp_path / ROLLOUTS_FILE).read_text().splitlines()] == [1, 2]
    off = RolloutLog(tmp_path / "off", count=4, enabled=False, resume_step=None, tokenizer=env["tok"], term_names=())
    off.write(1, [r for r, _ in rolls], [a for _, a in rolls])
    assert not (tmp_path / "off").exists()


def test_readable_caps_long_texts():
    from vigos_megatron.training.rollout_log import MAX_CHARS, readable

    text = "x" * (3 * MAX_CHARS)
    short = readable(text)
    assert len(short) < MAX_CHARS + 100 and f"...[{3 * MAX_CHARS - MAX_CHARS} characters]..." in short


def test_term_watch_speaks_once_and_on_change():
    from vigos_megatron import objectives
    from vigos_megatron.training.metrics import TermWatch

    w = TermWatch(objectives.get("vigos").expected_terms)
    healthy = {"term/perception": 0.1, "term/reasoning": 0.2, "invalid_rate": 0.0}
    broken = {"term/reference": 0.3, "invalid_rate": 1.0}
    assert w.check(1, healthy) is None  # the fallback term alone being empty is normal
    msg = w.check(2, broken)
    assert msg == ("[vigos] warning: step 2: no tokens for the perception, reasoning term(s) (invalid rate 1.00); "
                   "this step trains only reference")
    assert w.check(3, broken) is None
    assert "no tokens for the reasoning term(s)" in w.check(4, {"term/perception": 0.1, "invalid_rate": 0.5})
    assert w.check(5, healthy) == "[vigos] step 5: every loss term has tokens again"
