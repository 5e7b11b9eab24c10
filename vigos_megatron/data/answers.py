"""Text clean-up of Vision-SR1-47K fields (``../shared/METHOD.md`` sections 2 and 6).

* :func:`clean_problem` removes the literal ``<image>`` placeholder some problems carry (the
  image is inserted by the chat template instead) and trims surrounding whitespace.
* :func:`normalize_answer` turns the dataset's short answer into the reference answer shown
  to the privileged teachers: strip code fences, ``<answer>`` tags, a leading ``answer:``,
  unwrap a ``\\boxed{...}`` (brace-matched) and strip quotes, repeated until nothing changes.
  An empty result means "no reference answer" (the prompt then says so).
"""

from __future__ import annotations

import re

_IMAGE_PLACEHOLDER = re.compile(r"<image>")
_FENCE = re.compile(r"^```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
_ANSWER_TAGS = re.compile(r"^<answer>(.*?)</answer>$", re.DOTALL | re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^(?:final\s+)?answer\s*[:：]\s*", re.IGNORECASE)
_QUOTES = ("\"\"", "''", "``", "“”", "‘’", "«»")


def clean_problem(problem: str) -> str:
    """The problem text without ``<image>`` placeholders, whitespace-trimmed."""
    text = _IMAGE_PLACEHOLDER.sub("", problem)
    # a placeholder on its own line leaves an empty line behind: collapse 3+ newlines to 2
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def unwrap_boxed(text: str) -> str | None:
    """Content of ``text`` when it is exactly one ``\\boxed{...}`` (brace-matched), else None."""
    m = re.match(r"^\\boxed\s*\{", text)
    if not m:
        return None
    depth = 1
    i = m.end()
    start = i
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i] if text[i + 1 :].strip() in ("", ".") else None
        i += 1
    return None  # unbalanced


def _strip_quotes(text: str) -> str:
    for pair in _QUOTES:
        if len(text) >= 2 and text[0] == pair[0] and text[-1] == pair[1]:
            return text[1:-1]
    return text


def normalize_answer(answer: str | None) -> str:
    """Normalised short answer; ``""`` when there is none. Idempotent."""
    if answer is None:
        return ""
    text = answer.strip()
    while True:
        before = text
        m = _FENCE.match(text)
        if m:
            text = m.group(1).strip()
        m = _ANSWER_TAGS.match(text)
        if m:
            text = m.group(1).strip()
        text = _ANSWER_PREFIX.sub("", text, count=1).strip()
        boxed = unwrap_boxed(text)
        if boxed is not None:
            text = boxed.strip()
        text = _strip_quotes(text).strip()
        if text == before:
            return text
