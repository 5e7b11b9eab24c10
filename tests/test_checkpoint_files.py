"""Checkpoints complete or ignored, without a model (vigos_megatron.training.checkpoint_files, and the file
side of vigos_megatron.training.checkpoint: verify_checkpoint, select_checkpoint in one process).

A stand-in checkpoint is a real torch distributed-checkpoint directory (``.metadata`` + ``__0_0.distcp``)
with megatron's ``metadata.json``, ``hf/config.json`` and the manifest a training save writes. The
end-to-end faults with the real training run: tests/test_faults.py, tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from vigos_megatron.training import checkpoint_files as cf


def fake_checkpoint(run: Path, step: int, *, manifest: bool = True, settings: dict | None = None) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    from vigos_megatron.training.checkpoint_resume import verify_checkpoint

    d = run / cf.iter_dir_name(step)
    d.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(50_000, dtype=torch.float32) + step}, checkpoint_id=str(d))
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{}")
    if manifest:
        files, problem = verify_checkpoint(d)
        assert problem is None, problem
        cf.write_manifest(d, step=step, files=files, settings=settings)
    return d


def tracker(run: Path, value) -> None:
    (run / cf.TRACKER_FILE).write_text(f"{value}\n")


def test_tracker_reading():
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        run = Path(t)
        assert cf.read_tracker(run) == cf.Tracker(None)
        tracker(run, 7)
        assert cf.read_tracker(run) == cf.Tracker(7)
        (run / cf.TRACKER_FILE).write_bytes(b"\x00\x17garbage")
        t2 = cf.read_tracker(run)
        assert t2.value is None and "expected an iteration number" in t2.problem and cf.TRACKER_FILE in t2.problem


def test_verify_names_the_truncated_or_missing_file(tmp_path):
    from vigos_megatron.training.checkpoint_resume import verify_checkpoint

    d = fake_checkpoint(tmp_path, 3)
    files, problem = verify_checkpoint(d)
    assert problem is None and set(files) >= {".metadata", "__0_0.distcp", "metadata.json", "hf/config.json"}
    data = d / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size // 2)
    assert cf.check_manifest_files(d, cf.read_manifest(d)[0]) == \
        f"{data}: {size // 2} bytes, {size} written (truncated or overwritten)"
    assert verify_checkpoint(d)[1] == f"{data}: {size // 2} bytes, {size} written (truncated)"
    data.unlink()
    assert verify_checkpoint(d)[1] == f"{data}: missing (listed in .metadata)"
    d4 = fake_checkpoint(tmp_path, 4)
    meta = d4 / ".metadata"
    os.truncate(meta, meta.stat().st_size // 2)
    problem = verify_checkpoint(d4)[1]
    assert problem.startswith(f"{meta}: unreadable (")


def test_scan_classifies_and_moves_aside(tmp_path):
    run = tmp_path
    fake_checkpoint(run, 1)
    fake_checkpoint(run, 2)
    fake_checkpoint(run, 3, manifest=False)  # a save cut short after the tensors
    (run / "iter_0000004").mkdir()  # an empty one (a second Ctrl-C before any file)
    fake_checkpoint(run, 0, manifest=False)  # the converter's initial weights: never touched
    tracker(run, 2)
    scan = cf.scan_run(run)
    assert [e.step for e in scan.complete] == [2, 1] and [e.step for e in scan.incomplete] == [3, 4]
    assert scan.incomplete[1].why == "empty" and cf.MANIFEST in scan.incomplete[0].why
    moved = cf.move_aside(scan.incomplete[0].path, run)
    assert moved == run / cf.ABANDONED_DIR / "iter_0000003" and moved.is_dir()
    (run / "iter_0000003").mkdir()
    assert cf.move_aside(run / "iter_0000003", run).name == "iter_0000003.2"  # never overwrites
    # a legacy checkpoint (before manifests): complete when the tracker has passed it
    fake_checkpoint(run, 5, manifest=False)
    tracker(run, 5)
    assert [(e.step, e.state) for e in cf.scan_run(run).complete][:1] == [(5, "legacy")]


def test_keep_last_removes_older_complete_checkpoints_only(tmp_path):
    run = tmp_path
    for step in (1, 2, 3, 4):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 0, manifest=False)
    (run / "iter_0000005").mkdir()  # incomplete: not counted, not removed
    tracker(run, 4)
    lines = []
    removed = cf.prune(run, 2, log=lines.append)
    assert [p.name for p in removed] == ["iter_0000002", "iter_0000001"]
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000000", "iter_0000003", "iter_0000004",
                                                          "iter_0000005"]
    assert lines == ["[vigos] checkpoint.keep_last=2: removed iter_0000002, iter_0000001"]
    assert not list(run.glob(f"{cf.DELETING_PREFIX}*")) and cf.prune(run, 0) == []


def test_select_falls_back_or_stops(tmp_path):
    from vigos_megatron.training.checkpoint_resume import CorruptCheckpoint, select_checkpoint

    run = tmp_path
    for step in (1, 2, 3):
        fake_checkpoint(run, step, settings={"objective": {"loss.objective": "vigos"}})
    (run / "iter_0000004").mkdir()
    tracker(run, 3)
    data = run / "iter_0000003" / "__0_0.distcp"
    os.truncate(data, 100)
    lines = []
    with pytest.raises(CorruptCheckpoint, match="on_corrupt=fallback resumes from it"):
        select_checkpoint(run, on_corrupt="stop", log=lines.append)
    assert (run / "iter_0000003").is_dir()  # stop touches nothing (the incomplete one is still moved aside)
    lines.clear()
    sel = select_checkpoint(run, on_corrupt="fallback", log=lines.append)
    assert [s for s, _ in sel.candidates] == [2, 1] and sel.settings == {"objective": {"loss.objective": "vigos"}}
    assert any(f"{run / 'iter_0000003'} cannot be read: {data}: 100 bytes" in x for x in lines), lines
    assert any("falling back to" in x and "iter_0000002" in x and "step 3 is repeated" in x for x in lines), lines
    assert cf.read_tracker(run).value == 2 and (run / cf.ABANDONED_DIR / "iter_0000003").is_dir()
    # nothing complete left: exit 2's error
    os.truncate(run / "iter_0000002" / "__0_0.distcp", 100)
    os.truncate(run / "iter_0000001" / "__0_0.distcp", 100)
    with pytest.raises(CorruptCheckpoint, match="no complete checkpoint left"):
        select_checkpoint(run, log=lines.append)


def test_select_with_a_corrupt_tracker(tmp_path):
    from vigos_megatron.training.checkpoint_resume import CorruptCheckpoint, select_checkpoint

    run = tmp_path
    fake_checkpoint(run, 1)
    fake_checkpoint(run, 2)
    (run / cf.TRACKER_FILE).write_text("garbage")
    with pytest.raises(CorruptCheckpoint, match="expected an iteration number"):
        select_checkpoint(run, on_corrupt="stop", log=lambda _: None)
    lines = []
    sel = select_checkpoint(run, log=lines.append)
    assert sel.step == 2 and cf.read_tracker(run).value == 2
    assert "resuming from the newest complete checkpoint instead" in lines[0]
    # the tracker names a checkpoint that is gone: said so, resumed from the newest complete one
    tracker(run, 9)
    lines.clear()
    assert select_checkpoint(run, log=lines.append).step == 2
    assert "names iteration 9, which is not there" in lines[0] and "steps 3..9 are repeated" in lines[0]


def test_settings_changes_and_the_refusal_line():
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    root = Path(__file__).resolve().parents[1]

    def settings(*ov, world=2):
        cfg = load_config(PretrainConfig, root / "conf" / "tiny_cpu.yaml", ["run_dir=/x", *ov])
        return cf.run_settings(cfg, validate_layout(cfg, world))

    base = settings()
    json.dumps(base)  # stored in the manifest as JSON
    assert cf.settings_changes(base, settings()) == {}
    changed = cf.settings_changes(base, settings("loss.objective=opsd", "parallel.tp=1", world=1))
    assert changed["objective"][0] == "loss.objective vigos -> opsd" and "parallel.tp 2 -> 1" in changed["layout"]
    line = cf.refusal(Path("/r/iter_0000004"), changed)
    assert line.startswith("checkpoint.allow_changes: /r/iter_0000004 was trained with other settings (objective: ")
    assert "parallel.tp" not in line and "set checkpoint.allow_changes=true, or start a new run" in line
    assert cf.refusal(Path("/r"), cf.settings_changes(base, settings("parallel.tp=1", world=1))) is None
    assert cf.settings_changes(base, settings("optimizer.lr=1e-3"))["optimizer"] == ["optimizer.lr 0.0003 -> 0.001"]
    assert "data" in cf.settings_changes(base, settings("data.loader.seed=7"))
    # a setting this version does not store is not a change (a later version added it)
    older = json.loads(json.dumps(base))
    del older["optimizer"]["optimizer.lr"]
    assert cf.settings_changes(older, settings("optimizer.lr=1e-3")) == {}
    # the unchosen objectives' weights are not part of it
    assert cf.settings_changes(base, settings("loss.opsd.clip=0.3")) == {}
