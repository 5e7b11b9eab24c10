#!/usr/bin/env python
"""Evaluate a Qwen2.5-VL or Qwen3-VL checkpoint on benchmarks with the model card's protocol (Pass@k, Avg@k, ViLP)
and, with ``--greedy``, the VGS paper's Acc@1 (greedy decoding).

    torchrun --nproc_per_node N tools/evaluate.py --checkpoint CKPT --data BENCH [--data BENCH ...] \\
        --output OUT_DIR [--tp T] [--pp P] [--samples 5] [--greedy] [--prompts TEMPLATE] [--no-prefill] [--limit Q]

``CKPT``: a Hugging Face directory (``config.json`` + safetensors) or a Megatron checkpoint (a run
directory or one ``iter_*`` directory written by ``tools/convert_hf_to_megatron.py`` or by
training), loaded at any TP x PP; the remaining factor of the world size is data parallelism
(questions are dealt round-robin to the data-parallel ranks). Generation is the Megatron-native
rollout engine (:class:`vigos_megatron.rollout.engine.MegatronRolloutEngine`, KV cache, megatron's
local attention): bf16 on GPUs (NCCL), fp32 on the CPU (gloo).

``BENCH``: a local ``.jsonl`` file, or a shard directory written by ``tools/make_webdataset.py``
(``manifest.json`` + ``index.json``; benchmark name: the directory name). One JSON object per line:

* ``question`` (or ``problem``): the question text (a literal ``<image>`` is removed);
* ``image`` (a path) with ``answer``, or ``images`` (paths) with ``answers`` (one answer per
  image: each image is its own prompt); paths are relative to the jsonl file's directory;
* optional ``id`` and ``benchmark`` (records are grouped by it; default the file's stem).

A benchmark whose every question has exactly three images with their own answers has ViLP's
shape (``../shared/METHOD.md`` section 5): it is sampled ``--vilp-samples`` times per prompt
(default 1) and reports Score (accuracy on images 2 and 3) and Prior (accuracy on image 1).
Other benchmarks: ``--samples`` (k, default 5) answers per prompt, Pass@k (the unbiased
estimator; with n = k samples, "any correct") and Avg@k (mean accuracy), both averaged over prompts.

Protocol (model card): temperature 1.0, top-p 0.9, top-k 20, seed 42, at most 4,096 new tokens;
the student prompt of the template ``--prompts``: ``conf/prompts/vigos.yaml`` (default, ViGOS: the
assistant turn pre-filled with ``<description>`` as in training; ``--no-prefill``: the model card
snippet's plain prompt) or ``conf/prompts/vgs.yaml`` (the VGS paper's appendix B.4 system message, no
prefill). The answer is the content of the LAST ``\\boxed{...}`` (brace-matched; none: wrong), graded by
:func:`vigos_megatron.evaluation.grade` against the normalised reference answer; each completion's
``valid`` is the template format's parser (:mod:`vigos_megatron.rollout.formats`). Sample ``j``
of prompt ``i`` (numbered over all benchmarks in order) has sampling id ``i * k_max + j``, so
the completions do not depend on the layout or the batching.

``--greedy`` adds one greedy (argmax) completion per prompt beside the sampled ones: ``acc@1``, its
mean accuracy over the prompts (ViLP-shaped benchmarks: its Score / Prior / avg), under ``greedy``
in each benchmark's metrics; the VGS paper's Acc@16 is ``avg@16`` of ``--samples 16``.

Outputs in ``--output``: ``report.json`` (settings and the metrics of every benchmark) and
``per_question.jsonl`` (every prompt: question, reference, each sample's completion, extracted
answer, grade and validity; ``greedy``: the greedy completion, likewise). Prompts that cannot be evaluated (an image that does not decode, a prompt over
``--max-prompt-tokens``) are listed in the report and left out of the metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from vigos_megatron.config.model import TRANSFORMER_IMPLS, ModelConfig  # noqa: E402  (after the path insert)

VILP_IMAGES = 3


class BenchmarkError(ValueError):
    """A benchmark file or directory is malformed; the message names the file (and line)."""


# --------------------------------------------------------------------------- benchmark items


@dataclass
class Item:
    """One prompt: a question with one of its images."""

    benchmark: str
    question_id: str
    question: str
    answer: str
    answer_raw: str
    image_index: int
    #: ``("file", path)`` or ``("shard", shards_dir, shard, row)``
    image_ref: tuple

    def image_bytes(self, sources: dict) -> bytes:
        if self.image_ref[0] == "file":
            return Path(self.image_ref[1]).read_bytes()
        _, shards_dir, shard, row = self.image_ref
        return sources[shards_dir].read(shard, row)[2]


@dataclass
class Benchmark:
    name: str
    items: list = field(default_factory=list)
    #: every question has three images with their own answers
    vilp: bool = False


def _str_field(obj: dict, names: tuple, where: str) -> str:
    for n in names:
        if n in obj:
            if not isinstance(obj[n], str):
                raise BenchmarkError(f"{where}: '{n}' must be a string, got {type(obj[n]).__name__}")
            return obj[n]
    raise BenchmarkError(f"{where}: missing '{names[0]}'" + (f" (or '{names[1]}')" if len(names) > 1 else ""))


def load_jsonl(path: Path, limit: int = 0) -> list[Benchmark]:
    """Benchmarks of a jsonl file (grouped by the optional ``benchmark`` field)."""
    from vigos_megatron.data.answers import clean_problem, normalize_answer

    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    groups: dict[str, Benchmark] = {}
    shapes: dict[str, set] = {}
    counts: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise BenchmarkError(f"{where}: expected a JSON object")
        name = obj.get("benchmark") or path.stem
        if limit and counts.get(name, 0) >= limit:
            continue
        counts[name] = counts.get(name, 0) + 1
        question = clean_problem(_str_field(obj, ("question", "problem"), where))
        if "images" in obj:
            images, answers = obj["images"], obj.get("answers")
            if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
                raise BenchmarkError(f"{where}: 'images' must be a non-empty list of paths")
            if answers is None and isinstance(obj.get("answer"), str) and len(images) == 1:
                answers = [obj["answer"]]
            if not isinstance(answers, list) or len(answers) != len(images) or not all(isinstance(a, str) for a in answers):
                raise BenchmarkError(f"{where}: 'images' needs 'answers', a list of {len(images)} strings (one per image)")
        else:
            images, answers = [_str_field(obj, ("image",), where)], [_str_field(obj, ("answer",), where)]
        qid = str(obj.get("id", f"{path.stem}:{line_no}"))
        bench = groups.setdefault(name, Benchmark(name))
        shapes.setdefault(name, set()).add(len(images))
        for i, (img, ans) in enumerate(zip(images, answers)):
            p = Path(img)
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise BenchmarkError(f"{where}: image file not found: {p}")
            bench.items.append(Item(name, qid, question, normalize_answer(ans), ans, i, ("file", str(p))))
    if not groups:
        raise BenchmarkError(f"{path}: no questions")
    for name, bench in groups.items():
        bench.vilp = shapes[name] == {VILP_IMAGES}
    return list(groups.values())


def load_shards(path: Path, limit: int = 0) -> Benchmark:
    """A benchmark from the data tool's WebDataset shards (one image per question)."""
    from vigos_megatron.data.loader import ShardSource

    try:
        src = ShardSource(path)
    except (FileNotFoundError, ValueError) as e:
        raise BenchmarkError(f"{path}: {e}") from None
    bench = Benchmark(path.name)
    try:
        for shard, size in enumerate(src.shard_sizes):
            for row in range(size):
                if limit and len(bench.items) >= limit:
                    break
                key, record, _ = src.read(shard, row)
                bench.items.append(Item(bench.name, str(record.get("id", key)), record["problem"],
                                        record.get("answer") or "", record.get("answer_raw") or "", 0,
                                        ("shard", str(path), shard, row)))
    finally:
        src.close()
    return bench


