"""The embedded default run's assets: a tiny Qwen2.5-VL (or Qwen3-VL, ``tiny.family``) taught the
completion format, and its shards.

``conf/tiny_cpu.yaml`` sets ``tiny.enabled=true``. The run then reads its model, processor and
shards from a cache entry (never from ``run_dir``, which ``make demo`` removes):

    <cache>/tiny/<key>/hf/          the checkpoint (``write_tiny_checkpoint``, fixed seed), taught the
                                    completion format (:mod:`vigos_megatron.testing.format_prior`)
    <cache>/tiny/<key>/teacher_hf/  ``tiny.teacher: larger`` only: a teacher of another size, same warm start
    <cache>/tiny/<key>/shards/      ``tiny.samples`` synthetic Vision-SR1-47K rows as WebDataset shards
    <cache>/tiny/<key>/report.json  warm-start steps and loss, the self-check's valid rate

``<cache>`` is ``$VIGOS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vigos-megatron``, else
``~/.cache/vigos-megatron``. ``<key>`` hashes everything that decides the bytes: the ``tiny``,
``data.context`` (prompt file content included) and ``sampling`` settings, the sources of the
generating modules (:data:`GENERATING_MODULES`) and the torch / transformers versions. An entry is
built in a temporary directory by ONE process at a time (a file lock) and renamed when complete;
a later launch, the test suite and a second ``make demo`` reuse it.

The build runs in its own process (``python -m vigos_megatron.training.tiny_demo SPEC OUT``): the
warm start's self-check builds a one-process Megatron model with its own process group, which must
not meet the launch's. Steps, each announced on the console:

1. synthetic rows -> parquet -> shards (the converter of ``tools/make_webdataset.py``);
2. the random checkpoint;
3. ``tiny.format_prior_steps`` warm-start steps, then the self-check: the student prompts of the
   first ``tiny.check_prompts`` samples sampled at the run's ``sampling`` settings (with
   :data:`CHECK_MAX_NEW_TOKENS` new tokens) through the rollout engine must parse as valid at a rate of at least ``tiny.min_valid_rate``; if not, the
   warm start continues in rounds of ``format_prior_steps`` steps up to ``tiny.format_prior_max_steps``
   and then fails, naming the rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import PretrainConfig

#: images of the synthetic samples: a few merged patches each, so a CPU step stays short
TINY_IMAGE_SIZE = (56, 56)
#: the self-check's completion budget: a well-formed completion of the tiny tokenizer is 23-28 tokens
#: (whatever a run's own ``sampling.max_new_tokens``; a run with less cannot write a valid one)
CHECK_MAX_NEW_TOKENS = 40
#: modules whose code decides an entry's bytes (their sources are part of the cache key)
GENERATING_MODULES = (
    "vigos_megatron.training.tiny_demo",
    "vigos_megatron.testing.tiny_qwen",
    "vigos_megatron.testing.tiny_qwen3_vl",
    "vigos_megatron.testing.format_prior",
    "vigos_megatron.data.synthetic",
    "vigos_megatron.data.webdataset_writer",
    "vigos_megatron.data.contexts",
    "vigos_megatron.data.prompts",
    "vigos_megatron.data.images",
    "vigos_megatron.schedule.assembly",
    "vigos_megatron.rollout.segments",
    "vigos_megatron.rollout.sampling",
    # the self-check samples through the rollout engine
    "vigos_megatron.rollout.engine",
    "vigos_megatron.rollout.kv_cache",
    "vigos_megatron.rollout.cached_forward",
    "vigos_megatron.rollout.prompt_batch",
)
#: ``tiny.family`` -> the module whose ``write_tiny_checkpoint`` writes the random checkpoint
TINY_WRITERS = {"qwen2_5_vl": "vigos_megatron.testing.tiny_qwen", "qwen3_vl": "vigos_megatron.testing.tiny_qwen3_vl"}
CACHE_ENV = "VIGOS_CACHE_DIR"
READY = "report.json"
#: variables of a torchrun launch that the builder process must not inherit
_LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
               "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vigos-megatron"


def asset_spec(cfg: "PretrainConfig") -> dict:
    """What decides a run's assets (a :class:`~vigos_megatron.config.train.PretrainConfig`), as JSON data."""
    ctx = cfg.data.context
    return {
        "tiny": dataclasses.asdict(cfg.tiny) | {"enabled": True},
        "context": {"prompts": Path(ctx.prompts_path).read_text(), "min_pixels": ctx.min_pixels,
                    "max_pixels": ctx.max_pixels, "max_prompt_tokens": ctx.max_prompt_tokens},
        # how the self-check samples: the run's settings, at the completion length the format needs
        "sampling": {k: v for k, v in dataclasses.asdict(cfg.sampling).items()
                     if k not in ("max_new_tokens", "max_batch_size")},
    }


