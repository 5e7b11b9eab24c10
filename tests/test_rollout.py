"""Completion parsing (exact token spans) and micro-batch assembly for the losses."""

import pytest
import torch

from vigos_megatron.losses.objectives import PERCEPTION, REASONING, REFERENCE
from vigos_megatron.schedule.assembly import assemble_opsd, assemble_vgs, assemble_vigos, pack_distill, pack_vgs
from vigos_megatron.rollout import extract_boxed, parse_completion
from vigos_megatron.rollout.segments import TokenBytes, last_boxed, token_bytes_for


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from vigos_megatron.testing.tiny_qwen import write_tiny_tokenizer

    return AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tb(tok):
    return TokenBytes(tok)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "text",
    ["plain ascii 123", " é中文 mixed — dash ✓", "<|im_end|>tail", "\\boxed{x} {}}{ \n\t"],
)
def test_token_bytes_are_exact(tok, tb, text):
    ids = enc(tok, text)
    assert b"".join(tb(ids)).decode("utf-8") == tok.decode(ids, skip_special_tokens=False)


def test_valid_completion_spans(tok, tb):
    desc, rea = " a red ball 中", "count 3 apples</think> \\boxed{3 {x}}"
    text = desc + "</description>\n<think>" + rea + " trailing text<|im_end|>"
    ids = enc(tok, text)
    seg = parse_completion(ids, tb)
    assert seg.valid and seg.reason == ""
    assert tok.decode(ids[slice(*seg.description)]) == desc
    assert tok.decode(ids[slice(*seg.reasoning)]) == rea
    assert seg.answer == "3 {x}"
    # the tags between the spans, the tail and EOS are unsupervised
    assert seg.reasoning[1] < len(ids)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("no tags at all \\boxed{1}", "no </description>"),
        ("d <think> r </description> x </think> \\boxed{1}", "no <think> after </description>"),
        ("d</description><think> r \\boxed{1}", "no </think> after <think>"),
        ("d</description><think> r </think> answer 1", "no \\boxed{ after </think>"),
        ("d</description><think> r </think> \\boxed{1 {2}", "unbalanced braces in \\boxed{"),
        ("</description><think> r </think> \\boxed{1}", "empty description"),
        ("<|endoftext|></description><think> r </think> \\boxed{1}", "empty description"),
    ],
)
def test_invalid_completions(tok, tb, text, reason):
    seg = parse_completion(enc(tok, text), tb)
    assert not seg.valid and seg.reason == reason


def test_last_boxed_alias_uses_the_last_box_rule():
    assert last_boxed(b"\\boxed{1} then \\boxed{a{b}c}") == "a{b}c"
    assert last_boxed(b"\\boxed{1} then \\boxed{open") is None  # no fallback to an earlier box
    assert last_boxed(b"none") is None


def pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


def decode_mask(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask.tolist()) if m], skip_special_tokens=False)


def check_masks(seg, n):
    """Masks: bool [n], consistent with the spans and validity."""
    d, r, f = seg.description_mask, seg.reasoning_mask, seg.fallback_mask
    for m in (d, r, f):
        assert m.dtype == torch.bool and m.shape == (n,) and m.device == seg.device
    assert seg.num_tokens == n
    if seg.valid:
        assert not bool(f.any()) and not bool((d & r).any())
        assert d.nonzero().flatten().tolist() == list(range(*seg.description))
        assert r.nonzero().flatten().tolist() == list(range(*seg.reasoning))
        assert seg.answer is not None
    else:
        assert bool(f.all()) and not bool(d.any()) and not bool(r.any())
        assert seg.description == (0, 0) and seg.reasoning == (0, 0)


def test_parse_through_a_hugging_face_tokenizer(tok, tb):
    """The tokenizer itself, a TokenBytes, a list or a tensor: one result; the byte table is cached."""
    text = " a cat</description>\n<think> two ears</think> \\boxed{cat}<|im_end|>"
    ids = enc(tok, text)
    seg = parse_completion(ids, tok)
    assert seg == parse_completion(ids, tb) == parse_completion(torch.tensor(ids), tok)
    assert seg.valid and seg.answer == "cat"
    check_masks(seg, len(ids))
    assert token_bytes_for(tok) is token_bytes_for(tok)
    assert token_bytes_for(tb) is tb


