"""Parse a student completion into ViGOS segments (``../shared/METHOD.md`` sections 1 and 5).

Public API (re-exported by :mod:`vigos_megatron.rollout`):

* :func:`parse_completion` ``(token_ids, tokenizer) -> CompletionSegments``: validity, the
  description and reasoning+answer spans, their boolean token masks, and the answer.
* :func:`extract_boxed` ``(text) -> str | None``: the evaluation protocol's answer, the content
  of the LAST ``\\boxed{``; used for training's rollout accuracy and for evaluation alike.

The completion is the generated token ids after the ``<description>`` prefill. Tag
positions are found in the exact bytes of the completion, obtained token by token from
the byte-level BPE vocabulary (never by re-encoding a prefix, which would shift BPE
merges), and mapped back to token indices through cumulative byte offsets.

Rules (byte positions in the completion's text):

* the answer box is the LAST ``\\boxed{`` of the completion; its content runs to the brace
  that closes it (braces nest; a backslash escapes the next character, so ``\\{`` and ``\\}``
  do not count). When the last box is unclosed there is no answer: an earlier closed box is
  NOT used (a completion truncated inside its final box has no answer).
* valid when, scanning in order, it contains ``</description>``, then ``<think>``, then
  ``</think>``, and the answer box opens after that ``</think>`` and is closed; and both spans
  below contain at least one real (non-special) token. Text between tags and after the box is
  tolerated. A valid completion therefore always has an ``answer``.
* description span: bytes ``[0, start of </description>)``; reasoning+answer span: bytes
  ``[end of <think>, the answer box's closing brace]``.
* a token belongs to a span when ANY of its bytes lies inside the span. Qwen's BPE merges
  punctuation across tag boundaries (``.</``, ``>The``, ``}.`` are single tokens): such a token
  carries supervised text and is supervised with its span; a token holding only tag bytes,
  anything after the box and EOS are not supervised on valid rows.
* invalid rows: the reference (fallback) term covers every completion token, EOS included
  when generated.

Token spans are half-open ``[start, end)`` in completion positions.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

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


def _unwrap_processor(tokenizer):
    """A processor (``Qwen2_5_VLProcessor``) stands for its ``.tokenizer``."""
    if getattr(tokenizer, "backend_tokenizer", None) is None and getattr(tokenizer, "tokenizer", None) is not None:
        return tokenizer.tokenizer
    return tokenizer


class TokenBytes:
    """Exact byte string of each token id of a byte-level BPE tokenizer (Qwen2/2.5).

    The whole table is built once from the vocabulary (no reference to the tokenizer is
    kept). Added tokens (``<|im_end|>``, ...) map to their content; ``special_ids`` are the
    ones that are not "real" text tokens (EOS, pad, vision markers).
    """

    def __init__(self, tokenizer):
        tokenizer = _unwrap_processor(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        if decoder != "ByteLevel":
            raise ValueError(
                f"TokenBytes needs a byte-level BPE tokenizer (Qwen2/2.5); {type(tokenizer).__name__} has decoder {decoder}"
            )
        added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
        vocab = tokenizer.get_vocab()
        size = max([*vocab.values(), *added, -1]) + 1
        table: list[bytes | None] = [None] * size
        dec = _byte_decoder()
        for piece, i in vocab.items():
            if i in added:
                continue
            try:
                table[i] = bytes(dec[c] for c in piece)
            except KeyError as e:
                raise ValueError(f"token {piece!r} (id {i}) is not a byte-level BPE piece: character {e} unknown") from None
        for i, t in added.items():
            table[i] = t.content.encode("utf-8")
        self._table = table
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        #: every added token (special or not): the tokenizer splits text at each of them before BPE
        self.added_ids = frozenset(added)

    def __len__(self) -> int:
        return len(self._table)

    def __call__(self, ids: Sequence[int]) -> list[bytes]:
        out = []
        table = self._table
        for i in ids:
            i = int(i)
            b = table[i] if 0 <= i < len(table) else None
            if b is None:
                raise ValueError(f"token id {i} is not in the tokenizer's vocabulary (ids 0..{len(table) - 1})")
            out.append(b)
        return out


#: id(tokenizer) -> (weak reference to it, its TokenBytes); entries leave with their tokenizer
_TABLES: dict[int, tuple[weakref.ref, TokenBytes]] = {}


def token_bytes_for(tokenizer) -> TokenBytes:
    """The cached :class:`TokenBytes` of ``tokenizer`` (a ``TokenBytes`` is returned as is).

    Built once per live tokenizer object (keyed by identity, dropped when the tokenizer is
    garbage-collected), so per-completion calls cost only the table lookups.
    """
    if isinstance(tokenizer, TokenBytes):
        return tokenizer
    tokenizer = _unwrap_processor(tokenizer)
    key = id(tokenizer)
    entry = _TABLES.get(key)
    if entry is not None and entry[0]() is tokenizer:
        return entry[1]
    table = TokenBytes(tokenizer)

    def _drop(ref, key=key):
        if _TABLES.get(key, (None,))[0] is ref:
            del _TABLES[key]

    _TABLES[key] = (weakref.ref(tokenizer, _drop), table)
    return table


@dataclass(frozen=True)
class CompletionSegments:
    """Segments of one completion, in completion token positions (half-open spans).

    The masks are ``torch.bool`` tensors ``[num_tokens]`` on ``device`` (the device of the
    ``token_ids`` tensor given to :func:`parse_completion`, CPU for a list), built on access:

    * valid row: ``description_mask`` / ``reasoning_mask`` are True on the ``description`` /
      ``reasoning`` spans (disjoint), ``fallback_mask`` is all False;
    * invalid row: ``fallback_mask`` is True on every completion token (EOS included when
      generated), the other two are all False (and both spans are ``(0, 0)``).
    """

    num_tokens: int
    valid: bool
    #: why the completion is invalid ("" when valid)
    reason: str
    description: tuple[int, int] = (0, 0)
    reasoning: tuple[int, int] = (0, 0)
    #: :func:`extract_boxed` of the completion's text (the last box; None when absent or unclosed)
    answer: str | None = None
    #: bytes of the reasoning span's first token that lie BEFORE the span (the ``>`` of ``<think>``
    #: in ``>The``): a teacher that reads the reasoning after its own ``<think>`` prefix drops them
    #: from its prefix instead (``b""`` when the token starts at the span, and on invalid rows)
    reasoning_lead: bytes = b""
    device: torch.device = field(default=torch.device("cpu"), compare=False, repr=False)

    def _span_mask(self, span: tuple[int, int]) -> Tensor:
        mask = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.device)
        mask[span[0] : span[1]] = True
        return mask

    @property
    def description_mask(self) -> Tensor:
        """``bool [num_tokens]``: tokens the perception teacher supervises (valid rows)."""
        return self._span_mask(self.description)

    @property
    def reasoning_mask(self) -> Tensor:
        """``bool [num_tokens]``: tokens the reasoning teacher supervises (valid rows)."""
        return self._span_mask(self.reasoning)

    @property
    def fallback_mask(self) -> Tensor:
        """``bool [num_tokens]``: tokens the reference (fallback) teacher supervises: all of an invalid row."""
        return torch.full((self.num_tokens,), not self.valid, dtype=torch.bool, device=self.device)


def _match_brace(text: bytes | str, start: int) -> int:
    """Index of the ``}`` closing the brace opened just before ``start``; -1 if unclosed.

    Works on bytes and on str (the markers are ASCII, so UTF-8 bytes and characters agree).
    """
    esc, opn, cls = (0x5C, 0x7B, 0x7D) if isinstance(text, bytes) else ("\\", "{", "}")
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == esc and i + 1 < len(text):  # backslash escapes the next character (\{ \})
            i += 2
            continue
        if c == opn:
            depth += 1
        elif c == cls:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _last_box(text: bytes | str) -> tuple[int, int] | None:
    """``(index of the last \\boxed{, index of its closing brace)``; None when absent or unclosed."""
    marker = BOX_OPEN if isinstance(text, bytes) else BOX_OPEN.decode()
    pos = text.rfind(marker)
    if pos < 0:
        return None
    close = _match_brace(text, pos + len(marker))
    return None if close < 0 else (pos, close)


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{`` of ``text``, brace-matched, whitespace-stripped.

    ``None`` when ``text`` has no ``\\boxed{`` or when the last one is unclosed (an earlier
    closed box is not used). Nested braces belong to the content (``\\boxed{\\frac{1}{2}}`` ->
    ``\\frac{1}{2}``); ``\\{`` / ``\\}`` are escaped and do not count.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed: text must be str, got {type(text).__name__}")
    box = _last_box(text)
    return None if box is None else text[box[0] + len(BOX_OPEN) : box[1]].strip()


def last_boxed(text: bytes | str) -> str | None:
    """Alias of :func:`extract_boxed` that also takes UTF-8 bytes (same last-box rule)."""
    return extract_boxed(text)


def _as_id_list(token_ids) -> tuple[list[int], torch.device]:
    if isinstance(token_ids, Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be a 1-D tensor of one completion's ids, got shape {tuple(token_ids.shape)}")
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must hold integer ids, got dtype {token_ids.dtype}")
        return token_ids.tolist(), token_ids.device
    return [int(i) for i in token_ids], torch.device("cpu")


@dataclass(frozen=True)
class CompletionBytes:
    """A completion's exact bytes, token by token (what every format's parser reads).

    ``text`` is the concatenation of the tokens' bytes; token ``i`` covers bytes
    ``[starts[i], ends[i])``. ``box`` is ``(index of the last \\boxed{, its closing brace)`` or
    None (absent or unclosed), ``answer`` its stripped content (:func:`extract_boxed`'s rule).
    """

    ids: list[int]
    device: torch.device
    token_bytes: TokenBytes
    text: bytes
    starts: list[int]
    ends: list[int]
    box: tuple[int, int] | None
    answer: str | None

    def has_real(self, span: tuple[int, int]) -> bool:
        """Whether token span ``[a, b)`` holds a real (non-special) token."""
        special = self.token_bytes.special_ids
        return any(self.ids[i] not in special for i in range(*span))

    def invalid(self, reason: str) -> "CompletionSegments":
        return CompletionSegments(num_tokens=len(self.ids), valid=False, reason=reason, answer=self.answer,
                                  device=self.device)


def completion_bytes(token_ids, tokenizer) -> CompletionBytes:
    """The :class:`CompletionBytes` of ``token_ids`` (as :func:`parse_completion` takes them)."""
    ids, device = _as_id_list(token_ids)
    token_bytes = token_bytes_for(tokenizer)
    pieces = token_bytes(ids)
    starts, ends, total = [], [], 0
    for p in pieces:
        starts.append(total)
        total += len(p)
        ends.append(total)
    text = b"".join(pieces)
    box = _last_box(text)
    answer = None if box is None else text[box[0] + len(BOX_OPEN) : box[1]].decode("utf-8", errors="replace").strip()
    return CompletionBytes(ids, device, token_bytes, text, starts, ends, box, answer)


def parse_completion(token_ids, tokenizer) -> CompletionSegments:
    """Validity, segment spans, masks and answer of one completion (module docstring's rules).

    Args:
        token_ids: the completion's generated ids after the ``<description>`` prefill, without
            padding (EOS included when generated): a list of ints or a 1-D integer tensor
            ``[n]`` (any device; the masks are built on it).
        tokenizer: a Hugging Face byte-level BPE tokenizer (Qwen2/2.5; a processor is accepted
            for its ``.tokenizer``) or a prebuilt :class:`TokenBytes`. The per-tokenizer byte
            table is cached (:func:`token_bytes_for`).

    Returns:
        :class:`CompletionSegments` with ``num_tokens == n``.
    """
    cb = completion_bytes(token_ids, tokenizer)
    text, starts, ends, box, invalid, has_real = cb.text, cb.starts, cb.ends, cb.box, cb.invalid, cb.has_real
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
    if text.find(BOX_OPEN, p3 + len(THINK_CLOSE)) < 0:
        return invalid("no \\boxed{ after </think>")
    if box is None:
        return invalid("unbalanced braces in \\boxed{")  # the last box is unclosed
    close = box[1]
    # tokens with a byte in [0, p1): those starting before the tag (``.</`` included)
    desc = (0, bisect.bisect_left(starts, p1))
    # tokens with a byte in [think_end, close]: from the first ending after think_end
    # (``>The`` included) to the one holding the closing brace (``}.`` included)
    rea = (bisect.bisect_right(ends, think_end), bisect.bisect_right(ends, close) + 1)
    if not has_real(desc):
        return invalid("empty description")
    if rea[0] >= rea[1] or not has_real(rea):
        return invalid("empty reasoning")
    if desc[1] > rea[0]:
        return invalid("one token spans both the description and the reasoning")
    return CompletionSegments(
        num_tokens=len(cb.ids), valid=True, reason="", description=desc, reasoning=rea, answer=cb.answer, device=cb.device,
        reasoning_lead=text[starts[rea[0]]:think_end],
    )


def stop_token_ids(tokenizer) -> list[int]:
    """``<|im_end|>`` (the chat turn's end, Qwen's EOS) and ``<|endoftext|>``."""
    ids = []
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i != tokenizer.unk_token_id:
            ids.append(int(i))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has no <|im_end|>, <|endoftext|> or EOS token to stop generation on")
    return ids