def load_benchmarks(paths: list[str], limit: int = 0) -> list[Benchmark]:
    out: list[Benchmark] = []
    for p in map(Path, paths):
        out += [load_shards(p, limit)] if p.is_dir() else load_jsonl(p, limit)
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchmarkError(f"benchmark names must be unique, got {dup} more than once (set 'benchmark' fields)")
    return out


# --------------------------------------------------------------------------- metrics


def score_sample(completion: str, answer: str) -> tuple[str | None, bool]:
    """``(extracted answer, correct)``: the last brace-matched ``\\boxed{}`` of ``completion``
    (None without one: wrong) graded against the reference ``answer``."""
    from vigos_megatron.evaluation import grade
    from vigos_megatron.rollout import extract_boxed

    extracted = extract_boxed(completion)
    return extracted, bool(extracted is not None and grade(extracted, answer))



def greedy_metrics(benchmark: Benchmark, results: dict) -> dict:
    """Metrics of one greedy completion per prompt (``results`` as :func:`aggregate`'s, one grade each):
    ``acc@1`` (standard) or ViLP's ``score`` / ``prior`` / ``avg``; empty when nothing was evaluated."""
    m = aggregate(benchmark, results, 1)
    if benchmark.vilp:
        return {key: m[key] for key in ("score", "prior", "avg") if key in m}
    return {"acc@1": m["avg@1"]} if "avg@1" in m else {}


