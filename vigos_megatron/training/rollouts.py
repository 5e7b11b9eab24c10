"""Stage 1 of an iteration: the student's on-policy rollouts, parsed and graded.

Every rank of a model-parallel group (same data-parallel rank) holds the same samples and
calls the engine collectively; the engine returns the same completions on all of them.
The sampling noise is keyed by ``(seed, step, sample position in the global stream, ...)``, so
the completions do not depend on the layout and a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from vigos_megatron.rollout.segments import CompletionSegments


@dataclass
class Rollout:
    """One prompt's completion and what the loss needs to know about it.

    Attributes:
        sample: the loader's sample (``ContextEncoder`` output plus ``position``, ``key``...).
        completion: int64 ``[n]`` generated ids (CPU), EOS included when generated.
        finish_reason: ``"stop"`` or ``"length"``.
        segments: ``completion`` parsed in the prompt template's format (:mod:`vigos_megatron.rollout.formats`).
        correct: the boxed answer grades equal to the sample's reference answer.
    """

    sample: dict
    completion: Tensor
    finish_reason: str
    segments: CompletionSegments
    correct: bool


def generate_rollouts(engine, samples: list[dict], sampling, *, step: int, tokenizer,
                      parse: Callable[..., CompletionSegments]) -> list[Rollout]:
    """Sample one completion per sample with the student's current weights, then parse it with ``parse``
    (:func:`~vigos_megatron.rollout.formats.completion_parser` of the template's format) and grade it."""
    from vigos_megatron.evaluation import grade
    from vigos_megatron.rollout.engine import RolloutPrompt

    prompts = [
        RolloutPrompt(input_ids=s["contexts"]["student"], pixel_values=s["pixel_values"],
                      image_grid_thw=s["image_grid_thw"], sample_id=int(s["position"]))
        for s in samples
    ]
    completions = engine.generate(prompts, sampling, step=step) if prompts else []
    out = []
    for s, c in zip(samples, completions):
        seg = parse(c.token_ids, tokenizer)
        correct = seg.answer is not None and grade(seg.answer, s.get("answer") or "")
        out.append(Rollout(sample=s, completion=c.token_ids, finish_reason=c.finish_reason, segments=seg,
                           correct=bool(correct)))
    return out
