"""A run directory's checkpoints as files: which are complete, which are not, what they were trained with.

Needs neither torch nor megatron (the launcher reads it before any rank starts). The collective
save and load are in :mod:`vigos_megatron.training.checkpoint`.

Complete or ignored
-------------------
A training save writes ``RUN/iter_<step>/`` (megatron ``dist_checkpointing``), then rank 0
checks it (every file that the checkpoint's ``.metadata`` lists is there with the size written,
:func:`vigos_megatron.training.checkpoint.verify_checkpoint`), then writes :data:`MANIFEST`
(``vigos_complete.json``: the step, every file with its size, the run's settings) with fsync,
and only then moves the tracker ``latest_checkpointed_iteration.txt``. So:

* an ``iter_*`` directory with a manifest is complete (when its files still match it);
* one without a manifest is complete only if it predates manifests (written by an older version)
  and the tracker has passed it; every other one is the debris of an interrupted save. At the
  next launch such directories are named and moved into ``RUN/abandoned/`` (never deleted, never
  loaded);
* ``checkpoint.keep_last: N`` removes complete checkpoints older than the newest ``N`` after a
  newer one is complete (a removal is a rename to ``RUN/.deleting-iter_*`` first, so a removal cut
  short never looks like a checkpoint).

``iter_0000000`` (the initial weights that ``tools/convert_hf_to_megatron.py`` writes) is never a
training checkpoint: it is neither resumed from, moved nor removed.

Settings stored with a checkpoint
---------------------------------
:func:`run_settings` is what the run was trained with, grouped: the objective and its weights,
the initial model, the data stream, the optimizer, the parallel layout. Resuming compares them
(:func:`settings_changes`): a layout change is allowed (the checkpoint reshards) and printed; any
other change is refused unless ``checkpoint.allow_changes=true``. Values are compared by content
where paths may move (the model's ``config.json`` and weight-file sizes, the shards' manifest,
the prompt file), and printed with the paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vigos_megatron.errors import ConfigError

TRACKER_FILE = "latest_checkpointed_iteration.txt"  # = convert.megatron_checkpoint.TRACKER_FILE
MANIFEST = "vigos_complete.json"
MANIFEST_VERSION = 1
ABANDONED_DIR = "abandoned"
DELETING_PREFIX = ".deleting-"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
#: settings groups compared on resume; changes of LAYOUT are allowed without the flag
LAYOUT = "layout"
GROUPS = ("objective", "model", "data", "optimizer", LAYOUT)


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def fsync_dir(path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path, data) -> None:
    """``data`` as JSON at ``path``: a temporary file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- tracker


@dataclass
class Tracker:
    """The tracker file of a run directory: ``value`` (None when absent or unreadable) and ``problem``."""

    value: int | None
    problem: str | None = None


def read_tracker(run_dir) -> Tracker:
    path = Path(run_dir) / TRACKER_FILE
    if not path.exists():
        return Tracker(None)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return Tracker(None, f"{path}: unreadable ({e})")
    try:
        value = int(text.strip())
    except ValueError:
        shown = text.strip()[:40]
        return Tracker(None, f"{path}: expected an iteration number, got {shown!r}")
    if value < 0:
        return Tracker(None, f"{path}: expected an iteration number, got {value}")
    return Tracker(value)


# --------------------------------------------------------------------------- manifest