def _source(module: str) -> Path:
    """The file of ``module`` (``vigos_megatron.x.y``), found without importing its packages (the
    launcher must not import megatron)."""
    import vigos_megatron

    return Path(vigos_megatron.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")


def asset_key(spec: dict) -> str:
    from importlib.metadata import version

    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(f"torch {version('torch')} transformers {version('transformers')}".encode())
    for name in GENERATING_MODULES:
        h.update(name.encode())
        h.update(_source(name).read_bytes())
    return h.hexdigest()[:16]


def asset_paths(entry: Path) -> dict[str, Path]:
    return {"hf": entry / "hf", "teacher": entry / "teacher_hf", "parquet": entry / "parquet",
            "shards": entry / "shards", "report": entry / READY}


def ensure_tiny_assets(cfg: "PretrainConfig", *, log=print) -> dict[str, Path]:
    """The cache entry of ``cfg``'s assets, built first when absent (call on ONE rank; needs no process group)."""
    spec = asset_spec(cfg)
    entry = cache_root() / "tiny" / asset_key(spec)
    paths = asset_paths(entry)
    if paths["report"].is_file():
        return paths
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same entry
        if paths["report"].is_file():
            return paths
        for stale in entry.parent.glob(f"{entry.name}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
        log(f"[vigos] tiny assets: building {entry} (once; later launches and the tests reuse it)")
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
        proc = subprocess.run([sys.executable, "-m", "vigos_megatron.training.tiny_demo", str(tmp / "spec.json"),
                               str(tmp)], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"tiny assets: building {entry} failed (exit code {proc.returncode}; its output is above)")
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
        log(f"[vigos] tiny assets: ready in {time.perf_counter() - t0:.0f} s")
    return paths


def prepare_tiny_run(cfg: "PretrainConfig", *, log=print) -> "PretrainConfig":
    """Under a process group: rank 0 makes sure the assets exist, the others wait; returns ``cfg``
    pointed at them."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        ensure_tiny_assets(cfg, log=log)
    if dist.is_initialized():
        dist.barrier()
    return with_tiny_paths(cfg)


def with_tiny_paths(cfg: "PretrainConfig") -> "PretrainConfig":
    """``cfg`` (a :class:`~vigos_megatron.config.train.PretrainConfig`) pointed at its asset cache entry."""
    paths = asset_paths(cache_root() / "tiny" / asset_key(asset_spec(cfg)))
    model = dataclasses.replace(cfg.model, hf_path=str(paths["hf"]))
    if cfg.tiny.teacher != "none":
        model = dataclasses.replace(model, teacher=dataclasses.replace(model.teacher, hf_path=str(paths["teacher"])))
    loader = dataclasses.replace(cfg.data.loader, shards_dir=str(paths["shards"]))
    context = dataclasses.replace(cfg.data.context, processor_path=str(paths["hf"]))
    data = dataclasses.replace(cfg.data, loader=loader, context=context)
    return dataclasses.replace(cfg, model=model, data=data)


# --------------------------------------------------------------------------- the builder (own process)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' per-file progress bars (loading / writing the tiny checkpoint) are not for the console."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def write_tiny_assets(out_dir, *, samples: int, seed: int, family: str = "qwen2_5_vl",
                      teacher: str = "none") -> dict[str, Path]:
    """The random checkpoint of ``family`` and ``samples`` synthetic shard samples under ``out_dir`` (no warm
    start); with ``teacher="larger"`` also a teacher of another size (the writer's ``TEACHER_TEXT_SIZE``,
    seed ``seed + 1``)."""
    import importlib

    from vigos_megatron.data.synthetic import image_bytes, typical_rows, write_parquet
    from vigos_megatron.data.webdataset_writer import convert

    writer = importlib.import_module(TINY_WRITERS[family])

    paths = asset_paths(Path(out_dir))
    rows = typical_rows(samples, width=TINY_IMAGE_SIZE[0], height=TINY_IMAGE_SIZE[1], prefix="tiny", seed=seed)
    for i, r in enumerate(rows):
        r["images"] = {"bytes": image_bytes(*TINY_IMAGE_SIZE, seed=seed + 1000 + i), "path": f"tiny{i}.jpg"}
    parquet = write_parquet(paths["parquet"] / "tiny.parquet", rows)
    convert([str(parquet)], str(paths["shards"]), samples_per_shard=max(1, samples // 4), progress=None)
    with _no_progress_bars():
        writer.write_tiny_checkpoint(paths["hf"], seed=seed)
        if teacher != "none":
            writer.write_tiny_checkpoint(paths["teacher"], seed=seed + 1, text_size=writer.TEACHER_TEXT_SIZE)
    return paths


def _encoded_samples(paths: dict, spec: dict, seed: int) -> list[dict]:
    """Every shard sample with the warm start's contexts, in file order."""
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.loader import StreamingLoader
    from vigos_megatron.testing.format_prior import CONTEXTS

    c = spec["context"]
    prompts = paths["hf"].parent / "prompts.yaml"  # the run's prompt templates, as hashed into the key
    prompts.write_text(c["prompts"])
    encode = ContextEncoder(paths["hf"], prompts, min_pixels=c["min_pixels"],
                            max_pixels=c["max_pixels"], max_prompt_tokens=c["max_prompt_tokens"], contexts=CONTEXTS)
    n = json.loads((paths["shards"] / "manifest.json").read_text())["counts"]["converted"]
    loader = StreamingLoader(paths["shards"], rank=0, world_size=1, batch_size=n, seed=seed, num_workers=0,
                             shuffle_shards=False, shuffle_buffer=1, prefetch_factor=None, encode=encode)
    return next(iter(loader))["samples"]


def build(spec: dict, out_dir: Path, *, log=print) -> dict:
    """Write the assets of ``spec`` (:func:`asset_spec`) under ``out_dir``; returns the report."""
    from vigos_megatron.config.sampling import SamplingConfig
    from vigos_megatron.testing.format_prior import FormatPrior, check_format

    t = spec["tiny"]
    log(f"[vigos] tiny assets: {t['samples']} synthetic samples -> shards; random {t['family']} checkpoint "
        f"(seed {t['seed']})" + (f" and a {t['teacher']} teacher (seed {t['seed'] + 1})" if t["teacher"] != "none" else ""))
    paths = write_tiny_assets(out_dir, samples=t["samples"], seed=t["seed"], family=t["family"], teacher=t["teacher"])
    report: dict = {"format_prior_steps": 0, "checks": []}
    if t["format_prior_steps"] > 0:
        samples = _encoded_samples(paths, spec, t["seed"])
        sampling = SamplingConfig(**spec["sampling"], max_new_tokens=CHECK_MAX_NEW_TOKENS)
        checked = samples[: t["check_prompts"]]
        with _no_progress_bars():
            prior = FormatPrior(paths["hf"], samples, seed=t["seed"])
            while True:
                loss = prior.train(t["format_prior_steps"], log=lambda m: log(f"[vigos] tiny assets: {m}"))
                prior.save()
                valid, total, reasons = check_format(paths["hf"], checked, sampling)
                rate = valid / total
                report["checks"].append({"steps": prior.steps, "loss": loss, "valid": valid, "total": total})
                log(f"[vigos] tiny assets: self-check after {prior.steps} steps: {valid}/{total} sampled "
                    f"completions valid ({rate:.0%}; tiny.min_valid_rate {t['min_valid_rate']:.0%})")
                if rate >= t["min_valid_rate"]:
                    break
                if prior.steps + t["format_prior_steps"] > t["format_prior_max_steps"]:
                    log(f"[vigos] tiny assets: the format warm start reached a valid rate of {rate:.0%} < "
                        f"tiny.min_valid_rate {t['min_valid_rate']:.0%} after {prior.steps} steps "
                        f"(tiny.format_prior_max_steps {t['format_prior_max_steps']}); invalid: {sorted(set(reasons))}")
                    raise SystemExit(1)
        report["format_prior_steps"] = prior.steps
        report["valid_rate"] = rate
        if t["teacher"] != "none":  # the teacher gets the student's warm start (its rollouts are not checked)
            with _no_progress_bars():
                teacher = FormatPrior(paths["teacher"], samples, seed=t["seed"] + 1)
                report["teacher_loss"] = teacher.train(prior.steps, log=lambda m: log(f"[vigos] tiny teacher: {m}"))
                teacher.save()
    shutil.rmtree(paths["parquet"], ignore_errors=True)
    paths["report"].write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m vigos_megatron.training.tiny_demo SPEC.json OUT_DIR", file=sys.stderr)
        return 2
    from vigos_megatron.training.console import print_line, quiet_library_logs

    quiet_library_logs(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build(json.loads(Path(argv[0]).read_text()), Path(argv[1]), log=print_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