def test_token_bytes_cache_follows_the_tokenizer(tok):
    import copy
    import gc

    from vigos_megatron.rollout import segments

    other = copy.deepcopy(tok)
    key = id(other)
    table = token_bytes_for(other)
    assert segments._TABLES[key][1] is table and table is not token_bytes_for(tok)
    del other
    gc.collect()
    assert key not in segments._TABLES  # the entry leaves with its tokenizer


def test_tags_merged_with_punctuation(tok):
    """METHOD.md section 1: ``.</`` is the description's last token, ``>The`` the reasoning's first, ``}.`` its last."""
    text = " a red square.</description>\n<think>The count</think> \\boxed{3}.<|im_end|>"
    ids = enc(tok, text)
    p = pieces(tok, ids)
    assert ".</" in p and ">The" in p and "}." in p  # the tokenizer does merge them
    seg = parse_completion(ids, tok)
    assert seg.valid
    check_masks(seg, len(ids))
    assert p[seg.description[1] - 1] == ".</"
    assert decode_mask(tok, ids, seg.description_mask) == " a red square.</"
    assert p[seg.reasoning[0]] == ">The" and p[seg.reasoning[1] - 1] == "}."
    assert decode_mask(tok, ids, seg.reasoning_mask) == ">The count</think> \\boxed{3}."
    # tokens holding only tag bytes, and EOS, are unsupervised
    unsup = ~(seg.description_mask | seg.reasoning_mask)
    assert [q for q, u in zip(p, unsup.tolist()) if u] == ["description", ">", "\n", "<think", "<|im_end|>"]


def test_tags_split_across_tokens(tok):
    """Tags spread over several tokens, and a multi-byte character split into byte tokens."""
    text = " 中。</description>\n<think>\n2 + 2 = 4</think>\n\\boxed{4}"
    ids = enc(tok, text)
    p = pieces(tok, ids)
    assert not any(t in q for q in p for t in ("</description>", "<think>", "</think>", "\\boxed{"))
    assert p.count("\ufffd") == 6  # 中 and 。 are 3 byte tokens each
    seg = parse_completion(ids, tok)
    assert seg.valid and seg.answer == "4"
    check_masks(seg, len(ids))
    assert decode_mask(tok, ids, seg.description_mask) == " 中。"
    assert decode_mask(tok, ids, seg.reasoning_mask) == "\n2 + 2 = 4</think>\n\\boxed{4}"
    assert seg.reasoning[1] == len(ids)  # no EOS: the box's brace is the last token


def test_text_after_the_box_and_several_boxes(tok):
    """The answer box is the last one; the reasoning span ends at ITS closing brace; the tail is unsupervised."""
    text = " d</description><think> r \\boxed{0}</think> \\boxed{1} or \\boxed{\\frac{1}{2}} so it is done<|im_end|>"
    ids = enc(tok, text)
    seg = parse_completion(ids, tok)
    assert seg.valid and seg.answer == "\\frac{1}{2}"
    check_masks(seg, len(ids))
    assert decode_mask(tok, ids, seg.reasoning_mask) == " r \\boxed{0}</think> \\boxed{1} or \\boxed{\\frac{1}{2}}"
    tail = tok.decode(ids[seg.reasoning[1] :], skip_special_tokens=False)
    assert tail == " so it is done<|im_end|>"


@pytest.mark.parametrize(
    "text, reason, answer",
    [
        # the last box is unclosed: invalid, and no answer even though an earlier box is closed
        ("d</description><think> r </think> \\boxed{1} \\boxed{2", "unbalanced braces in \\boxed{", None),
        ("d</description><think> r </think> \\boxed{\\frac{1}{2}", "unbalanced braces in \\boxed{", None),
        # a box only inside the thinking: invalid format, but the last box is still the answer
        ("d</description><think> \\boxed{7} </think> so seven", "no \\boxed{ after </think>", "7"),
        ("d</description> missing think \\boxed{7}<|im_end|>", "no <think> after </description>", "7"),
        ("<|im_end|>", "no </description>", None),
        ("", "no </description>", None),
    ],
)
def test_invalid_rows_fall_back_on_every_token(tok, text, reason, answer):
    ids = enc(tok, text)
    seg = parse_completion(ids, tok)
    assert not seg.valid and seg.reason == reason and seg.answer == answer
    check_masks(seg, len(ids))


