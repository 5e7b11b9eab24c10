"""``<run_dir>/rollouts.jsonl``: what the student wrote and what each teacher read, a few rollouts per step.

With ``logging.dump_rollouts: N`` the first ``N`` rollouts of data-parallel rank 0 are written each
step (by the rank that writes the metrics), one JSON object per rollout::

    {"step": 1, "index": 0, "id": "tiny3", "prompt": "<|im_start|>system ... <|image_pad|>x16 ...",
     "completion": " shapes</description><think> count</think>\\boxed{3}<|im_end|>",
     "finish_reason": "stop", "valid": true, "reason": "", "answer": "3", "reference_answer": "3",
     "correct": true,
     "teachers": [{"context": "perception", "text": "...<description> shapes",
                   "scored": {"perception": {"tokens": 1, "text": " shapes"}}}, ...]}

``text`` is the exact decoded text of the row the teacher read (its context, then the completion
tokens appended); ``scored`` the decoded tokens each loss term scored with that row. Runs of
``<|image_pad|>`` are collapsed into one marker with a count (``<|image_pad|>x16``) and texts
longer than :data:`MAX_CHARS` keep their head and tail. On resume the lines after the checkpoint's
step are dropped, as for ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROLLOUTS_FILE = "rollouts.jsonl"
#: a longer text keeps its first and last MAX_CHARS // 2 characters
MAX_CHARS = 4000
_IMAGE_PADS = re.compile(r"(?:<\|image_pad\|>){2,}")


def readable(text: str) -> str:
    """``text`` with image-pad runs collapsed and the middle of a very long text elided."""
    text = _IMAGE_PADS.sub(lambda m: f"<|image_pad|>x{len(m.group(0)) // len('<|image_pad|>')}", text)
    if len(text) > MAX_CHARS:
        half = MAX_CHARS // 2
        text = f"{text[:half]} ...[{len(text) - 2 * half} characters]... {text[-half:]}"
    return text


def _decode(token_bytes, ids) -> str:
    return b"".join(token_bytes([int(i) for i in ids])).decode("utf-8", errors="replace")


def rollout_record(rollout, rolled, token_bytes, term_names: tuple[str, ...]) -> dict:
    """One line: a :class:`~vigos_megatron.training.rollouts.Rollout` and its
    :class:`~vigos_megatron.schedule.assembly.AssembledRollout` (rows and scored tokens)."""
    seg = rollout.segments
    sample = rollout.sample
    teachers = []
    for t_slot, row in enumerate(rolled.teacher_slots):
        if row is None:
            continue
        if rolled.scores:
            scored: dict[str, list[int]] = {}
            for _s_slot, _s_pos, slot, t_pos, segment in rolled.scores:
                if slot == t_slot:
                    scored.setdefault(term_names[segment], []).append(int(row.ids[t_pos + 1]))
        else:  # every completion token is scored by every row (VGS)
            scored = {term_names[0]: rollout.completion.tolist()}
        teachers.append({
            "context": row.context,
            "text": readable(_decode(token_bytes, row.ids)),
            "scored": {k: {"tokens": len(v), "text": readable(_decode(token_bytes, v))} for k, v in scored.items()},
        })
    return {
        "id": sample.get("id"),
        "prompt": readable(_decode(token_bytes, sample["contexts"]["student"])),
        "completion": readable(_decode(token_bytes, rollout.completion)),
        "finish_reason": rollout.finish_reason,
        "valid": bool(seg.valid),
        "reason": seg.reason,
        "answer": seg.answer,
        "reference_answer": sample.get("answer"),
        "correct": bool(rollout.correct),
        "teachers": teachers,
    }


class RolloutLog:
    """Appends :func:`rollout_record` lines to ``run_dir/rollouts.jsonl`` (``enabled`` on one rank)."""

    def __init__(self, run_dir, *, count: int, enabled: bool, resume_step: int | None, tokenizer,
                 term_names: tuple[str, ...]):
        from vigos_megatron.rollout.segments import token_bytes_for
        from vigos_megatron.training.metrics import truncate_metrics

        self.count = count if enabled else 0
        self.path = Path(run_dir) / ROLLOUTS_FILE
        self.term_names = term_names
        self._bytes = token_bytes_for(tokenizer) if self.count else None
        if self.count:
            truncate_metrics(self.path, resume_step or 0)

    def write(self, step: int, rollouts: list, assembled: list) -> None:
        if not self.count:
            return
        with open(self.path, "a") as f:
            for i, (r, a) in enumerate(zip(rollouts[: self.count], assembled)):
                rec = {"step": int(step), "index": i, **rollout_record(r, a, self._bytes, self.term_names)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
