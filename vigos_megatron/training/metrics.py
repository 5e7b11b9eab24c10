"""Per-step metrics: ``<run_dir>/metrics.jsonl``, TensorBoard, and a readable progress line.

Exactly one rank writes (the caller decides: TP rank 0 of the last pipeline stage, DP rank 0)
and constructs :class:`MetricsWriter` with ``enabled=True``; every other rank passes
``enabled=False`` and its calls do nothing.

``metrics.jsonl`` holds one JSON object per optimizer step, ``{"step": 1, "loss": ..., ...}``
(``step`` is 1 after the first optimizer step). On resume from a checkpoint of step ``k`` the
lines with ``step > k`` (written after that checkpoint by the interrupted launch) are dropped
first, atomically (a temporary file renamed over the original), so the file reads as one
uninterrupted run. Non-finite values are written as JSON ``null`` (strict JSON).

TensorBoard: the same scalars under ``<run_dir>/tensorboard`` with
``torch.utils.tensorboard.SummaryWriter`` when the ``tensorboard`` package is importable;
otherwise one warning and the JSONL file alone.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vigos_megatron.collectives import all_reduce

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.rollout.engine import GenerationStats
    from vigos_megatron.training.rollouts import Rollout

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_TB_WARNED = False


def _tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """``SummaryWriter(log_dir)``, or None (with one warning per process) when tensorboard is missing.

    ``purge_step``: events at this step and later, left by an interrupted launch, are superseded."""
    global _TB_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the `tensorboard` package
        if not _TB_WARNED:
            warnings.warn(f"TensorBoard logging disabled: {e} (install the `tensorboard` package); "
                          f"metrics still go to {METRICS_FILE}")
            _TB_WARNED = True
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _json_value(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    f = float(v)
    if f.is_integer() and isinstance(v, int):
        return int(v)
    return f if math.isfinite(f) else None


def truncate_metrics(path, resume_step: int) -> int:
    """Drop the lines of ``path`` whose ``"step"`` exceeds ``resume_step`` (atomic rewrite).

    Returns the number of lines dropped. A torn last line (a crash mid-write) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if not line.endswith("\n"):  # torn final line
                    dropped += 1
                    continue
                raise ValueError(f"{path}:{lineno}: not a metrics line (JSON object with a 'step')") from None
            if step > resume_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Writes one metrics line per step (see the module docstring).

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        enabled: False on every rank but the one that logs (then nothing is touched).
        tensorboard: also write TensorBoard scalars (if the package is installed).
        resume_step: the checkpoint step this launch resumed from (None: a fresh run; an
            existing ``metrics.jsonl`` of a fresh run is truncated to nothing, ``resume_step=0``).
    """

    def __init__(self, run_dir, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_on_resume = truncate_metrics(self.path, resume_step or 0)
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = _tensorboard_writer(Path(run_dir) / TENSORBOARD_DIR, purge_step=(resume_step or 0) + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step": step, **metrics}`` (flushed) and the same scalars to TensorBoard."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("metrics: 'step' is passed separately")
        record = {"step": int(step)}
        record.update({k: _json_value(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, float(v), global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        return f"{v:.3e}" if (a and (a < 1e-3 or a >= 1e5)) else f"{v:.4g}"  # 4 significant digits
    return str(v)


#: shown first, in this order, with these labels (the rest follow alphabetically)
_LEADING = (("loss", "loss"), ("grad_norm", "gnorm"), ("lr", "lr"), ("tokens_per_s", "tok/s"),
            ("rollout_time_s", "rollout s"), ("update_time_s", "update s"))


def format_progress(step: int, total: int, metrics: dict) -> str:
    """One readable line: ``step 3/20 | loss 0.04123 | gnorm 0.6407 | lr 7.750e-04 | tok/s 812.3 |
    rollout s 1.2 | update s 0.8 | <other keys, alphabetically>`` (4 significant digits; values
    below 1e-3 or from 1e5 up in exponent form)."""
    parts = [f"step {step}/{total}"]
    seen = set()
    for key, label in _LEADING:
        if key in metrics:
            parts.append(f"{label} {_fmt(metrics[key])}")
            seen.add(key)
    for key in sorted(k for k in metrics if k not in seen):
        parts.append(f"{key} {_fmt(metrics[key])}")
    return " | ".join(parts)


class TermWatch:
    """A one-line notice when a loss term has no tokens in a step: once, and again when that changes.

    ``expected``: the objective's terms that a healthy step has tokens for
    (:attr:`~vigos_megatron.objectives.base.Objective.expected_terms`).
    """

    def __init__(self, expected: tuple[str, ...]):
        self.expected = expected
        self.missing: tuple[str, ...] = ()

    def check(self, step: int, metrics: dict) -> str | None:
        """The notice for this step's metrics line, or None when nothing changed."""
        missing = tuple(t for t in self.expected if f"term/{t}" not in metrics)
        if missing == self.missing:
            return None
        self.missing = missing
        if not missing:
            return f"[vigos] step {step}: every loss term has tokens again"
        trained = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("term/"))
        why = f"invalid rate {metrics['invalid_rate']:.2f}" if "invalid_rate" in metrics else "no such tokens"
        return (f"[vigos] warning: step {step}: no tokens for the {', '.join(missing)} term(s) ({why}); "
                f"this step trains only {', '.join(trained) or 'nothing'}")


