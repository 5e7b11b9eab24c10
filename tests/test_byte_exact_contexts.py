"""Teacher contexts are byte-exact (``../shared/METHOD.md`` section 1), through the tiny trained BPE.

The tiny tokenizer merges the end of the ``<think>`` tag with the reasoning's first letters
(``>The``), as Qwen2.5's vocabulary does. Every teacher row must decode to exactly its context's
text followed by the completion's bytes from the first byte of the span it scores, never a tag
written twice; and the first scored position still predicts the student's token.
"""

from __future__ import annotations

import pytest
import torch

from vigos_megatron.losses.objectives import PERCEPTION, REASONING, REFERENCE

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CONTEXTS = ("student", "perception", "reasoning", "reference", "opsd", "student_text", "opsd_text")
VALID = " two red shapes.</description><think>The shapes are 2, so the answer is 2.</think>\\boxed{2}<|im_end|>"
INVALID = " two red shapes, no tags at all<|im_end|>"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vigos_megatron.data.contexts import ContextEncoder, PrefixCut
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.rollout.segments import TokenBytes
    from vigos_megatron.testing.tiny_qwen import write_tiny_processor

    d = write_tiny_processor(tmp_path_factory.mktemp("proc"))
    out = {}
    for sees in (False, True):
        enc = ContextEncoder(d, ROOT / "conf/prompts/vigos.yaml", min_pixels=3136, max_pixels=3136,
                             max_prompt_tokens=4096, contexts=CONTEXTS, reasoning_teacher_sees_description=sees)
        rec = {"id": "r0", "problem": "How many shapes?", "answer": "2"}
        out[sees] = (enc, enc("k0", rec, image_bytes(56, 56, seed=3)))
    tok = out[False][0].processor.tokenizer
    return {"samples": out, "tok": tok, "tb": TokenBytes(tok), "cut": PrefixCut(tok)}


def _text(tb, ids) -> bytes:
    return b"".join(tb(ids.tolist() if isinstance(ids, torch.Tensor) else ids))


def _completion(env, text):
    from vigos_megatron.rollout import parse_completion

    ids = torch.tensor(env["tok"](text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids, parse_completion(ids, env["tb"])


def test_the_tiny_bpe_straddles_the_think_tag(env):
    ids, seg = _completion(env, VALID)
    assert seg.valid and seg.reasoning_lead == b">", seg
    first = env["tb"]([int(ids[seg.reasoning[0]])])[0]
    assert first.startswith(b">T"), first  # e.g. b">The": the tag's last byte and the reasoning's first


def _check_rows(env, rolled, ids, contexts, span_start_byte: dict[str, int]):
    """Each teacher row = context text (+ cut) + completion bytes from its span's first byte; the
    token after each teacher scoring position is the student's token at the same completion index."""
    tb = env["tb"]
    completion_bytes = _text(tb, ids)
    for row in rolled.teacher_slots:
        if row is None:
            continue
        # the row reads the context, then the completion from the span's first byte (up to the end of
        # the last token it scores): a prefix of `want` that contains the whole context text
        want = _text(tb, contexts[row.context]) + completion_bytes[span_start_byte[row.context]:]
        got = _text(tb, row.ids)
        assert want.startswith(got) and len(got) > len(_text(tb, contexts[row.context])), \
            (row.context, got[-80:], want[-80:])
        assert b"<think>>" not in got and b"<description><description>" not in got
    student = rolled.student_slots
    for s_slot, s_pos, t_slot, t_pos, _ in rolled.scores:
        assert int(student[s_slot].ids[s_pos + 1]) == int(rolled.teacher_slots[t_slot].ids[t_pos + 1])


@pytest.mark.parametrize("sees", [False, True], ids=["reasoning_only", "sees_description"])
def test_vigos_rows_decode_to_the_intended_text(env, sees):
    from vigos_megatron.schedule.assembly import assemble_vigos

    enc, sample = env["samples"][sees]
    ctx = sample["contexts"]
    ids, seg = _completion(env, VALID)
    rolled = assemble_vigos(ctx, ids, seg, reasoning_teacher_sees_description=sees, cut=env["cut"])
    text = _text(env["tb"], ids)
    think_end = text.index(b"<think>") + len(b"<think>")
    # the intended texts: the perception teacher reads the description from its first byte, the
    # reasoning teacher the reasoning from the byte after <think> (or everything, seeing the description)
    _check_rows(env, rolled, ids, ctx, {"perception": 0, "reasoning": 0 if sees else think_end})
    reasoning_row = _text(env["tb"], rolled.teacher_slots[1].ids)
    if not sees:
        assert reasoning_row.endswith(b"\n<think>The shapes are 2, so the answer is 2.</think>\\boxed{2}"), reasoning_row[-90:]
        # the cut prefix is the tokenizer's own encoding of the context text less the tag's last byte
        prefix_len = rolled.teacher_slots[1].ids.numel() - (seg.reasoning[1] - seg.reasoning[0])
        prefix = rolled.teacher_slots[1].ids[:prefix_len]
        assert _text(env["tb"], prefix) == _text(env["tb"], ctx["reasoning"])[:-1]
    segs = [s[4] for s in rolled.scores]
    assert segs.count(PERCEPTION) == seg.description[1] - seg.description[0]
    assert segs.count(REASONING) == seg.reasoning[1] - seg.reasoning[0]


def test_vigos_fails_loudly_without_the_cut(env):
    from vigos_megatron.schedule.assembly import assemble_vigos

    ids, seg = _completion(env, VALID)
    with pytest.raises(ValueError, match="byte-exactly needs the tokenizer's PrefixCut"):
        assemble_vigos(env["samples"][False][1]["contexts"], ids, seg)


def test_reference_opsd_and_vgs_rows_decode_to_the_intended_text(env):
    from vigos_megatron.schedule.assembly import assemble_opsd, assemble_vgs, assemble_vigos

    ctx = env["samples"][False][1]["contexts"]
    ids, seg = _completion(env, INVALID)
    assert not seg.valid
    rolled = assemble_vigos(ctx, ids, seg, cut=env["cut"])
    _check_rows(env, rolled, ids, ctx, {"reference": 0})
    assert [s[4] for s in rolled.scores] == [REFERENCE] * ids.numel()
    ids, _ = _completion(env, VALID)
    _check_rows(env, assemble_opsd(ctx, ids), ids, ctx, {"opsd": 0})
    for image_ctx, text_ctx in (("opsd", "opsd_text"), ("student", "student_text")):
        rolled = assemble_vgs(ctx, ids, teacher_image_context=image_ctx, teacher_text_context=text_ctx)
        _check_rows(env, rolled, ids, ctx, {image_ctx: 0, text_ctx: 0})
        for row in rolled.student_slots:
            assert _text(env["tb"], row.ids) == _text(env["tb"], ctx[row.context]) + _text(env["tb"], ids)


def test_prefix_cut_refuses_a_prefix_without_the_lead_bytes(env):
    ctx = env["samples"][False][1]["contexts"]
    with pytest.raises(ValueError, match="not in the"):
        env["cut"](ctx["perception"], b"k>")  # the perception prefix ends in <description>
    assert env["cut"](ctx["reasoning"], b"") is ctx["reasoning"]
