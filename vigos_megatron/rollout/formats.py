"""Completion formats: which parser reads a rollout, chosen by the prompt template's ``format``.

=======  =========================================================  ==================================
format   a valid completion (byte order)                            template
=======  =========================================================  ==================================
vigos    ``</description>``, ``<think>``, ``</think>``, closed box    ``conf/prompts/vigos.yaml``
vgs      ``<reason>``, ``</reason>``, then a closed LAST box          ``conf/prompts/vgs.yaml``
=======  =========================================================  ==================================

Both parsers return a :class:`~vigos_megatron.rollout.segments.CompletionSegments`; its
``answer`` is the last ``\\boxed{}`` in both (the rollout accuracy and the evaluation grade read
only that), its ``valid`` the format's rule. The ``vgs`` format (the VGS paper's appendix B.4
prompt) has no description: ``description`` is ``(0, 0)`` and ``reasoning`` spans the tokens with a
byte in ``[end of <reason>, the box's closing brace]``.
"""

from __future__ import annotations

import bisect
from typing import Callable

from vigos_megatron.rollout.segments import BOX_OPEN, CompletionSegments, completion_bytes, parse_completion

REASON_OPEN = b"<reason>"
REASON_CLOSE = b"</reason>"


def parse_vgs_completion(token_ids, tokenizer) -> CompletionSegments:
    """Validity, reasoning span and answer of one completion in the VGS format.

    Valid when the completion holds ``<reason>``, then ``</reason>`` with some non-whitespace text
    between them, and its LAST ``\\boxed{`` opens after that ``</reason>`` and is closed (balanced
    braces, ``\\{``/``\\}`` escaped); text before ``<reason>`` and after the box is tolerated.
    Arguments as :func:`~vigos_megatron.rollout.segments.parse_completion` (the completion starts
    at the assistant turn: this format has no prefill).
    """
    cb = completion_bytes(token_ids, tokenizer)
    text = cb.text
    p1 = text.find(REASON_OPEN)
    if p1 < 0:
        return cb.invalid("no <reason>")
    open_end = p1 + len(REASON_OPEN)
    p2 = text.find(REASON_CLOSE, open_end)
    if p2 < 0:
        return cb.invalid("no </reason> after <reason>")
    if not text[open_end:p2].strip():
        return cb.invalid("empty <reason>")
    if text.find(BOX_OPEN, p2 + len(REASON_CLOSE)) < 0:
        return cb.invalid("no \\boxed{ after </reason>")
    if cb.box is None:
        return cb.invalid("unbalanced braces in \\boxed{")  # the last box is unclosed
    rea = (bisect.bisect_right(cb.ends, open_end), bisect.bisect_right(cb.ends, cb.box[1]) + 1)
    return CompletionSegments(num_tokens=len(cb.ids), valid=True, reason="", reasoning=rea, answer=cb.answer,
                              device=cb.device)


#: the parser of each template format (:data:`vigos_megatron.data.prompts.TEMPLATE_FORMATS`)
PARSERS: dict[str, Callable[..., CompletionSegments]] = {"vigos": parse_completion, "vgs": parse_vgs_completion}


def completion_parser(fmt: str) -> Callable[..., CompletionSegments]:
    """The ``(token_ids, tokenizer) -> CompletionSegments`` parser of template format ``fmt``."""
    if fmt not in PARSERS:
        raise ValueError(f"unknown completion format {fmt!r}; known: {', '.join(PARSERS)}")
    return PARSERS[fmt]
