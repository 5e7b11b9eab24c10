"""Training under a real Slurm scheduler: a one-node cluster on this machine (tools/slurm_cluster.sh:
munged, mariadbd + slurmdbd for sacct, slurmctld, slurmd), the tiny demo on the CPU.

* NeMo-Run submits ``examples/launch_nemo_run.py --config conf/tiny_cpu.yaml --cpu --executor slurm``
  for real; the job is COMPLETED in ``sacct`` and its metrics equal the straight torchrun-launched run's;
* preemption the way clusters do it, twice in one run: ``scancel --signal=TERM`` during a step (the job
  saves and ends COMPLETED, exit code 0), then ``scontrol requeue``; the third run finishes; metrics equal
  the straight run's;
* ``scancel`` (SIGTERM, then SIGKILL after ``KillWait``) while a checkpoint is written: the torn directory
  is moved aside by the next job, which resumes from the previous checkpoint; metrics equal.

The cluster needs root (packages, daemons). Without it these tests skip, saying why; under ``CI=true`` a
missing cluster is a failure. The cluster keeps running after the session when it was running before;
otherwise the session stops what it started (``tools/slurm_cluster.sh stop``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

import fault_common as fc  # noqa: E402

ROOT = fc.ROOT
SCRIPT = ROOT / "tools" / "slurm_cluster.sh"
pytestmark = pytest.mark.slow


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: the Slurm cluster is required: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
    """The one-node cluster, started (and installed) by tools/slurm_cluster.sh when needed."""
    if os.geteuid() != 0:
        _unavailable("the Slurm tests need root (tools/slurm_cluster.sh installs slurm-wlm/munge/mariadb and starts "
                     "their daemons)")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).returncode == 0
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        _unavailable(f"tools/slurm_cluster.sh start failed: {(proc.stdout + proc.stderr)[-1500:]}")
    print(f"slurm cluster {'was running' if was_up else 'started'} ({time.perf_counter() - t0:.0f} s): "
          f"{proc.stderr.strip()}")
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def _run(*cmd, check=True) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def job_state(job: str) -> str:
    out = _run("sacct", "-j", job, "-X", "-n", "-P", "-o", "State").strip().splitlines()
    return out[0].split()[0] if out else "UNKNOWN"


def wait_state(job: str, states: tuple, timeout: float = 600) -> str:
    end = time.time() + timeout
    while time.time() < end:
        state = job_state(job)
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job}: still {job_state(job)} after {timeout}s, expected {states}")


def wait_text(path: Path, text: str, count: int = 1, timeout: float = 600, job: str | None = None) -> str:
    end = time.time() + timeout
    while time.time() < end:
        out = path.read_text(errors="replace") if path.exists() else ""
        if out.count(text) >= count:
            return out
        if job and job_state(job) in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job} ended {job_state(job)} before {text!r} x{count}:\n{out[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} x{count} in {path} within {timeout}s:\n{out[-4000:]}")


def requeue(job: str, timeout: float = 120) -> None:
    """``scontrol requeue`` and, for the test's time, no requeue delay (Slurm holds a requeued job ~2 min),
    until the job runs again.

    Both steps race slurmd: ``scontrol update`` is refused until the requeued job is pending again,
    and a job started within a moment of its last run's end may be refused by slurmd ("Job credential
    revoked", the run's kill not yet forgotten: the job FAILS at once). Either is retried after a
    pause; Slurm's own requeue delay exists for the second."""
    end = time.time() + timeout
    while True:
        _run("scontrol", "requeue", job)
        while subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True,
                             text=True, timeout=120).returncode != 0 and time.time() < end:
            time.sleep(0.5)
        state = "PENDING"
        while state in ("PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED") and time.time() < end:
            time.sleep(0.2)
            state = _controller_state(job)
        if state != "FAILED" or time.time() > end:
            return  # running (or past the timeout: the test's own waits report it)
        time.sleep(3)