def aggregate(benchmark: Benchmark, results: dict, k: int) -> dict:
    """Metrics of one benchmark from ``results[(benchmark, question_id, image_index)] = [bool, ...]``.

    Standard: ``pass@k`` / ``avg@k`` over its prompts (:func:`~vigos_megatron.evaluation.pass_and_avg_at_k`).
    ViLP: ``score`` = mean accuracy over the samples of images 2 and 3, ``prior`` over image 1;
    ``avg`` over all of them.
    """
    from vigos_megatron.evaluation import pass_and_avg_at_k

    grades = [results[(i.benchmark, i.question_id, i.image_index)] for i in benchmark.items
              if (i.benchmark, i.question_id, i.image_index) in results]
    out = {"prompts": len(benchmark.items), "evaluated": len(grades),
           "questions": len({i.question_id for i in benchmark.items}), "samples_per_prompt": k}
    if not grades:
        return out
    if benchmark.vilp:
        def acc(images):
            g = [x for i in benchmark.items if i.image_index in images
                 for x in results.get((i.benchmark, i.question_id, i.image_index), [])]
            return sum(g) / len(g) if g else None

        out.update(score=acc({1, 2}), prior=acc({0}), avg=acc({0, 1, 2}))
    else:
        p, a = pass_and_avg_at_k(grades, k)
        out.update({f"pass@{k}": p, f"avg@{k}": a})
    return out


