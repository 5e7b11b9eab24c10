"""Which checkpoint a launch resumes from, checked before it is read (see
:mod:`vigos_megatron.training.checkpoint`'s docstring, "Complete or ignored").

* :func:`verify_checkpoint`: a ``dist_checkpointing`` directory's files against its ``.metadata``
  (every listed file present, at the size written), without loading it;
* :func:`select_checkpoint` (collective; rank 0 reads and decides): incomplete directories moved
  aside and named, the newest complete checkpoint checked, a failing one reported in one line
  naming the file, ``checkpoint.on_corrupt`` applied (``fallback``: moved aside, the next older
  one, the steps repeated said; ``stop``: :class:`CorruptCheckpoint`, exit code 2);
* :func:`resume_training` (collective): the chosen checkpoint loaded
  (:func:`~vigos_megatron.training.checkpoint.load_training_checkpoint`), falling back again when a
  read fails on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vigos_megatron.models.hf_checkpoint import CheckpointError
from vigos_megatron.training import checkpoint_files as cf


def _dist():
    import torch.distributed as dist

    return dist if dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def verify_checkpoint(ckpt_dir) -> tuple[dict[str, int] | None, str | None]:
    """Check a ``dist_checkpointing`` directory without loading it: ``metadata.json`` and ``.metadata``
    readable, every data file that ``.metadata`` lists present with the size written (the end of its
    last item), ``hf/config.json`` present. Returns ``(every file with its size, None)`` or
    ``(None, one line naming the file)``."""
    import json

    from torch.distributed.checkpoint import FileSystemReader

    root = Path(ckpt_dir)
    config = root / "metadata.json"
    try:
        json.loads(config.read_text())
    except FileNotFoundError:
        return None, f"{config}: missing"
    except (OSError, ValueError) as e:
        return None, f"{config}: unreadable ({e})"
    meta_file = root / ".metadata"
    if not meta_file.is_file():
        return None, f"{meta_file}: missing"
    try:
        metadata = FileSystemReader(str(root)).read_metadata()
        ends: dict[str, int] = {}
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), int(info.offset) + int(info.length))
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
        return None, f"{meta_file}: unreadable ({type(e).__name__}: {str(e)[:200]})"
    for name, end in sorted(ends.items()):
        p = root / name
        if not p.is_file():
            return None, f"{p}: missing (listed in .metadata)"
        size = p.stat().st_size
        if size != end:
            return None, f"{p}: {size} bytes, {end} written ({'truncated' if size < end else 'longer than written'})"
    if not (root / "hf" / "config.json").is_file():
        return None, f"{root / 'hf' / 'config.json'}: missing"
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != cf.MANIFEST]
    return cf.file_sizes(root, files), None


def check_complete(entry: cf.Entry) -> str | None:
    """One line naming what is wrong with a complete checkpoint's files, or None (rank 0 only: file reads)."""
    if entry.manifest is not None:
        problem = cf.check_manifest_files(entry.path, entry.manifest)
        if problem:
            return problem
    return verify_checkpoint(entry.path)[1]


def read_errors() -> tuple:
    """What a failed checkpoint read or write raises: any ``Exception``, and torch's ``CheckpointException``
    (a ``BaseException``: it gathers every rank's failure)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def describe_error(error: BaseException) -> str:
    """One line for ``error``; for torch's ``CheckpointException`` the first rank's own error."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = sorted(failures.items())[0]
        inner = pair[0] if isinstance(pair, tuple) else pair
        text = " ".join(str(inner).split())
        return f"rank {rank}: {type(inner).__name__}: {text[:240]}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}"


class CorruptCheckpoint(CheckpointError):
    """No complete checkpoint to resume from (``checkpoint.on_corrupt``): exit code 2."""

    hint = ("checkpoint.on_corrupt=fallback resumes from the newest complete older checkpoint; or move the run "
            "directory away to start again")


class Unreadable(Exception):
    """A checkpoint failed while being read (not a mismatch of the model or the optimizer)."""

    def __init__(self, ckpt: Path, error: BaseException):
        self.ckpt, self.error = Path(ckpt), error
        super().__init__(f"{ckpt} cannot be read: {describe_read_error(ckpt, error)}")


