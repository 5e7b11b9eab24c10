"""The tiny demo's format warm start (vigos_megatron.testing.format_prior): what it teaches parses.

* the student's / reference's completion is a valid ViGOS completion for the parser, boxing the
  sample's answer or another digit; the reasoning context always boxes the reference answer; the
  perception context's ends at ``</description>``;
* ``tiny.format_prior_steps`` is validated with the config.

The warm start itself runs in the training tests (tests/test_training.py primes once per module and
checks that the rollouts parse and the perception and reasoning terms fall).
"""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from vigos_megatron.testing.tiny_qwen import write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def test_completions_parse_in_every_context(tok):
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.testing.format_prior import format_completion

    rng = random.Random(0)
    answers = set()
    for _ in range(40):
        text = format_completion("student", "4", rng, p_correct=0.5)
        seg = parse_completion(tok(text, add_special_tokens=False)["input_ids"], tok)
        assert seg.valid and seg.answer is not None, text
        answers.add(seg.answer)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 40  # conf/tiny_cpu.yaml max_new_tokens
    assert "4" in answers and len(answers) > 1  # right and wrong answers both occur
    assert format_completion("reasoning", "4", rng, p_correct=0.0).endswith("</think>\\boxed{4}<|im_end|>")
    assert format_completion("perception", "4", rng, p_correct=0.5).endswith("</description>")


def test_format_prior_steps_is_validated(tmp_path):
    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.train import PretrainConfig

    with pytest.raises(ConfigError, match="format_prior_steps: must be >= 0"):
        load_config(PretrainConfig, "conf/tiny_cpu.yaml", [f"run_dir={tmp_path}", "tiny.format_prior_steps=-1"])
