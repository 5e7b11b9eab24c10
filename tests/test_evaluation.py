"""Evaluation helpers: rule-based grading, rollout correctness, Pass@k / Avg@k."""

import math
import random
from fractions import Fraction

import pytest

from vigos_megatron.evaluation import grade, normalize_prediction, pass_and_avg_at_k, rollout_correct
from vigos_megatron.evaluation.metrics import pass_at_k


@pytest.mark.parametrize(
    "prediction, answer",
    [
        # whitespace, trailing period, case
        ("  42 \n", "42"),
        ("Paris.", "paris"),
        ("RED  square", "red square"),
        # a surrounding \boxed{} (either side), brace-matched
        ("\\boxed{ 7 }", "7"),
        ("B", "\\boxed{b}"),
        ("\\boxed{\\frac{1}{2}}.", "0.5"),
        # numbers as numbers
        ("3.0", "3"),
        ("+3", "3."),
        (".5", "0.50"),
        ("1e-3", "0.001"),
        ("1,000", "1000"),
        ("-12,345.5", "-12345.5"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{3}{4}", "3/4"),
        ("\\tfrac{6}{8}", "\\frac{3}{4}"),
        ("-\\frac{1}{3}", "-1/3"),
        ("\\frac {2} {4}", "1/2"),
        ("1/3", "0.3333333"),  # within 1e-6 relative
        ("1000000", "1000000.5"),  # 5e-7 relative
        ("0", "-0"),
        # choice letters
        ("(C)", "C"),
        ("C)", "c"),
        ("C.", "C"),
        ("(c).", "C"),
        ("C", "(C)"),
    ],
)
def test_grade_accepts(prediction, answer):
    assert grade(prediction, answer)


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("", "0"),  # empty prediction
        ("   ", ""),  # empty is wrong even against an empty answer
        ("\\boxed{}", "x"),
        (".", ""),
        ("43", "42"),
        ("1/3", "0.333"),  # 1e-3 relative: too far
        ("1000000", "1000002"),  # 2e-6 relative
        ("1,00", "100"),  # not a thousands grouping: compared as text
        ("1/0", "1"),  # no division by zero: text
        ("\\frac{1}{0}", "\\frac{2}{0}"),
        ("0", "1e-9"),
        ("(C)", "D"),
        ("(CD)", "CD"),  # not a choice letter: text
        ("C", "C) the triangle"),
        ("\\boxed{1}+\\boxed{2}", "1}+\\boxed{2"),  # not ONE surrounding box
        ("red", "red square"),
    ],
)
def test_grade_rejects(prediction, answer):
    assert not grade(prediction, answer)


def test_normalize_prediction():
    assert normalize_prediction("  \\boxed{ The  Answer } ") == "the answer"
    assert normalize_prediction("ẞ.") == "ss"  # full case folding
    with pytest.raises(TypeError, match="str"):
        normalize_prediction(None)


def test_rollout_correct(tok):
    from vigos_megatron.rollout import parse_completion

    text = " a cat</description><think> it meows</think> \\boxed{1,000}. Done<|im_end|>"
    assert rollout_correct(text, "1000")
    assert not rollout_correct(text, "999")
    seg = parse_completion(tok(text, add_special_tokens=False)["input_ids"], tok)
    assert seg.valid and rollout_correct(seg, "1000")
    # the evaluation protocol: only the last box counts, unclosed means no answer, format is not graded
    assert not rollout_correct("\\boxed{1000} wait \\boxed{100", "1000")
    assert rollout_correct("no tags, just \\boxed{(B)}", "B")
    assert not rollout_correct("the answer is 1000", "1000")
    with pytest.raises(TypeError, match="completion"):
        rollout_correct(["\\boxed{1}"], "1")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from vigos_megatron.testing.tiny_qwen import write_tiny_tokenizer

    return AutoTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


T, F = True, False
#: n = 4, 4, 4, 5 samples; c = 1, 0, 3, 2 correct
FIXTURE = [[F, T, F, F], [F, F, F, F], [T, T, F, T], [F, T, F, F, T]]


def test_pass_and_avg_at_k_by_hand():
    # k=2: 1 - C(n-c,2)/C(n,2) = 1 - 3/6, 0, 1 (n-c < k), 1 - 3/10
    p, a = pass_and_avg_at_k(FIXTURE, 2)
    assert p == pytest.approx((0.5 + 0.0 + 1.0 + 0.7) / 4, abs=1e-12)  # 0.55
    assert a == pytest.approx((1 / 4 + 0 + 3 / 4 + 2 / 5) / 4, abs=1e-12)  # 0.35
    # k=1: Pass@1 is the mean accuracy
    p, a = pass_and_avg_at_k(FIXTURE, 1)
    assert p == pytest.approx(0.35, abs=1e-12) and a == pytest.approx(0.35, abs=1e-12)
    # k=4: 1 - C(3,4)/C(4,4) = 1, 0, 1, 1 - C(3,4)/C(5,4) = 1
    assert pass_and_avg_at_k(FIXTURE, 4) == pytest.approx((0.75, 0.35), abs=1e-12)
    # the protocol: n = k = 5 per question, Pass@5 = any correct, Avg@5 = fraction correct
    p, a = pass_and_avg_at_k([[T, F, F, F, F], [F] * 5, [T] * 5], 5)
    assert p == pytest.approx(2 / 3, abs=1e-12) and a == pytest.approx(6 / 15, abs=1e-12)
    assert pass_and_avg_at_k([[0, 1], [1, 1]], 2) == pytest.approx((1.0, 0.75))


def test_pass_at_k_matches_binomials():
    rng = random.Random(0)
    cases = [(rng.randint(1, 60), None, None) for _ in range(200)] + [(1000, 3, 100), (5000, 10, 2500)]
    for n, c, k in cases:
        c = rng.randint(0, n) if c is None else c
        k = rng.randint(1, n) if k is None else k
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
        assert 0.0 <= pass_at_k(n, c, k) <= 1.0


@pytest.mark.parametrize(
    "grades, k, match",
    [
        ([], 1, "empty"),
        ([[T, F], [T]], 2, "question 1 has 1 samples, fewer than k=2"),
        ([[T]], 0, "k must be an int >= 1"),
        ([[T]], 1.0, "k must be an int >= 1"),
        ([[T]], True, "k must be an int >= 1"),
        ([[T, None]], 1, "non-boolean"),
        ([[T, 2]], 1, "non-boolean"),
    ],
)
def test_pass_and_avg_at_k_errors(grades, k, match):
    with pytest.raises(ValueError, match=match):
        pass_and_avg_at_k(grades, k)
