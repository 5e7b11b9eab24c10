"""Rollouts: generation (the KV-cached engine, :mod:`.engine`) and completion parsing.

Public parser (``segments``): :func:`parse_completion` (validity, spans, boolean masks and
answer of one completion) and :func:`extract_boxed` (the content of the last ``\\boxed{``, the
answer rule shared by training and evaluation). The rows each teacher reads are assembled in
:mod:`vigos_megatron.schedule.assembly`.
"""

from vigos_megatron.rollout.segments import CompletionSegments, TokenBytes, extract_boxed, parse_completion, token_bytes_for

__all__ = ["CompletionSegments", "TokenBytes", "extract_boxed", "parse_completion", "token_bytes_for"]