def _controller_state(job: str) -> str:
    """The job's state as slurmctld has it now (sacct's record can lag behind a requeue)."""
    out = _run("scontrol", "show", "job", "-o", job, check=False)
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def sacct_table(job: str) -> str:
    return _run("sacct", "-j", job, "-o", "JobID,JobName%20,State,ExitCode,Elapsed")


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_nemo_run", ROOT / "examples" / "launch_nemo_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["launch_nemo_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def launcher_args(run_dir: Path, job_dir: Path) -> list[str]:
    return ["--config", str(fc.CONFIG), "--cpu", "--gpus-per-node", "2", "--executor", "slurm",
            "--python", sys.executable, "--time", "00:30:00", "--run-dir", str(run_dir), "--job-dir", str(job_dir),
            *fc.RUN_ARGS]


def sbatch(run_dir: Path, *, env: dict | None = None, name: str = "vigos-test") -> tuple[str, Path]:
    """Submit the batch script that examples/launch_nemo_run.py renders (--dry-run's script: #SBATCH lines,
    srun of the node command, the documented launch). Returns ``(job id, its output file)``."""
    mod = _launcher()
    job_dir = run_dir.parent / f"{run_dir.name}-jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    args = mod.parse_args(launcher_args(run_dir, job_dir) + ["--job-name", name])
    _, _, _, plan = mod.build_plan(args)
    script = job_dir / "job.sbatch"
    script.write_text(plan.sbatch_script())
    job = _run("sbatch", "--parsable", script, check=True).strip().split(";")[0]
    del env  # the job environment: sbatch exports the caller's (set os.environ around the call)
    return job, job_dir / f"{name}_{job}.out"


def _count_steps(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/4 ", out, flags=re.M)]


def test_nemo_run_submits_to_slurm_and_matches_torchrun(slurm, straight_run, fault_table, tmp_path):
    run = tmp_path / "run"
    env = fc.launch_env({"NEMORUN_HOME": str(tmp_path / "nemo-home")})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "launch_nemo_run.py"),
                           *launcher_args(run, tmp_path / "unused"), "checkpoint.keep_last=0"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    took = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    job = re.search(r"^# job (\d+): (\S+);", out, flags=re.M)
    assert job and job.group(2).endswith("SUCCEEDED"), out[-3000:]
    script = next((tmp_path / "nemo-home").glob("experiments/*/*/*_sbatch.sh"))
    table = sacct_table(job.group(1))
    print(f"NeMo-Run's sbatch script ({script}):\n{script.read_text()}\nsacct:\n{table}\n({took:.0f} s)")
    assert "COMPLETED" in table.splitlines()[2] and " 0:0 " in table.splitlines()[2]
    assert "examples/pretrain_vigos.py --nproc-per-node 2 --config" in (script.parent / script.stem.replace(
        "_sbatch", "") / "scripts" / f"{script.stem.replace('_sbatch', '')}.sh").read_text()
    diff = fc.differences(run, straight_run["metrics"])
    fault_table.append({"test": "test_nemo_run_submits_to_slurm_and_matches_torchrun",
                        "fault": "none: NeMo-Run SlurmExecutor submission (job %s)" % job.group(1),
                        "printed": f"sacct: {' '.join(table.splitlines()[2].split())}", "steps lost": "0",
                        "equal": "yes" if not diff else f"NO: {diff[:3]}"})
    assert diff == [], diff


def test_slurm_preemption_twice_with_requeue(slurm, straight_run, fault_table, tmp_path):
    """scancel --signal=TERM during a step -> the job saves, exits 0 (COMPLETED); scontrol requeue -> it resumes;
    a second preemption as soon as the requeued run has resumed (it stops after its first step); the third run
    finishes."""
    run = tmp_path / "run"
    job, out_file = sbatch(run, name="vigos-preempt")
    wait_text(out_file, "step 1/4", job=job)
    _run("scancel", "--signal=TERM", job)
    wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    out = out_file.read_text()
    assert job_state(job) == "COMPLETED", sacct_table(job) + out[-3000:]
    first_stop = max(_count_steps(out))
    assert f"[vigos] stopped on SIGTERM after step {first_stop}" in out and first_stop < 4, out[-3000:]

    requeue(job)
    wait_text(out_file, "[vigos] resuming at step", count=1, job=job)
    _run("scancel", "--signal=TERM", job)
    wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    out = out_file.read_text()
    assert job_state(job) == "COMPLETED", sacct_table(job) + out[-3000:]
    second_stop = max(_count_steps(out))
    assert out.count("[vigos] stopped on SIGTERM after step") == 2 and second_stop == first_stop + 1, out[-4000:]

    requeue(job)
    wait_text(out_file, "step 4/4", job=job)
    wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    out = out_file.read_text()
    table = sacct_table(job)
    print(f"preempted at steps {first_stop} and {second_stop}; sacct:\n{table}")
    assert job_state(job) == "COMPLETED", table + out[-3000:]
    diff = fc.differences(run, straight_run["metrics"])
    fault_table.append({"test": "test_slurm_preemption_twice_with_requeue",
                        "fault": "scancel --signal=TERM during step %d, requeue; again after the resume; requeue"
                                 % first_stop,
                        "printed": fc.key_lines(out) + f" / sacct: {' '.join(table.splitlines()[2].split())}",
                        "steps lost": "0 (each stop saved; exit 0, COMPLETED)",
                        "equal": "yes" if not diff else f"NO: {diff[:3]}"})
    assert diff == [], diff


def test_slurm_kill_during_a_save(slurm, straight_run, fault_table, tmp_path, monkeypatch):
    """scancel while iter_0000002 is written (fault_common.pause_in_save holds it 60 s; KillWait is 5 s): SIGTERM, then
    SIGKILL. The job is CANCELLED; resubmitted, it names the torn directory, moves it aside and resumes."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:  # sbatch exports the submitting environment to the job
        for key, value in fc.pause_in_save(2, 60).items():
            m.setenv(key, value)
        job, out_file = sbatch(run, name="vigos-kill")
    wait_text(out_file, fc.PAUSED, job=job)
    _run("scancel", job)
    wait_state(job, ("CANCELLED", "FAILED", "COMPLETED"))
    first = out_file.read_text()
    assert job_state(job) == "CANCELLED"
    assert not (run / "iter_0000002" / "vigos_complete.json").exists() and (run / "iter_0000002").is_dir()
    job2, out2_file = sbatch(run, name="vigos-kill")
    wait_state(job2, ("COMPLETED", "FAILED", "CANCELLED"))
    out = out2_file.read_text()
    assert job_state(job2) == "COMPLETED", sacct_table(job2) + out[-3000:]
    assert f"{run / 'iter_0000002'}: incomplete" in out and "resuming at step 1 of 4" in out, out[-3000:]
    diff = fc.differences(run, straight_run["metrics"])
    fault_table.append({"test": "test_slurm_kill_during_a_save",
                        "fault": "scancel (TERM, SIGKILL after KillWait=5 s) while iter_0000002 is written",
                        "printed": fc.key_lines(first + out) + f" / sacct: job {job} CANCELLED, job {job2} COMPLETED",
                        "steps lost": "1 (step 2)", "equal": "yes" if not diff else f"NO: {diff[:3]}"})
    assert diff == [], diff
