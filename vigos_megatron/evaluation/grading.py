"""Rule-based answer check: the rollout-accuracy metric in training and the evaluation grader.

:func:`grade` compares a predicted answer (normally the content of the completion's last
``\\boxed{}``, :func:`vigos_megatron.rollout.extract_boxed`) with the reference answer;
:func:`rollout_correct` does both steps for one completion.
"""

from __future__ import annotations

import re
from fractions import Fraction

from vigos_megatron.data.answers import unwrap_boxed
from vigos_megatron.rollout.segments import CompletionSegments, extract_boxed

#: relative tolerance of numeric comparison
REL_TOL = Fraction(1, 10**6)

_DECIMAL = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d{1,3})?"
_THOUSANDS = r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?"
_PLAIN = re.compile(rf"(?:{_THOUSANDS}|{_DECIMAL})")
_FRAC = re.compile(r"([+-]?) ?\\[dt]?frac ?\{([^{}]*)\} ?\{([^{}]*)\}")
_SLASH = re.compile(r"([^/]+)/([^/]+)")
_CHOICE = re.compile(r"\(([a-z])\)|([a-z])\)|([a-z])\.")


def normalize_prediction(text: str) -> str:
    """``text`` as :func:`grade` compares it (before number and choice-letter parsing).

    Surrounding whitespace stripped, a surrounding brace-matched ``\\boxed{...}`` unwrapped,
    a trailing period dropped, internal whitespace runs collapsed to one space, case folded.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str answer, got {type(text).__name__}")
    text = text.strip()
    inner = unwrap_boxed(text)  # exactly one \boxed{...}, optionally followed by "."
    if inner is not None:
        text = inner.strip()
    if text.endswith("."):
        text = text[:-1]
    return " ".join(text.split()).casefold()


def _plain_number(s: str) -> Fraction | None:
    s = s.strip()
    if not _PLAIN.fullmatch(s):
        return None
    return Fraction(s.replace(",", ""))


def _number(s: str) -> Fraction | None:
    """The value of a normalised answer that is a number, a ``\\frac`` or an ``a/b``; else None."""
    value = _plain_number(s)
    if value is not None:
        return value
    m = _FRAC.fullmatch(s)
    if m:
        sign, num, den = m.group(1), _plain_number(m.group(2)), _plain_number(m.group(3))
    else:
        m = _SLASH.fullmatch(s)
        if not m:
            return None
        sign, num, den = "", _plain_number(m.group(1)), _plain_number(m.group(2))
    if num is None or den is None or den == 0:
        return None
    value = num / den
    return -value if sign == "-" else value


def _choice(s: str) -> str:
    """``(c)``, ``c)`` and ``c.`` -> ``c``; anything else unchanged."""
    m = _CHOICE.fullmatch(s)
    return next(g for g in m.groups() if g) if m else s


def grade(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` matches the reference ``answer``.

    Both sides go through the same rules:

    1. whitespace stripped; a surrounding brace-matched ``\\boxed{...}`` stripped; a trailing
       period dropped; internal whitespace runs collapsed to one space; case folded;
    2. numbers are compared as numbers when both sides read as one: decimals (``3``,
       ``-0.5``, ``.5``, ``2.``, ``1e-3``; exponents of at most three digits), thousands
       separators (``1,000`` is 1000; groups of exactly three digits), ``\\frac{a}{b}`` /
       ``\\dfrac{a}{b}`` / ``\\tfrac{a}{b}`` (optionally signed) and ``a/b`` with decimal
       ``a``, ``b`` (``b != 0``); equal when ``|x - y| <= 1e-6 * max(|x|, |y|)``, computed
       exactly on rationals;
    3. otherwise strings are compared exactly, after choice letters ``(C)``, ``C)`` and ``C.``
       are read as ``C``.

    An empty prediction (after rule 1) is wrong, whatever the answer.
    """
    pred, ref = normalize_prediction(prediction), normalize_prediction(answer)
    if not pred:
        return False
    x, y = _number(pred), _number(ref)
    if x is not None and y is not None:
        return abs(x - y) <= REL_TOL * max(abs(x), abs(y))
    return _choice(pred) == _choice(ref)


def rollout_correct(completion: str | CompletionSegments, reference_answer: str) -> bool:
    """Whether one completion answers correctly: its last ``\\boxed{}`` graded by :func:`grade`.

    Args:
        completion: the completion's decoded text, or its
            :func:`~vigos_megatron.rollout.parse_completion` result (its ``answer``).
            Format validity does not matter: only the last box does (the evaluation protocol).
        reference_answer: the reference short answer (e.g. the dataset's normalised answer).

    Returns:
        False when there is no box or the last one is unclosed; else ``grade(answer, reference_answer)``.
    """
    if isinstance(completion, CompletionSegments):
        predicted = completion.answer
    elif isinstance(completion, str):
        predicted = extract_boxed(completion)
    else:
        raise TypeError(f"rollout_correct: completion must be str or CompletionSegments, got {type(completion).__name__}")
    return predicted is not None and grade(predicted, reference_answer)