def read_manifest(ckpt_dir) -> tuple[dict | None, str | None]:
    """``(manifest, problem)``: (None, None) when there is none; (None, why) when it is unreadable."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("not a manifest object")
        return data, None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"{path}: unreadable ({e})"


def file_sizes(ckpt_dir, names) -> dict[str, int]:
    root = Path(ckpt_dir)
    return {name: (root / name).stat().st_size for name in sorted(names)}


def check_manifest_files(ckpt_dir, manifest: dict) -> str | None:
    """The first file of ``manifest`` that is missing or has another size, as one line; None when all match."""
    root = Path(ckpt_dir)
    for name, size in sorted(manifest["files"].items()):
        p = root / name
        if not p.is_file():
            return f"{p}: missing (the checkpoint lists it)"
        have = p.stat().st_size
        if have != int(size):
            return f"{p}: {have} bytes, {size} written (truncated or overwritten)"
    return None


def write_manifest(ckpt_dir, *, step: int, files: dict[str, int], settings: dict | None) -> None:
    write_json_atomic(Path(ckpt_dir) / MANIFEST, {
        "version": MANIFEST_VERSION, "step": int(step), "files": files, "settings": settings,
        "written_unix": round(time.time(), 3),
    })


# --------------------------------------------------------------------------- scanning a run directory


@dataclass
class Entry:
    step: int
    path: Path
    manifest: dict | None = None
    #: "complete", "legacy" (no manifest, before the tracker: written by an older version), "incomplete"
    state: str = "incomplete"
    why: str = ""


@dataclass
class RunScan:
    """What :func:`scan_run` found: complete checkpoints (newest first) and the rest."""

    run_dir: Path
    tracker: Tracker
    complete: list[Entry] = field(default_factory=list)
    incomplete: list[Entry] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)

    @property
    def newest(self) -> Entry | None:
        return self.complete[0] if self.complete else None


def iteration_dirs(run_dir) -> list[tuple[int, Path]]:
    run = Path(run_dir)
    if not run.is_dir():
        return []
    out = []
    for p in run.iterdir():
        m = _ITER_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def scan_run(run_dir) -> RunScan:
    """Classify the ``iter_*`` directories of ``run_dir`` (file reads only; no checkpoint is opened)."""
    run = Path(run_dir)
    scan = RunScan(run, read_tracker(run))
    tracked = scan.tracker.value
    for step, path in iteration_dirs(run):
        if step == 0:
            continue  # the converter's initial weights
        manifest, problem = read_manifest(path)
        if manifest is not None:
            scan.complete.append(Entry(step, path, manifest, "complete"))
        elif problem:
            scan.incomplete.append(Entry(step, path, None, "incomplete", problem))
        elif tracked is not None and step <= tracked and (path / "metadata.json").is_file():
            scan.complete.append(Entry(step, path, None, "legacy"))
        else:
            why = f"no {MANIFEST}, the mark of a finished save"
            if not any(path.iterdir()):
                why = "empty"
            scan.incomplete.append(Entry(step, path, None, "incomplete", why))
    scan.complete.sort(key=lambda e: -e.step)
    if run.is_dir():
        scan.leftovers = sorted(p for p in run.iterdir() if p.name.startswith(DELETING_PREFIX))
    return scan


def move_aside(path, run_dir) -> Path:
    """Rename ``path`` into ``RUN/abandoned/`` (a numbered suffix when the name is taken). Returns the new path."""
    dest_dir = Path(run_dir) / ABANDONED_DIR
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / Path(path).name
    n = 1
    while dest.exists():
        n += 1
        dest = dest_dir / f"{Path(path).name}.{n}"
    os.replace(path, dest)
    fsync_dir(Path(run_dir))
    return dest


def remove_checkpoint(path) -> None:
    """Rename to ``.deleting-<name>`` (atomic: never half a checkpoint under its own name), then delete."""
    path = Path(path)
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}.{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(run_dir, keep_last: int, *, log=None) -> list[Path]:
    """Remove complete checkpoints older than the newest ``keep_last`` (0: keep all). Returns those removed."""
    if keep_last <= 0:
        return []
    scan = scan_run(run_dir)
    removed = []
    for entry in scan.complete[keep_last:]:
        remove_checkpoint(entry.path)
        removed.append(entry.path)
    if removed and log:
        log(f"[vigos] checkpoint.keep_last={keep_last}: removed {', '.join(p.name for p in removed)}")
    return removed


def remove_leftovers(scan: RunScan) -> None:
    for p in scan.leftovers:  # removals cut short (their checkpoints had been superseded)
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- settings


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _weights_identity(directory: str) -> dict | None:
    """Content identity of an HF or checkpoint directory: its config and its weight files' names and sizes."""
    if not directory:
        return None
    d = Path(directory)
    h = hashlib.sha256()
    for cfg in (d / "config.json", d / "hf" / "config.json"):
        if cfg.is_file():
            h.update(cfg.read_bytes())
            break
    names = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".distcp")) \
        if d.is_dir() else []
    for p in names:
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return {"path": str(d.resolve()), "id": h.hexdigest()[:16]}


