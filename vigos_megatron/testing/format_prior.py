"""A supervised warm start that teaches a tiny random Qwen VL model (either family) the completion format, and its check.

A random model never closes ``</description>``: every rollout of the embedded demo would be
malformed, and training would only ever use the reference teacher. The real backbones follow the
model card's format from the prompt alone, under every ViGOS context; the tiny one is given that
ability by teacher-forced training on its own synthetic samples. Each step draws completions

    <description> shapes</description><think> count</think>\\boxed{A}<|im_end|>

(``A`` the sample's answer with probability ``p_correct``, another digit otherwise), tokenises
them as the student would emit them, parses them (:func:`~vigos_megatron.rollout.parse_completion`)
and builds the rows with the training's own byte-exact assembly
(:func:`~vigos_megatron.schedule.assembly.assemble_vigos`): the student row (the whole completion),
the perception teacher's row (the description), the reasoning teacher's row (the reasoning of a
completion that boxes the reference answer, which that privileged context shows; its prefix is cut
where the first reasoning token carries the end of ``<think>``) and the reference teacher's row (the
whole completion). The loss is the token cross-entropy of each row's appended completion tokens.

Positions are the ones the Megatron student uses: the family's mrope ids
(:meth:`~vigos_megatron.models.family.ModelFamily.rope_index`, what the training stage and the
rollout engine call), passed explicitly to the Hugging Face model.

:func:`check_format` is the warm start's acceptance test: the student's prompts sampled at the run's
sampling settings through the project's own rollout engine (a one-process Megatron model), and the
fraction of completions that parse as valid.

Deterministic on a machine: a fixed seed, a fixed number of CPU threads, the rows in a fixed order.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

#: the contexts a warm-start sample must carry (ContextEncoder names)
CONTEXTS = ("student", "perception", "reasoning", "reference")
#: one description and one reasoning: the tiny model learns a fixed format in a few dozen steps
DESCRIPTION, REASONING = "shapes", "count"
#: the warm start always runs on this many CPU threads: its result must not depend on the launch
THREADS = 2


def format_completion(answer: str) -> str:
    """A well-formed completion (what follows the student's ``<description>`` prefill) boxing ``answer``."""
    return f" {DESCRIPTION}</description><think> {REASONING}</think>\\boxed{{{answer}}}<|im_end|>"


def drawn_answer(answer: str, rng: random.Random, p_correct: float) -> str:
    """``answer`` with probability ``p_correct`` (when there is one), else a random digit."""
    return answer if (answer and rng.random() < p_correct) else str(rng.randrange(10))


@contextlib.contextmanager
def fixed_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class TrainingRow:
    """One teacher-forced row: ``ids`` int64 ``[L]``; the last ``targets`` tokens are supervised."""

    ids: torch.Tensor
    targets: int
    sample: dict


def sample_rows(sample: dict, tok, cut, rng: random.Random, *, p_correct: float) -> list[TrainingRow]:
    """The four rows one sample contributes to a warm-start step, assembled as training assembles them."""
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.schedule.assembly import assemble_vigos, context_row

    ctx = sample["contexts"]
    answer = sample.get("answer") or ""

    def completion(boxed: str):
        ids = torch.tensor(tok(format_completion(boxed), add_special_tokens=False)["input_ids"], dtype=torch.long)
        seg = parse_completion(ids, tok)
        if not seg.valid:
            raise ValueError(f"format warm start: the completion for answer {boxed!r} does not parse ({seg.reason})")
        return ids, seg

    ids, seg = completion(drawn_answer(answer, rng, p_correct))
    student_rows = assemble_vigos(ctx, ids, seg, cut=cut)
    # the privileged reasoning context shows the reference answer: its completions box it
    r_ids, r_seg = completion(answer or drawn_answer("", rng, 0.0))
    reasoning_row = assemble_vigos(ctx, r_ids, r_seg, cut=cut).teacher_slots[1]
    reference_row = context_row(ctx, "reference", ids)
    n, (r0, r1), d1 = ids.numel(), r_seg.reasoning, seg.description[1]
    return [
        TrainingRow(student_rows.student_slots[0].ids, n, sample),
        TrainingRow(student_rows.teacher_slots[0].ids, d1, sample),  # perception: the description
        TrainingRow(reasoning_row.ids, r1 - r0, sample),
        TrainingRow(reference_row.ids, n, sample),
    ]


def hf_batch(rows: list[TrainingRow], model, pad_id: int) -> dict:
    """Right-padded HF inputs with explicit mrope ``position_ids`` ``[3, B, L]``; labels on the targets."""
    from vigos_megatron.models.family import family_for_config

    L = max(r.ids.numel() for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = r.ids.numel()
        ids[i, :n] = r.ids
        mask[i, :n] = 1
        labels[i, n - r.targets: n] = r.ids[n - r.targets:]
    grid = torch.cat([r.sample["image_grid_thw"] for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": family_for_config(model.config).rope_index(model.model, ids, grid),
            "mm_token_type_ids": (ids == model.config.image_token_id).to(torch.int),
            "pixel_values": torch.cat([r.sample["pixel_values"] for r in rows]), "image_grid_thw": grid}


class FormatPrior:
    """Teacher-forced training of the HF checkpoint at ``hf_dir`` on ``samples`` (kept in memory
    between :meth:`train` calls, so a warm start can be continued; :meth:`save` writes it back).

    Args:
        samples: :class:`~vigos_megatron.data.contexts.ContextEncoder` outputs with the contexts of
            :data:`CONTEXTS`, ``pixel_values`` ``[patches, D]``, ``image_grid_thw`` ``[1, 3]`` and ``answer``.
        batch_size: rows per AdamW step; each step takes the next ``batch_size`` rows of fresh draws.
    """

    def __init__(self, hf_dir, samples: list[dict], *, batch_size: int = 8, lr: float = 1e-2,
                 p_correct: float = 0.7, seed: int = 0):
        from transformers import AutoConfig, AutoTokenizer

        from vigos_megatron.data.contexts import PrefixCut
        from vigos_megatron.models.family import family_for_config

        if not samples:
            raise ValueError("format warm start: no samples")
        missing = [c for c in CONTEXTS if c not in samples[0]["contexts"]]
        if missing:
            raise ValueError(f"format warm start: the samples lack the contexts {missing}")
        self.hf_dir = Path(hf_dir)
        self.samples, self.batch_size, self.p_correct = samples, batch_size, p_correct
        self.tok = AutoTokenizer.from_pretrained(self.hf_dir)
        self.cut = PrefixCut(self.tok)
        self.rng = random.Random(seed)
        self.steps = 0
        self._queue: list[TrainingRow] = []
        with fixed_threads():
            torch.manual_seed(seed)
            hf_class = family_for_config(AutoConfig.from_pretrained(self.hf_dir)).hf_model_class()
            self.model = hf_class.from_pretrained(self.hf_dir, dtype=torch.float32)
            self.model.train()
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)

    def _next_rows(self) -> list[TrainingRow]:
        while len(self._queue) < self.batch_size:
            rows = [r for s in self.samples for r in sample_rows(s, self.tok, self.cut, self.rng, p_correct=self.p_correct)]
            self.rng.shuffle(rows)  # every batch mixes contexts (one-context batches make it forget the others)
            self._queue += rows
        out, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size:]
        return out

    def train(self, steps: int, *, log=None, every: int = 20) -> float:
        """``steps`` more AdamW steps; returns the last step's mean token cross-entropy."""
        loss = float("nan")
        with fixed_threads():
            for _ in range(steps):
                out = self.model(**hf_batch(self._next_rows(), self.model, int(self.tok.pad_token_id)))
                self.opt.zero_grad(set_to_none=True)
                out.loss.backward()
                self.opt.step()
                self.steps += 1
                loss = float(out.loss.detach())
                if log is not None and (self.steps % every == 0 or self.steps == 1):
                    log(f"format warm start: step {self.steps}, loss {loss:.4g}")
        return loss

    def save(self) -> None:
        self.model.save_pretrained(self.hf_dir, safe_serialization=True)


def check_format(hf_dir, samples: list[dict], sampling, *, step: int = 0) -> tuple[int, int, list[str]]:
    """Sample the student prompt of each of ``samples`` once through the rollout engine on a one-process
    Megatron model built from ``hf_dir`` (``sampling``: a :class:`~vigos_megatron.config.sampling.SamplingConfig`).

    Returns ``(valid, total, reasons)``: how many completions parse as valid ViGOS completions and
    the reason of each invalid one. Needs no process group (it makes and ends its own).
    """
    from transformers import AutoTokenizer

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.rollout import parse_completion
    from vigos_megatron.rollout.engine import MegatronRolloutEngine, RolloutPrompt
    from vigos_megatron.rollout.segments import stop_token_ids

    tok = AutoTokenizer.from_pretrained(hf_dir)
    with fixed_threads(), local_model_parallel():
        builder = QwenVLBuilder.from_hf(hf_dir, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                        dtype=torch.float32, transformer_impl="local")
        chunks = builder.build(init_weights=False)
        builder.load_hf_weights(chunks, hf_dir)
        engine = MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=stop_token_ids(tok),
                                       pad_token_id=int(tok.pad_token_id))
        prompts = [RolloutPrompt(input_ids=s["contexts"]["student"], pixel_values=s["pixel_values"],
                                 image_grid_thw=s["image_grid_thw"], sample_id=i) for i, s in enumerate(samples)]
        completions = engine.generate(prompts, sampling, step=step)
    segs = [parse_completion(c.token_ids, tok) for c in completions]
    return sum(s.valid for s in segs), len(segs), [s.reason for s in segs if not s.valid]
