"""The VGS paper's prompt format (appendix B.4): its template, its completion parser, and the refusal
of ViGOS with it."""

from pathlib import Path

import pytest

from vigos_megatron.config.loader import ConfigError, load_config
from vigos_megatron.config.train import PretrainConfig
from vigos_megatron.data.prompts import load_templates
from vigos_megatron.rollout import parse_completion
from vigos_megatron.rollout.formats import completion_parser, parse_vgs_completion

ROOT = Path(__file__).resolve().parents[1]
VGS_PROMPTS = ROOT / "conf" / "prompts" / "vgs.yaml"
SYSTEM = ("A conversation between user and assistant. The user asks a question, and the assistant solves it. The "
          "assistant first thinks about the reasoning process in the mind and then provides the user with the "
          "answer. The reasoning process should be enclosed within <reason></reason>tags. The final answer MUST BE "
          "put in \\boxed{}.")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from vigos_megatron.testing.tiny_qwen import write_tiny_tokenizer

    return AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_valid_completion_and_its_reasoning_span(tok):
    body = "count: 3 apples {x}</reason> so \\boxed{3 {x}}"
    ids = enc(tok, "Let me look.<reason>" + body + ". done<|im_end|>")
    seg = parse_vgs_completion(ids, tok)
    assert seg.valid and seg.reason == "" and seg.answer == "3 {x}"
    assert seg.description == (0, 0)
    assert tok.decode(ids[slice(*seg.reasoning)]).startswith(body)  # `}.` may merge with the closing brace
    assert seg.reasoning[1] < len(ids)
    # the ViGOS parser reads the same completion as invalid (no </description>)
    assert not parse_completion(ids, tok).valid


@pytest.mark.parametrize(
    "text, reason, answer",
    [
        ("no tags \\boxed{1}", "no <reason>", "1"),
        ("<reason> r \\boxed{1}", "no </reason> after <reason>", "1"),
        ("</reason><reason> r \\boxed{1}", "no </reason> after <reason>", "1"),
        ("<reason> \n </reason> \\boxed{1}", "empty <reason>", "1"),
        ("<reason> r </reason> answer 1", "no \\boxed{ after </reason>", None),
        ("<reason> \\boxed{2} r </reason> answer 1", "no \\boxed{ after </reason>", "2"),
        ("<reason> r </reason> \\boxed{1 {2}", "unbalanced braces in \\boxed{", None),
        ("<reason> r </reason> \\boxed{1} and \\boxed{2", "unbalanced braces in \\boxed{", None),
        ("<description> d </description><think> r </think> \\boxed{1}", "no <reason>", "1"),
    ],
)
def test_invalid_completions(tok, text, reason, answer):
    seg = parse_vgs_completion(enc(tok, text), tok)
    assert not seg.valid and seg.reason == reason and seg.answer == answer
    assert seg.fallback_mask.all() and not seg.reasoning_mask.any()


def test_the_template_selects_the_parser():
    assert load_templates(VGS_PROMPTS).format == "vgs"
    assert load_templates(ROOT / "conf" / "prompts" / "vigos.yaml").format == "vigos"
    assert completion_parser("vgs") is parse_vgs_completion and completion_parser("vigos") is parse_completion
    with pytest.raises(ValueError, match="unknown completion format 'x'"):
        completion_parser("x")


def test_bad_format_is_refused(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(VGS_PROMPTS.read_text().replace("format: vgs", "format: reason"))
    with pytest.raises(ConfigError, match=r"p\.yaml: format: must be one of vigos, vgs, got 'reason'"):
        load_templates(bad)


def test_contexts_render_the_paper_prompt(tmp_path):
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.testing.tiny_qwen import write_tiny_processor

    enc_ = ContextEncoder(write_tiny_processor(tmp_path / "proc"), VGS_PROMPTS, min_pixels=56 * 56,
                          max_pixels=640 * 480, max_prompt_tokens=32768,
                          contexts=("student", "student_text", "opsd", "opsd_text"))
    out = enc_("k", {"problem": "How many?", "answer": "3"}, image_bytes(64, 64))
    tok = enc_.processor.tokenizer
    text = {k: tok.decode(v) for k, v in out["contexts"].items()}
    head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    tail = "<|im_end|>\n<|im_start|>assistant\n"  # no prefill
    vision = "<|vision_start|>" + "<|image_pad|>" * out["num_image_tokens"] + "<|vision_end|>"
    assert text["student"] == head + vision + "How many?" + tail
    assert text["student_text"] == head + "How many?" + tail
    assert text["opsd"] == head + vision + "How many?\n\nReference answer: 3" + tail
    assert text["opsd_text"] == head + "How many?\n\nReference answer: 3" + tail


def _cfg(*overrides):
    return load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=unused", *overrides])


def test_vigos_with_the_vgs_template_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        _cfg(f"data.context.prompts_path={VGS_PROMPTS}", "loss.objective=vigos")
    msg = str(e.value)
    assert "\n" not in msg and "loss.objective" in msg and "data.context.prompts_path" in msg
    assert "'vigos'" in msg and "'vgs' format" in msg


def test_vgs_with_its_template_names_undefined_contexts():
    with pytest.raises(ConfigError, match=r"data\.context\.contexts: \['perception', 'reasoning', 'reference'\] "
                                          r"are not defined by data\.context\.prompts_path"):
        _cfg(f"data.context.prompts_path={VGS_PROMPTS}", "loss.objective=vgs")
    cfg = _cfg(f"data.context.prompts_path={VGS_PROMPTS}", "loss.objective=vgs",
               "data.context.contexts=[student,student_text,opsd,opsd_text]")
    assert cfg.loss.objective == "vgs"