def _value(v):
    if isinstance(v, dict) and "id" in v:
        return v["path"]
    return v


def run_settings(cfg, layout) -> dict:
    """What a run is trained with (a :class:`~vigos_megatron.config.train.PretrainConfig` whose paths are
    final, and its :class:`~vigos_megatron.config.train.Layout`), as JSON data grouped by :data:`GROUPS`."""
    loss = cfg.loss
    objective = {"loss.objective": loss.objective}
    section = getattr(loss, loss.objective, None)
    if dataclasses.is_dataclass(section):
        for k, v in dataclasses.asdict(section).items():
            objective[f"loss.{loss.objective}.{k}"] = v
    m = cfg.model
    model = {"model.initial_weights": _weights_identity(m.init_checkpoint or m.hf_path),
             "model.teacher": _weights_identity(m.teacher.init_checkpoint or m.teacher.hf_path),
             "model.dtype": m.dtype,
             "model.freeze_vision": m.freeze_vision}
    lc, cc = cfg.data.loader, cfg.data.context
    shards = Path(lc.shards_dir) if lc.shards_dir else None
    data = {
        "data.loader.shards_dir": {"path": str(shards.resolve()) if shards else "",
                                   "id": _sha256_file(shards / "manifest.json") if shards else None},
        "data.loader.seed": lc.seed, "data.loader.shuffle_shards": lc.shuffle_shards,
        "data.loader.shuffle_buffer": lc.shuffle_buffer, "train.global_batch_size": cfg.train.global_batch_size,
        "data.context.prompts_path": {"path": str(Path(cc.prompts_path).resolve()),
                                      "id": _sha256_file(Path(cc.prompts_path))},
        "data.context.min_pixels": cc.min_pixels, "data.context.max_pixels": cc.max_pixels,
        "data.context.max_prompt_tokens": cc.max_prompt_tokens, "data.context.contexts": list(cc.contexts),
        "data.context.reasoning_teacher_sees_description": cc.reasoning_teacher_sees_description,
    }
    o = cfg.optimizer
    optimizer = {f"optimizer.{k}": getattr(o, k) for k in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2",
                                                             "adam_eps", "clip_grad", "warmup_steps", "decay_style")}
    lay = {"parallel.tp": layout.tp, "parallel.pp": layout.pp, "data-parallel size": layout.dp}
    return {"objective": objective, "model": model, "data": data, "optimizer": optimizer, LAYOUT: lay}


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and "id" in a and "id" in b:
        return a["id"] == b["id"]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def settings_changes(saved: dict | None, now: dict) -> dict[str, list[str]]:
    """``{group: ["key a -> b", ...]}`` for the settings that differ (keys present on both sides only:
    a setting added by a later version is not a change)."""
    out: dict[str, list[str]] = {}
    if not saved:
        return out
    for group in GROUPS:
        a, b = saved.get(group) or {}, now.get(group) or {}
        for key in a:
            if key in b and not _same(a[key], b[key]):
                va, vb = _value(a[key]), _value(b[key])
                if va == vb:  # same path, other content
                    vb = f"{vb} (its content changed)"
                out.setdefault(group, []).append(f"{key} {va} -> {vb}")
    return out


def describe_changes(changes: dict[str, list[str]], groups=None) -> str:
    groups = [g for g in (groups or GROUPS) if g in changes]
    return "; ".join(f"{g}: {', '.join(changes[g])}" for g in groups)


class ResumeRefused(ConfigError):
    """The run directory's checkpoint was trained with other settings (``checkpoint.allow_changes``)."""

    hint = ("checkpoint.allow_changes=true continues this run with the new settings; another run_dir starts a "
            "new run")


def refusal(ckpt: Path, changes: dict[str, list[str]]) -> str | None:
    """The one line that refuses a resume whose settings (other than the layout) changed, or None."""
    other = [g for g in GROUPS if g != LAYOUT and g in changes]
    if not other:
        return None
    return (f"checkpoint.allow_changes: {ckpt} was trained with other settings ({describe_changes(changes, other)}); "
            f"to continue this run with them set checkpoint.allow_changes=true, or start a new run with another "
            f"run_dir")
