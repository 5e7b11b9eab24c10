"""A short supervised warm start that teaches a tiny random Qwen2.5-VL the completion format.

A random model never closes ``</description>``: every rollout of the embedded demo would be
malformed, and training would only ever use the reference teacher. The real backbones follow the
model card's format from the prompt alone, under every ViGOS context; the tiny one is given that
ability by a few dozen steps of teacher-forced training on its own synthetic samples, each
context prefix followed by what that context's prefill leads to::

    student, reference   <description> shapes</description><think> count</think>\\boxed{3}<|im_end|>
    perception           <description> shapes</description>
    reasoning            <think> count</think>\\boxed{3}<|im_end|>

The student's and the reference's boxed answer is the sample's answer with probability
``p_correct`` (another digit otherwise); the reasoning context, which shows the reference
answer, always boxes it (a privileged teacher that knows the answer). Sampled rollouts are then a
mix (the sampling temperature is above 1): mostly well formed, some right and some wrong, a few
malformed, and the run has all three teachers at work. Teaching the format under the teacher
contexts too matters: a self-distillation teacher that has the format only under the student's
context would train it out of the student.

The warm start is deterministic: a fixed seed, a fixed number of CPU threads, the samples in a fixed order; the
same checkpoint comes out of every launch on a machine, whatever the layout of the launch.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

#: the contexts taught, in turn (ContextEncoder names)
CONTEXTS = ("student", "reference", "perception", "reasoning")
#: one description and one reasoning: the tiny model learns a fixed format in a few dozen steps
DESCRIPTION, REASONING = "shapes", "count"


def format_completion(context: str, answer: str, rng: random.Random, *, p_correct: float) -> str:
    """What follows ``context``'s prefill in a well-formed completion (ends with ``<|im_end|>`` but for perception)."""
    if context == "perception":
        return f" {DESCRIPTION}</description>"
    if context == "reasoning":
        return f" {REASONING}</think>\\boxed{{{answer}}}<|im_end|>"
    boxed = answer if (answer and rng.random() < p_correct) else str(rng.randrange(10))
    return f" {DESCRIPTION}</description><think> {REASONING}</think>\\boxed{{{boxed}}}<|im_end|>"


#: the warm start always runs on this many CPU threads: its result must not depend on the launch
THREADS = 2


@contextlib.contextmanager
def _fixed_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _batch(prefixes: list[torch.Tensor], completions: list[torch.Tensor], samples: list[dict], pad_id: int) -> dict:
    """Right-padded HF inputs: prefix + completion per row, labels on the completion only."""
    rows = [torch.cat([p, c]) for p, c in zip(prefixes, completions)]
    L = max(r.numel() for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (r, c) in enumerate(zip(rows, completions)):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
        labels[i, r.numel() - c.numel(): r.numel()] = c
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples])}


def prime_format(hf_dir, samples: list[dict], *, steps: int = 120, batch_size: int = 8, lr: float = 1e-2,
                 p_correct: float = 0.7, seed: int = 0) -> dict:
    """Train the checkpoint at ``hf_dir`` in place on ``samples`` with format completions.

    Args:
        hf_dir: a tiny HF Qwen2.5-VL checkpoint (``write_tiny_checkpoint``), rewritten in place.
        samples: :class:`~vigos_megatron.data.contexts.ContextEncoder` outputs with the contexts of
            :data:`CONTEXTS` (int64 ``[L]`` each, image contexts), ``pixel_values`` ``[patches, D]``,
            ``image_grid_thw`` ``[1, 3]`` and ``answer``.
        steps: AdamW steps, each on ``batch_size`` rows: (sample, context) pairs in turn (shuffled
            once), with freshly drawn completions.

    Returns ``{"steps", "first_loss", "last_loss"}`` (mean token cross-entropy of the completions).
    """
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    if not samples:
        raise ValueError("prime_format: no samples")
    missing = [c for c in CONTEXTS if c not in samples[0]["contexts"]]
    if missing:
        raise ValueError(f"prime_format: the samples lack the contexts {missing}")
    hf_dir = Path(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rng = random.Random(seed)
    pairs = [(s, c) for c in CONTEXTS for s in samples]
    rng.shuffle(pairs)  # every batch mixes contexts (one-context batches in turn make it forget the others)
    with _fixed_threads():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        for step in range(steps):
            batch = [pairs[(step * batch_size + i) % len(pairs)] for i in range(min(batch_size, len(pairs)))]
            texts = [format_completion(c, s.get("answer") or "", rng, p_correct=p_correct) for s, c in batch]
            completions = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
            inputs = _batch([s["contexts"][c] for s, c in batch], completions, [s for s, _ in batch],
                            int(tok.pad_token_id))
            out = model(**inputs)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        model.save_pretrained(hf_dir, safe_serialization=True)
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}