def test_empty_thinking_is_still_valid(tok):
    """The reasoning span holds ``</think>`` and the box, so it is never empty; an empty box answers ""."""
    ids = enc(tok, "d</description><think></think>\\boxed{}")
    seg = parse_completion(ids, tok)
    assert seg.valid and seg.answer == ""
    check_masks(seg, len(ids))
    assert decode_mask(tok, ids, seg.reasoning_mask) == "</think>\\boxed{}"


def test_truncation_at_the_length_limit(tok):
    """Every prefix (a completion cut at the token limit, no EOS) is valid iff it holds the box's
    closing brace, and then it has the full completion's spans."""
    text = " a red square.</description>\n<think>The count is \\boxed{x}</think> \\boxed{\\frac{3}{4}}. Done.<|im_end|>"
    ids = enc(tok, text)
    full = parse_completion(ids, tok)
    assert full.valid
    for n in range(len(ids) + 1):
        seg = parse_completion(torch.tensor(ids[:n], dtype=torch.long), tok)
        check_masks(seg, n)
        assert seg.valid == (n >= full.reasoning[1]), (n, seg.reason)
        if seg.valid:
            assert (seg.description, seg.reasoning, seg.answer) == (full.description, full.reasoning, "\\frac{3}{4}")
        assert seg.answer == extract_boxed(tok.decode(ids[:n], skip_special_tokens=False))
    # cut inside the final box: no answer (the closed box in the thinking is not used)
    cut = [n for n in range(full.reasoning[1]) if "</think> \\boxed{" in tok.decode(ids[:n])]
    assert len(cut) >= 5 and all(parse_completion(ids[:n], tok).answer is None for n in cut)