def describe_read_error(ckpt, error: BaseException) -> str:
    """One line: the file the error names (else the directory) and the error's last line."""
    import re

    text = str(error)
    names = re.findall(r"[\w./-]*(?:__\d+_\d+\.distcp|\.metadata|common\.pt|metadata\.json)", text)
    where = f"{Path(ckpt) / Path(names[0]).name}: " if names else ""
    return f"{where}{describe_error(error)}"


@dataclass
class Selection:
    """What :func:`select_checkpoint` decided (the same on every rank)."""

    #: complete checkpoints to try, newest first: ``(step, directory)``; the first one passed the checks
    candidates: list = field(default_factory=list)
    #: the settings stored with the first candidate (None: written before settings were stored)
    settings: dict | None = None
    #: the newest step any checkpoint of the run directory reached (for the steps repeated)
    newest_step: int = 0

    @property
    def step(self) -> int:
        return self.candidates[0][0] if self.candidates else 0


def _repeated(chosen: int, newest: int) -> str:
    if newest <= chosen:
        return "no step is repeated"
    return f"step {newest} is repeated" if newest == chosen + 1 else f"steps {chosen + 1}..{newest} are repeated"


def _select_on_rank0(run: Path, on_corrupt: str, log) -> dict:
    scan = cf.scan_run(run)
    cf.remove_leftovers(scan)
    tracker = scan.tracker
    newest = max([e.step for e in scan.complete + scan.incomplete] + [tracker.value or 0])
    out = {"candidates": [], "settings": None, "newest_step": newest, "error": None}
    if tracker.problem:
        if on_corrupt == "stop":
            out["error"] = (f"checkpoint.on_corrupt=stop: {tracker.problem} (checkpoint.on_corrupt=fallback resumes "
                            "from the newest complete checkpoint)")
            return out
        log(f"[vigos] {tracker.problem}: resuming from the newest complete checkpoint instead")
    for e in scan.incomplete:
        moved = cf.move_aside(e.path, run)
        log(f"[vigos] {e.path}: incomplete: {e.why}: moved to {moved}, never loaded")
    bad = []
    chosen = None
    for e in scan.complete:
        problem = check_complete(e)
        if problem is None:
            chosen = e
            break
        log(f"[vigos] {e.path} cannot be read: {problem}")
        if on_corrupt == "stop":
            older = next((o for o in scan.complete if o.step < e.step), None)
            tail = (f"; the next older checkpoint is {older.path.name}: checkpoint.on_corrupt=fallback resumes from "
                    f"it" if older else "")
            out["error"] = f"checkpoint.on_corrupt=stop: {e.path} cannot be read: {problem}{tail}"
            return out
        bad.append(e)
    if tracker.value and not chosen and not bad and not (run / cf.iter_dir_name(tracker.value)).exists():
        out["error"] = (f"{run / cf.TRACKER_FILE} names iteration {tracker.value} but "
                        f"{run / cf.iter_dir_name(tracker.value)} does not exist: no complete checkpoint left to "
                        f"resume from in {run}")
        return out
    if bad and chosen is None:
        out["error"] = (f"checkpoint.on_corrupt=fallback: no complete checkpoint left in {run} "
                        f"({', '.join(e.path.name for e in bad)} cannot be read; see the lines above)")
        return out
    for e in bad:
        moved = cf.move_aside(e.path, run)
        log(f"[vigos] {e.path}: moved to {moved}, never loaded")
    if chosen is None:
        if tracker.problem:
            moved = cf.move_aside(run / cf.TRACKER_FILE, run)
            log(f"[vigos] no checkpoint to resume from: the unreadable tracker moved to {moved}")
        return out
    if bad:
        log(f"[vigos] falling back to {chosen.path} (the newest complete checkpoint): {_repeated(chosen.step, newest)}")
    if tracker.value != chosen.step:
        if not tracker.problem and not bad and tracker.value is not None and chosen.step > tracker.value:
            log(f"[vigos] {chosen.path} is complete although the tracker names iteration {tracker.value} (its save "
                "was cut short after the check): resuming from it")
        elif not bad and tracker.value and chosen.step < tracker.value:
            log(f"[vigos] {run / cf.TRACKER_FILE} names iteration {tracker.value}, which is not there: resuming from "
                f"{chosen.path}, the newest complete checkpoint: {_repeated(chosen.step, newest)}")
        from vigos_megatron.convert.megatron_checkpoint import write_tracker

        write_tracker(run, chosen.step)
    out["candidates"] = [(e.step, str(e.path)) for e in scan.complete if e not in bad]
    out["settings"] = (chosen.manifest or {}).get("settings")
    return out