# --------------------------------------------------------------------------- the run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF directory, Megatron run directory or iter_* directory")
    ap.add_argument("--data", action="append", required=True, help="benchmark .jsonl or shard directory (repeatable)")
    ap.add_argument("--output", required=True, help="directory for report.json and per_question.jsonl")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--transformer-impl", default=ModelConfig.transformer_impl, choices=TRANSFORMER_IMPLS,
                    help="layer spec, as model.transformer_impl in training (auto: TE where installed, "
                         "else sdpa on a GPU, local on the CPU)")
    ap.add_argument("--samples", type=int, default=5, help="k: answers per prompt (Pass@k / Avg@k)")
    ap.add_argument("--vilp-samples", type=int, default=1, help="answers per prompt on ViLP-shaped benchmarks")
    ap.add_argument("--greedy", action="store_true",
                    help="also one greedy completion per prompt: Acc@1 (the VGS paper's) beside the sampled metrics")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-new-tokens", type=int, default=4096)
    ap.add_argument("--max-batch-size", type=int, default=32, help="prompts decoded together")
    ap.add_argument("--no-prefill", action="store_true", help="do not pre-fill <description> (model card snippet)")
    ap.add_argument("--prompts", default=str(REPO / "conf" / "prompts" / "vigos.yaml"),
                    help="prompt templates: conf/prompts/vigos.yaml (ViGOS) or conf/prompts/vgs.yaml (VGS)")
    ap.add_argument("--min-pixels", type=int, default=None,
                    help="image pixel floor (default 4 merged patches: 4 * 28**2 for Qwen2.5-VL, 4 * 32**2 for Qwen3-VL)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="image pixel cap (default 16384 merged patches in the family's unit)")
    ap.add_argument("--max-prompt-tokens", type=int, default=32768)
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions of each benchmark")
    return ap.parse_args(argv)


def sampling_config(args, *, greedy: bool = False):
    """The sampled protocol's :class:`~vigos_megatron.config.sampling.SamplingConfig`, or (``greedy``) the
    same with argmax decoding."""
    from vigos_megatron.config.sampling import SamplingConfig

    cfg = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         max_new_tokens=args.max_new_tokens, greedy=greedy, seed=args.seed,
                         max_batch_size=args.max_batch_size)
    cfg.validate()
    return cfg


def resolve_model(checkpoint: str) -> tuple[Path, Path | None]:
    """``(hf_dir, megatron_ckpt or None)``: a HF directory, or a Megatron run / iter_* directory."""
    from vigos_megatron.convert.megatron_checkpoint import hf_dir_of, resolve_checkpoint

    p = Path(checkpoint)
    if (p / "config.json").is_file():
        return p, None
    ckpt = resolve_checkpoint(p)  # CheckpointError names what is missing
    return hf_dir_of(ckpt), ckpt


def encoder_for(args, hf_dir: Path):
    from vigos_megatron.config.data import ContextConfig
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.prompts import load_templates

    templates = load_templates(args.prompts)
    if args.no_prefill:
        contexts = dict(templates.contexts)
        contexts["student"] = dataclasses.replace(contexts["student"], prefill="")
        templates = dataclasses.replace(templates, contexts=contexts)
    bounds = ContextConfig(min_pixels=args.min_pixels or 0, max_pixels=args.max_pixels or 0)
    min_pixels, max_pixels = bounds.pixel_bounds(pixel_unit(hf_dir))
    return ContextEncoder(hf_dir, templates, min_pixels=min_pixels, max_pixels=max_pixels,
                          max_prompt_tokens=args.max_prompt_tokens, contexts=("student",))


def pixel_unit(hf_dir: Path) -> int:
    """Pixels per merged vision token along a side for the checkpoint's family (28 or 32)."""
    from vigos_megatron.models.builder import load_hf_config
    from vigos_megatron.models.family import family_for_config

    cfg = load_hf_config(hf_dir)
    return family_for_config(cfg).pixel_unit(cfg)


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from vigos_megatron import runtime, startup
    from vigos_megatron.models.hf_checkpoint import CheckpointError
    from vigos_megatron.data.loader import DropSample, ShardSource
    from vigos_megatron.models.builder import ModelBuildError, QwenVLBuilder
    from vigos_megatron.rollout.engine import MegatronRolloutEngine, RolloutPrompt
    from vigos_megatron.rollout.formats import completion_parser

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        if args.tp < 1 or args.pp < 1 or world % (args.tp * args.pp):
            raise ValueError(f"--tp {args.tp} x --pp {args.pp} does not divide the world size {world}")
        for name in ("samples", "vilp_samples"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        sampling = sampling_config(args)
        benchmarks = load_benchmarks(args.data, args.limit)
        hf_dir, megatron_ckpt = resolve_model(args.checkpoint)
    except (ValueError, CheckpointError) as e:
        if rank == 0:
            print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    k_max = max(args.vilp_samples if b.vilp else args.samples for b in benchmarks)
    items = [i for b in benchmarks for i in b.items]
    k_of = {b.name: (args.vilp_samples if b.vilp else args.samples) for b in benchmarks}

    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs(rank)  # the platform adaptations, then known library warnings kept off the console
    ps = startup.init_distributed(args.tp, args.pp, seed=args.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    dtype = torch.bfloat16 if runtime.use_cuda() else torch.float32
    try:
        builder = QwenVLBuilder.from_hf(hf_dir, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                        dtype=dtype, transformer_impl=args.transformer_impl)
        chunks = builder.build(init_weights=False)
        if megatron_ckpt is None:
            builder.load_hf_weights(chunks, hf_dir)
        else:
            from vigos_megatron.convert.megatron_checkpoint import load_model_checkpoint

            load_model_checkpoint(chunks, megatron_ckpt)
    except (ModelBuildError, CheckpointError) as e:
        if rank == 0:
            print(f"evaluate: error: {e}", file=sys.stderr)
        startup.destroy_distributed()
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    stops = [int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|im_end|>", "<|endoftext|>")
             if tokenizer.convert_tokens_to_ids(t) not in (None, tokenizer.unk_token_id)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    engine = MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=stops, pad_token_id=int(pad))
    encoder = encoder_for(args, hf_dir)
    prefill = encoder.templates.prefill("student")
    parse = completion_parser(encoder.templates.format)
    greedy = sampling_config(args, greedy=True) if args.greedy else None
    sources = {i.image_ref[1]: ShardSource(i.image_ref[1]) for i in items if i.image_ref[0] == "shard"}

    mine = [n for n in range(len(items)) if n % dp == dp_rank]
    say(f"[evaluate] {hf_dir if megatron_ckpt is None else megatron_ckpt}: tp={args.tp} pp={args.pp} dp={dp}, "
        f"{runtime.describe()}; {len(items)} prompts in {len(benchmarks)} benchmark(s), "
        f"format {encoder.templates.format}, prefill {prefill!r}, sampling T={sampling.temperature} "
        f"top-p={sampling.top_p} top-k={sampling.top_k} seed={sampling.seed}" + (" and greedy" if greedy else ""))
    records, skipped = [], []
    queue: list[tuple[int, dict]] = []
    t0 = time.time()
    done = 0

    def prompt(s, sample_id):
        return RolloutPrompt(input_ids=s["contexts"]["student"], pixel_values=s["pixel_values"],
                             image_grid_thw=s["image_grid_thw"], sample_id=sample_id)

    def scored(c, answer, **fields):
        text = tokenizer.decode(c.token_ids.tolist(), skip_special_tokens=True)
        extracted, correct = score_sample(text, answer)
        return {**fields, "completion": text, "finish_reason": c.finish_reason, "tokens": c.length,
                "extracted": extracted, "correct": correct, "valid": parse(c.token_ids, tokenizer).valid}

    def flush():
        nonlocal done
        outs = iter(engine.generate([prompt(s, n * k_max + j) for n, s in queue for j in range(k_of[items[n].benchmark])],
                                    sampling, step=0))
        argmax = iter(engine.generate([prompt(s, n) for n, s in queue], greedy, step=0) if greedy else ())
        for n, s in queue:
            it = items[n]
            samples = [scored(next(outs), it.answer, sample_id=n * k_max + j) for j in range(k_of[it.benchmark])]
            records.append({"index": n, "benchmark": it.benchmark, "question_id": it.question_id,
                            "image_index": it.image_index, "question": it.question, "answer": it.answer,
                            "answer_raw": it.answer_raw, "prompt_tokens": int(s["contexts"]["student"].numel()),
                            "prefill": prefill, "samples": samples,
                            **({"greedy": scored(next(argmax), it.answer)} if greedy else {})})
        done += len(queue)
        queue.clear()
        say(f"[evaluate] data-parallel rank 0: {done}/{len(mine)} prompts, {time.time() - t0:.1f}s")

    for n in mine:
        it = items[n]
        try:
            sample = encoder(f"{it.benchmark}/{it.question_id}/{it.image_index}",
                             {"problem": it.question, "answer": it.answer}, it.image_bytes(sources))
        except (DropSample, OSError) as e:
            skipped.append({"index": n, "benchmark": it.benchmark, "question_id": it.question_id,
                            "image_index": it.image_index, "reason": str(e)})
            continue
        queue.append((n, sample))
        if sum(k_of[items[m].benchmark] for m, _ in queue) >= sampling.max_batch_size:
            flush()
    if queue:
        flush()
    for src in sources.values():
        src.close()

    # every rank of the model-parallel group holds the same completions: keep TP 0 of the first stage
    keep = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (records, skipped) if keep else ([], []))
    if rank == 0:
        all_records = sorted((r for g in gathered for r in g[0]), key=lambda r: r["index"])
        all_skipped = sorted((s for g in gathered for s in g[1]), key=lambda s: s["index"])
        results = {(r["benchmark"], r["question_id"], r["image_index"]): [s["correct"] for s in r["samples"]]
                   for r in all_records}
        greedy_results = {(r["benchmark"], r["question_id"], r["image_index"]): [r["greedy"]["correct"]]
                          for r in all_records if "greedy" in r}
        report = {
            "checkpoint": str(args.checkpoint),
            "layout": {"tp": args.tp, "pp": args.pp, "dp": dp},
            "sampling": dataclasses.asdict(sampling),
            "format": encoder.templates.format,
            "prefill": prefill,
            "benchmarks": {b.name: {"vilp": b.vilp, **aggregate(b, results, k_of[b.name]),
                                    **({"greedy": greedy_metrics(b, greedy_results)} if greedy else {})}
                           for b in benchmarks},
            "skipped": all_skipped,
        }
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        with open(out / "per_question.jsonl", "w", encoding="utf-8") as f:
            for r in all_records:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        for name, m in report["benchmarks"].items():
            shown = [(key, v) for key, v in m.items()
                     if key in ("score", "prior", "avg") or key.startswith(("pass@", "avg@"))]
            shown += [(f"greedy {key}", v) for key, v in m.get("greedy", {}).items()]
            metrics = ", ".join(f"{key} {v:.4f}" for key, v in shown if v is not None)
            say(f"[evaluate] {name}: {m['evaluated']}/{m['prompts']} prompts; {metrics}")
        say(f"[evaluate] wrote {out / 'report.json'} and {out / 'per_question.jsonl'}"
            + (f"; {len(all_skipped)} prompt(s) skipped" if all_skipped else ""))
    dist.barrier()
    startup.destroy_distributed()
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