def test_parse_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="1-D"):
        parse_completion(torch.zeros(2, 3, dtype=torch.long), tok)
    with pytest.raises(ValueError, match="integer ids"):
        parse_completion(torch.zeros(3), tok)
    for bad in (len(tok), -1):
        with pytest.raises(ValueError, match=f"token id {bad} is not in the tokenizer's vocabulary"):
            parse_completion([1, bad], tok)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{42}", "42"),
        ("so \\boxed{ a{b{c}}d } end", "a{b{c}}d"),  # nested braces, stripped
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2} then \\boxed{3}.", "3"),  # several: the last
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{}", ""),
        ("no box here", None),
        ("boxed{1} \\box{2}", None),
        ("\\boxed{1} then \\boxed{2", None),  # last unclosed: no fallback to the earlier box
        ("\\boxed{1} then \\boxed{{2}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def _contexts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(1000, 2000, (n,), generator=g) for k, n in lengths.items()}


CTX = {"student": 9, "perception": 4, "reasoning": 12, "reference": 14, "opsd": 13, "student_text": 6, "opsd_text": 7}


def _row_pos(i, mb):
    from vigos_megatron.testing.kl_reference import row_and_column

    row, col = row_and_column(mb, [i])
    return int(row[0]), int(col[0])


def _check_alignment(mb, completions):
    """The token after each scoring position is the scored completion token, in both rows; every
    selected logits position is read by some token."""
    t = mb.tokens
    for s, te in zip(t.student_index.tolist(), t.teacher_index.tolist()):
        (rs, ps), (rt, pt) = _row_pos(s, mb), _row_pos(te, mb)
        assert int(mb.input_ids[rs, ps + 1]) == int(mb.input_ids[rt, pt + 1])
        assert rs < mb.num_student_rows <= rt
        assert ps + 1 < int(mb.lengths[rs]) and pt + 1 < int(mb.lengths[rt])  # scored tokens are real
    n = sum(p.numel() for p in mb.positions)
    assert sorted(set(t.student_index.tolist()) | set(t.teacher_index.tolist())) == list(range(n))


@pytest.mark.parametrize("sees_description", [False, True])
def test_vigos_assembly_alignment(tok, tb, sees_description):
    texts = [
        " a cat</description>\n<think> two ears</think> \\boxed{cat}<|im_end|>",  # valid
        " broken output without tags<|im_end|>",  # invalid
        " 中 x</description><think>y</think>\\boxed{1}",  # valid, no EOS
    ]
    comps = [torch.tensor(enc(tok, t)) for t in texts]
    rolls = []
    for i, c in enumerate(comps):
        seg = parse_completion(c.tolist(), tb)
        rolls.append(assemble_vigos(_contexts(CTX, i), c, seg, reasoning_teacher_sees_description=sees_description, correct=i == 0))
    mb = pack_distill(rolls, pad_id=0, multiple=16)
    assert mb.input_ids.shape == (3 * 3, mb.seq_length) and mb.seq_length % 16 == 0
    _check_alignment(mb, comps)
    seg = mb.tokens.segment
    s0 = parse_completion(comps[0].tolist(), tb)
    s2 = parse_completion(comps[2].tolist(), tb)
    n_desc = (s0.description[1] - s0.description[0]) + (s2.description[1] - s2.description[0])
    n_rea = (s0.reasoning[1] - s0.reasoning[0]) + (s2.reasoning[1] - s2.reasoning[0])
    assert int((seg == PERCEPTION).sum()) == n_desc
    assert int((seg == REASONING).sum()) == n_rea
    assert int((seg == REFERENCE).sum()) == comps[1].numel()  # every token of the invalid row, EOS included
    # the invalid rollout's second teacher slot is an unused (empty) row
    assert int(mb.lengths[2 * 3 + 1]) == 0
    # released behaviour: the reasoning teacher holds only reasoning tokens after its prompt
    rea_len = int(mb.lengths[2 * 3 + 0])
    expect = CTX["reasoning"] + (s0.reasoning[1] if sees_description else s0.reasoning[1] - s0.reasoning[0])
    assert rea_len == expect


def test_opsd_and_vgs_assembly(tok, tb):
    comps = [torch.tensor(enc(tok, t)) for t in (" a</description><think>b</think>\\boxed{c}", " zz")]
    mb = pack_distill([assemble_opsd(_contexts(CTX, i), c) for i, c in enumerate(comps)], pad_id=0, multiple=8)
    _check_alignment(mb, comps)
    assert int((mb.tokens.segment == 0).sum()) == sum(c.numel() for c in comps)

    mb = pack_vgs([assemble_vgs(_contexts(CTX, i), c) for i, c in enumerate(comps)], pad_id=0, multiple=8)
    R = mb.input_ids.shape[0]
    assert mb.num_student_rows == 4 and R == 8
    t = mb.tokens
    for a, b, c, d, traj in zip(t.student_image_index, t.student_text_index, t.teacher_image_index,
                                t.teacher_text_index, t.trajectory):
        toks = {int(mb.input_ids[r, p + 1]) for r, p in (_row_pos(int(i), mb) for i in (a, b, c, d))}
        assert len(toks) == 1  # all four rows score the same completion token
        assert _row_pos(int(a), mb)[0] % 2 == int(traj)  # the token's rollout (reduction: sequence)
    assert not bool(mb.row_has_image[2:4].any()) and bool(mb.row_has_image[:2].all())


def test_pack_rejects_mixed_objectives(tok, tb):
    c = torch.tensor(enc(tok, " zz"))
    with pytest.raises(ValueError, match="same objective"):
        pack_distill([assemble_opsd(_contexts(CTX), c), assemble_vgs(_contexts(CTX), c)], pad_id=0)


def test_each_slot_at_its_own_length(tok, tb):
    comps = [torch.tensor(enc(tok, t)) for t in (" a</description><think>b</think>\\boxed{c}", " zz")]
    rolls = [assemble_opsd(_contexts(CTX, i), c) for i, c in enumerate(comps)]
    mb = pack_distill(rolls, pad_id=0, multiple=8)
    longest = [max(CTX["student"] + c.numel() for c in comps), max(CTX["opsd"] + c.numel() for c in comps)]
    assert mb.slot_lengths == [-(-n // 8) * 8 for n in longest] and mb.seq_length == max(mb.slot_lengths)
    for c, pos in enumerate(mb.positions):  # flat b * S_c + column, sorted, inside the slot
        assert bool((pos[1:] > pos[:-1]).all()) and int(pos.max()) < mb.rollouts * mb.slot_lengths[c]
    _check_alignment(mb, comps)