def select_checkpoint(run_dir, *, on_corrupt: str = "fallback", log=print) -> Selection:
    """Which checkpoint of ``run_dir`` a launch resumes from (collective; rank 0 reads, moves and
    decides, the others receive its decision). See the module docstring; raises
    :class:`CorruptCheckpoint` (every rank) when ``on_corrupt`` says stop or nothing complete is left."""
    run = Path(run_dir)
    out = _select_on_rank0(run, on_corrupt, log) if _rank() == 0 and run.is_dir() else None
    d = _dist()
    if d and d.get_world_size() > 1:
        box = [out]
        d.broadcast_object_list(box, src=0)
        out = box[0]
    if out is None:
        return Selection()
    if out["error"]:
        raise CorruptCheckpoint(out["error"])
    return Selection(candidates=[(s, Path(p)) for s, p in out["candidates"]], settings=out["settings"],
                     newest_step=out["newest_step"])


def resume_training(selection: Selection, *, run_dir, on_corrupt: str = "fallback", log=print,
                    **load_kwargs) -> TrainState | None:
    """Load the first candidate of ``selection`` that reads (collective). A read error on any rank is
    reported by rank 0 in one line; ``on_corrupt="fallback"`` moves that checkpoint aside and tries
    the next one, ``"stop"`` raises :class:`CorruptCheckpoint`. ``load_kwargs``: those of
    :func:`load_training_checkpoint` but ``run_dir``. None when there is nothing to resume from."""
    from vigos_megatron.training.checkpoint import TrainState, load_training_checkpoint

    run = Path(run_dir)
    d = _dist()
    for i, (step, ckpt) in enumerate(selection.candidates):
        if i > 0 and _rank() == 0:  # pre-checked only the first one: check this one now
            problem = check_complete(cf.Entry(step, ckpt, cf.read_manifest(ckpt)[0], "complete"))
        else:
            problem = None
        if d and d.get_world_size() > 1:
            box = [problem]
            d.broadcast_object_list(box, src=0)
            problem = box[0]
        failure = problem
        if failure is None:
            try:
                state = load_training_checkpoint(run, ckpt=ckpt, **load_kwargs)
            except Unreadable as e:
                failure = describe_read_error(ckpt, e.error)
            else:
                state = state if state is not None else TrainState(step=step)
            failures = [failure]
            if d and d.get_world_size() > 1:
                failures = [None] * d.get_world_size()
                d.all_gather_object(failures, failure)
            failure = next((f for f in failures if f), None)
            if failure is None:
                if _rank() == 0 and i > 0:
                    from vigos_megatron.convert.megatron_checkpoint import write_tracker

                    write_tracker(run, step)
                    log(f"[vigos] falling back to {ckpt} (the newest complete checkpoint that reads): "
                        f"{_repeated(step, selection.newest_step)}")
                return state
        if _rank() == 0:
            log(f"[vigos] {ckpt} cannot be read: {failure}")
        if on_corrupt == "stop":
            raise CorruptCheckpoint(f"checkpoint.on_corrupt=stop: {ckpt} cannot be read: {failure}")
        if _rank() == 0:
            moved = cf.move_aside(ckpt, run)
            log(f"[vigos] {ckpt}: moved to {moved}, never loaded")
        _barrier()
    if selection.candidates:
        raise CorruptCheckpoint(f"checkpoint.on_corrupt=fallback: no complete checkpoint left in {run} "
                                "(see the lines above)")
    return None
