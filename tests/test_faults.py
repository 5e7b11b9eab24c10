"""Faults of a training run on one machine, each followed by the recovery a user (or a scheduler) does:
the next launch of the same command. Every run has the straight run's configuration (the shared
``straight_run`` fixture, tests/dist/fault_common.py) and its metrics must equal the straight run's
exactly after the recovery. Each test adds a row to the fault table printed at the end of the session.

* SIGTERM mid-step to the documented launch: it saves after the step and exits 0 (torchrun is its child);
  ``checkpoint.keep_last`` bounds the directory;
* SIGINT twice during a save: exit 75, the torn directory is named and moved aside at the next launch;
* kill -9 of one rank mid-step, and of rank 0 during a save;
* a truncated data file and a truncated ``.metadata`` in the newest checkpoint: one line naming the file,
  ``on_corrupt=stop`` exits 2 touching nothing, ``fallback`` resumes from the previous one;
* a corrupt tracker;
* a full disk during a save (a small tmpfs ``run_dir``; needs root);
* resume refusing a change of objective / loss weights (one line, exit 2), a layout change allowed and printed;
* ``checkpoint.async_save``: training goes on while a checkpoint is written, a SIGTERM waits for it, the resumed
  run equals the straight one.

The same faults under a real Slurm scheduler: tests/test_cluster.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

import fault_common as fc  # noqa: E402

pytestmark = pytest.mark.slow


def _row(table, test, fault, out, lost, run_dir, reference):
    diff = fc.differences(run_dir, reference)
    table.append({"test": test, "fault": fault, "printed": fc.key_lines(out), "steps lost": lost,
                  "equal": "yes" if not diff else f"NO: {diff[:3]}"})
    assert diff == [], diff


def test_sigterm_mid_step_saves_exits_0_and_resumes_exactly(straight_run, fault_table, tmp_path):
    """The documented launch with torchrun as its child: SIGTERM to the launcher during step 2 -> the ranks
    finish the step, save, exit 0. keep_last=2 keeps two checkpoints."""
    run = tmp_path / "run"
    launch = fc.start(run, "checkpoint.keep_last=2")
    launch.wait_for("step 2/4")
    launch.send(signal.SIGTERM)
    code = launch.wait()
    first = launch.output
    assert code == 0, first[-4000:]
    assert "[vigos] received SIGTERM" in first
    stopped = next(line for line in first.splitlines() if "[vigos] stopped on SIGTERM after step" in line)
    stop_step = int(stopped.split("after step ")[1].split(":")[0])
    assert "is complete; exit code 0 (the same command resumes)" in stopped
    assert "Traceback" not in first, first[-4000:]
    assert len(fc.iter_dirs(run)) <= 2 and fc.iter_dirs(run)[-1] == f"iter_{stop_step:07d}"
    code, out = fc.run(run, "checkpoint.keep_last=2")
    assert code == 0, out[-4000:]
    assert f"resuming at step {stop_step} of 4" in out
    assert fc.iter_dirs(run) == ["iter_0000003", "iter_0000004"]  # keep_last bounds the directory
    assert "checkpoint.keep_last=2: removed" in out
    _row(fault_table, "test_sigterm_mid_step_saves_exits_0_and_resumes_exactly",
         "SIGTERM to the documented launch (python examples/pretrain_vigos.py --nproc-per-node 2) during step 2",
         first + out, "0 (exit 0 after the save; resumed at step %d)" % stop_step, run, straight_run["metrics"])


def test_sigint_twice_during_a_save(straight_run, fault_table, tmp_path):
    """Ctrl-C, then Ctrl-C again 3 s later while the checkpoint of step 2 is being written: stop at once
    (exit 75); the directory without a manifest is moved aside at the next launch, step 2 is repeated."""
    run = tmp_path / "run"
    launch = fc.start(run, env=fc.pause_in_save(2, 8))
    launch.wait_for(fc.PAUSED)
    launch.send(signal.SIGINT)
    time.sleep(3)  # past the 2 s in which a repeat is the same stop
    launch.send(signal.SIGINT)
    code = launch.wait()
    first = launch.output
    assert code == 75, first[-4000:]
    assert "stopped at once on a repeated SIGINT before saving; the last complete checkpoint is step 1" in first
    assert not (run / "iter_0000002" / "vigos_complete.json").exists()
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    code, out = fc.run(run)
    assert code == 0, out[-4000:]
    assert f"{run / 'iter_0000002'}: incomplete" in out and f"moved to {run / 'abandoned' / 'iter_0000002'}" in out
    assert "resuming at step 1 of 4" in out and "held 1 step(s) after step 1" in out
    _row(fault_table, "test_sigint_twice_during_a_save", "SIGINT, then SIGINT 3 s later during the save of step 2",
         first + out, "1 (step 2; exit 75)", run, straight_run["metrics"])


def test_kill9_of_one_rank_mid_step(straight_run, fault_table, tmp_path):
    run = tmp_path / "run"
    launch = fc.start(run)
    launch.wait_for(f"saved checkpoint {run / 'iter_0000002'}")
    rank1 = launch.workers()[1]
    time.sleep(0.2)  # inside step 3
    rank1.kill()
    code = launch.wait()
    first = launch.output
    assert code == 1, first[-4000:]
    code, out = fc.run(run)
    assert code == 0, out[-4000:]
    assert "resuming at step 2 of 4" in out
    _row(fault_table, "test_kill9_of_one_rank_mid_step", "kill -9 of rank 1 during step 3", first + out,
         "step 3 (exit 1: torchrun reports the killed rank)", run, straight_run["metrics"])


def test_kill9_of_rank0_during_a_save(straight_run, fault_table, tmp_path):
    run = tmp_path / "run"
    launch = fc.start(run, env=fc.pause_in_save(2, 8))
    launch.wait_for(fc.PAUSED)
    launch.workers()[0].kill()
    code = launch.wait()
    first = launch.output
    assert code == 1, first[-4000:]
    code, out = fc.run(run)
    assert code == 0, out[-4000:]
    assert f"{run / 'iter_0000002'}: incomplete" in out and "resuming at step 1 of 4" in out
    _row(fault_table, "test_kill9_of_rank0_during_a_save", "kill -9 of rank 0 while iter_0000002 is written",
         first + out, "1 (step 2; exit 1)", run, straight_run["metrics"])


@pytest.mark.parametrize("what", ["data", "metadata"])
def test_truncated_file_in_the_newest_checkpoint(straight_run, fault_table, tmp_path, what):
    """A truncated ``__0_0.distcp`` (1 MB of 2) or ``.metadata`` (half) in iter_4: on_corrupt=stop exits 2 in one
    line naming the file and touches nothing; fallback moves iter_4 aside and repeats step 4 from iter_3."""
    run = fc.copy_run(straight_run["run_dir"], tmp_path / "run")
    name = "__0_0.distcp" if what == "data" else ".metadata"
    victim = run / "iter_0000004" / name
    size = victim.stat().st_size
    os.truncate(victim, 1 << 20 if what == "data" else size // 2)
    code, stop = fc.run(run, "checkpoint.on_corrupt=stop")
    assert code == 2, stop[-4000:]
    errors = [line for line in stop.splitlines() if line.startswith("pretrain_vigos: error:")]
    assert len(errors) == 1 and str(victim) in errors[0] and "on_corrupt=fallback resumes from it" in errors[0], stop
    assert "Traceback" not in stop and (run / "iter_0000004").is_dir()
    code, out = fc.run(run)
    assert code == 0, out[-4000:]
    assert f"{run / 'iter_0000004'} cannot be read: {victim}" in out
    assert f"falling back to {run / 'iter_0000003'} (the newest complete checkpoint): step 4 is repeated" in out
    assert (run / "abandoned" / "iter_0000004" / name).is_file()
    _row(fault_table, f"test_truncated_file_in_the_newest_checkpoint[{what}]",
         f"{name} of iter_0000004 truncated", stop + out, "1 (step 4; on_corrupt=stop: exit 2)", run,
         straight_run["metrics"])


def test_corrupt_tracker(straight_run, fault_table, tmp_path):
    """A run stopped after step 3 whose tracker is garbage: the newest complete checkpoint is found, named and
    resumed from; the tracker is rewritten."""
    run = fc.copy_run(straight_run["run_dir"], tmp_path / "run")
    import shutil

    shutil.rmtree(run / "iter_0000004")
    lines = (run / "metrics.jsonl").read_text().splitlines()[:3]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "latest_checkpointed_iteration.txt").write_text("\x00\x17garbage")
    code, out = fc.run(run)
    assert code == 0, out[-4000:]
    assert "latest_checkpointed_iteration.txt: expected an iteration number" in out
    assert "resuming from the newest complete checkpoint instead" in out and "resuming at step 3 of 4" in out
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    _row(fault_table, "test_corrupt_tracker", "latest_checkpointed_iteration.txt overwritten with bytes",
         out, "0", run, straight_run["metrics"])


@pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs run_dir (the full disk) needs root to mount")
def test_full_disk_during_a_save(straight_run, fault_table, tmp_path):
    """run_dir on a 7 MB tmpfs: the third checkpoint does not fit. One line names the directory and the last
    complete checkpoint (exit 1); with room again, the next launch moves the torn one aside and resumes."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        code, first = fc.run(run, "checkpoint.keep_last=0")
        assert code == 1, first[-4000:]
        line = next(x for x in first.splitlines() if x.startswith("pretrain_vigos: saving checkpoint"))
        assert "less than a checkpoint: a full disk" in line and "The last complete checkpoint is iter_0000002" in line, line
        assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        code, out = fc.run(run, "checkpoint.keep_last=0")
        assert code == 0, out[-4000:]
        assert f"{run / 'iter_0000003'}: incomplete" in out and "resuming at step 2 of 4" in out
        _row(fault_table, "test_full_disk_during_a_save", "run_dir on a 7 MB tmpfs: the save of step 3 fills it",
             first + out, "1 (step 3; exit 1)", run, straight_run["metrics"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_resume_checks_what_changed(straight_run, fault_table, tmp_path):
    """Another objective or other loss weights: refused by the launcher in one line listing the differences
    and the remedy (exit 2, no rank started); a layout change (TP=2 -> TP=1) is allowed and printed."""
    run = fc.copy_run(straight_run["run_dir"], tmp_path / "run")
    t0 = time.perf_counter()
    code, out = fc.run(run, "loss.objective=opsd")
    took = time.perf_counter() - t0
    assert code == 2, out[-4000:]
    errors = [line for line in out.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("pretrain_vigos: error: checkpoint.allow_changes: "), out
    assert "objective: loss.objective vigos -> opsd" in errors[0]
    assert "set checkpoint.allow_changes=true, or start a new run with another run_dir" in errors[0]
    code, out2 = fc.run(run, "loss.vigos.lambda_reference=1.0", "optimizer.lr=1e-4")
    assert code == 2 and "loss.vigos.lambda_reference 2.0 -> 1.0" in out2 and "optimizer.lr 0.0003 -> 0.0001" in out2
    # a layout change: TP=1 on one process resumes step 4 from iter_3 (the optimizer reshards)
    import shutil

    shutil.rmtree(run / "iter_0000004")
    code, out3 = fc.run(run, "parallel.tp=1", nproc=1)
    assert code == 0, out3[-4000:]
    assert "layout changed since iter_0000003: parallel.tp 2 -> 1 (the checkpoint reshards)" in out3
    fault_table.append({"test": "test_resume_checks_what_changed", "fault": "resume with loss.objective=opsd; "
                        "with other loss weights and lr; at TP=1", "printed": fc.key_lines(out + out2 + out3),
                        "steps lost": f"- (refused in {took:.1f} s, exit 2)", "equal": "- (layout change: loss "
                        "within fp32 reduction-order noise, tests/test_training.py)"})


def test_async_save_trains_on_and_resumes_exactly(straight_run, fault_table, tmp_path):
    """checkpoint.async_save=true: rank 0's forked writer of iter_0000001 is held 10 s while step 2 trains
    (its progress line comes first); SIGTERM during step 2 -> the launch completes that save, saves step 2,
    exits 0; the next launch (async too) resumes at step 2 and the metrics equal the straight run's."""
    run = tmp_path / "run"
    launch = fc.start(run, "checkpoint.async_save=true", env=fc.pause_in_save(1, 10, "__0_*.distcp"))
    launch.wait_for(fc.PAUSED)
    launch.send(signal.SIGTERM)
    code = launch.wait()
    first = launch.output
    assert code == 0, first[-4000:]
    background = f"[vigos] saved checkpoint {run / 'iter_0000001'} (written in the background)"
    assert first.index("step 2/4") < first.index(fc.PAUSE_OVER) < first.index(background), first[-4000:]
    assert "[vigos] stopped on SIGTERM after step 2" in first and "Traceback" not in first, first[-4000:]
    code, out = fc.run(run, "checkpoint.async_save=true")
    assert code == 0, out[-4000:]
    assert "resuming at step 2 of 4" in out and f"saved checkpoint {run / 'iter_0000003'} (written in" in out
    _row(fault_table, "test_async_save_trains_on_and_resumes_exactly",
         "checkpoint.async_save=true: the writer of iter_0000001 held 10 s while step 2 trains; SIGTERM during "
         "step 2", first + out, "0 (the stop waits for the save in the background; exit 0)", run,
         straight_run["metrics"])