# --------------------------------------------------------------------------- one step's line


def rollout_stats(rollouts: "list[Rollout]", dp_group, device) -> dict[str, float]:
    """Invalid-rollout rate, answer accuracy and segment token fractions over the global batch."""
    sums = torch.zeros(7, dtype=torch.float64)
    for r in rollouts:
        n = int(r.completion.numel())
        seg = r.segments
        sums += torch.tensor([
            1.0, float(not seg.valid), float(r.correct), n,
            (seg.description[1] - seg.description[0]) if seg.valid else 0,
            (seg.reasoning[1] - seg.reasoning[0]) if seg.valid else 0,
            float(r.finish_reason == "length"),
        ], dtype=torch.float64)
    sums = all_reduce(sums.to(device), dp_group)
    rows, invalid, correct, tokens, desc, rea, truncated = sums.tolist()
    rows_d, tok_d = max(rows, 1.0), max(tokens, 1.0)
    return {
        "rollouts": rows, "completion_tokens": tokens,
        "invalid_rate": invalid / rows_d, "rollout_accuracy": correct / rows_d, "truncated_rate": truncated / rows_d,
        "description_token_fraction": desc / tok_d, "reasoning_token_fraction": rea / tok_d,
        "mean_completion_tokens": tokens / rows_d,
    }


def step_metrics(result, stats: dict, *, rollout_s: float, update_s: float, step_s: float, dropped: int,
                 generation: "GenerationStats | None" = None) -> dict:
    """The metrics line of one step (``step`` is added by the writer).

    ``result``: the :class:`~vigos_megatron.training.update.UpdateResult`; ``stats``: :func:`rollout_stats`;
    ``dropped``: samples the loaders dropped since the run began, summed over data-parallel ranks;
    ``generation``: this rank's rollout-engine counters (``gen/*``: prefill and decode seconds,
    generated tokens per decode second; timings of data-parallel rank 0's engine).
    """
    reports = result.reports
    m = {"loss": result.loss, "applied": int(result.applied)}
    for key, value in sorted(reports.items()):
        # a term with no token in this step's global batch has no value (0/0): left out
        if (key.startswith("kl/") or key.startswith("vgs/")) and math.isfinite(value):
            m[f"term/{key.split('/', 1)[1]}"] = value
    m["clip_rate"] = reports.get("clip_fraction", 0.0)
    m.update({k: v for k, v in stats.items()})
    m.update({"grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": stats["completion_tokens"] / step_s,
              "rollout_time_s": rollout_s, "update_time_s": update_s, "step_time_s": step_s,
              "dropped_samples": dropped})
    if generation is not None:
        m.update({"gen/prefill_s": generation.prefill_seconds, "gen/decode_s": generation.decode_seconds,
                  "gen/decode_tokens_per_s": generation.generated_tokens / max(generation.decode_seconds, 1e-9)})
    return m


#: what the console line shows (metrics.jsonl has everything)
PROGRESS_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "rollout_time_s", "update_time_s", "invalid_rate",
                 "rollout_accuracy", "clip_rate")


def progress_fields(metrics: dict) -> dict:
    keys = PROGRESS_KEYS + tuple(k for k in metrics if k.startswith("term/"))
    return {k: metrics[k] for k in keys if k in metrics}


def is_metrics_rank(ps) -> bool:
    """TP rank 0 of the last pipeline stage, DP rank 0: exactly one rank writes metrics."""
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_data_parallel_rank() == 0)
