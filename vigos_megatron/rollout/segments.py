"""Parse a student completion into ViGOS segments (``../shared/METHOD.md`` section 1).

The completion is the generated token ids after the ``<description>`` prefill. Tag
positions are found in the exact bytes of the completion, obtained token by token from
the byte-level BPE vocabulary (never by re-encoding a prefix, which would shift BPE
merges), and mapped back to token indices through cumulative byte offsets.

A completion is valid when, in order, it contains ``</description>``, then ``<think>``,
then ``</think>``, then ``\\boxed{`` with balanced braces, and both the description span
``[0, start of </description>)`` and the reasoning+answer span
``[end of <think>, the box's closing brace]`` contain at least one real (non-special) token.
Token spans are half-open ``[start, end)`` in completion positions. A token straddling a
span boundary belongs to the span only if it carries a byte of the span's text and, for the
description, none of the closing tag.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

DESCRIPTION_CLOSE = b"</description>"
THINK_OPEN = b"<think>"
THINK_CLOSE = b"</think>"
BOX_OPEN = b"\\boxed{"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenBytes:
    """Exact byte string of each token id of a byte-level BPE tokenizer (Qwen2/2.5).

    Added tokens (``<|im_end|>``, ...) map to their content; ``special_ids`` are the ones
    that are not "real" text tokens (EOS, pad, vision markers).
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        if decoder != "ByteLevel":
            raise ValueError(
                f"TokenBytes needs a byte-level BPE tokenizer (Qwen2/2.5); {type(tokenizer).__name__} has decoder {decoder}"
            )
        self._tokenizer = tokenizer
        self._added = {i: t.content.encode("utf-8") for i, t in tokenizer.added_tokens_decoder.items()}
        self.special_ids = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._cache: dict[int, bytes] = {}

    def __call__(self, ids: Sequence[int]) -> list[bytes]:
        out = []
        dec = _byte_decoder()
        for i in ids:
            i = int(i)
            b = self._cache.get(i)
            if b is None:
                if i in self._added:
                    b = self._added[i]
                else:
                    piece = self._tokenizer.convert_ids_to_tokens(i)
                    if piece is None:
                        raise ValueError(f"token id {i} is not in the tokenizer's vocabulary")
                    b = bytes(dec[c] for c in piece)
                self._cache[i] = b
            out.append(b)
        return out


@dataclass(frozen=True)
class CompletionSegments:
    """Segments of one completion, in completion token positions (half-open spans)."""

    num_tokens: int
    valid: bool
    #: why the completion is invalid ("" when valid)
    reason: str
    description: tuple[int, int] = (0, 0)
    reasoning: tuple[int, int] = (0, 0)
    #: content of the LAST brace-matched ``\boxed{...}`` (evaluation protocol), or None
    answer: str | None = None


def _match_brace(text: bytes, start: int) -> int:
    """Index of the ``}`` closing the brace opened just before ``start``; -1 if unbalanced."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == 0x5C and i + 1 < len(text):  # backslash escapes the next byte (\{ \})
            i += 2
            continue
        if c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def last_boxed(text: bytes) -> str | None:
    """Content of the last brace-matched ``\\boxed{...}``; None when there is none."""
    pos = text.rfind(BOX_OPEN)
    while pos >= 0:
        close = _match_brace(text, pos + len(BOX_OPEN))
        if close >= 0:
            return text[pos + len(BOX_OPEN) : close].decode("utf-8", errors="replace").strip()
        pos = text.rfind(BOX_OPEN, 0, pos)
    return None


def parse_completion(ids: Sequence[int], token_bytes: TokenBytes) -> CompletionSegments:
    """Validity and segment spans of one completion (token ids after the prefill)."""
    pieces = token_bytes(ids)
    ends = []
    total = 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    text = b"".join(pieces)
    n = len(pieces)
    answer = last_boxed(text)

    def invalid(reason):
        return CompletionSegments(num_tokens=n, valid=False, reason=reason, answer=answer)

    p1 = text.find(DESCRIPTION_CLOSE)
    if p1 < 0:
        return invalid("no </description>")
    p2 = text.find(THINK_OPEN, p1 + len(DESCRIPTION_CLOSE))
    if p2 < 0:
        return invalid("no <think> after </description>")
    think_end = p2 + len(THINK_OPEN)
    p3 = text.find(THINK_CLOSE, think_end)
    if p3 < 0:
        return invalid("no </think> after <think>")
    p4 = text.find(BOX_OPEN, p3 + len(THINK_CLOSE))
    if p4 < 0:
        return invalid("no \\boxed{ after </think>")
    close = _match_brace(text, p4 + len(BOX_OPEN))
    if close < 0:
        return invalid("unbalanced braces in \\boxed{")
    # tokens ending at or before the tag's first byte
    desc = (0, bisect.bisect_right(ends, p1))
    # from the token holding the first byte after <think> to the one holding the closing brace
    rea = (bisect.bisect_right(ends, think_end), bisect.bisect_right(ends, close) + 1)
    special = token_bytes.special_ids

    def has_real(span):
        return any(int(ids[i]) not in special for i in range(*span))

    if not has_real(desc):
        return invalid("empty description")
    if rea[0] >= rea[1] or not has_real(rea):
        return invalid("empty reasoning")
    return CompletionSegments(num_tokens=n, valid=True, reason="", description=desc, reasoning=rea, answer=answer)
