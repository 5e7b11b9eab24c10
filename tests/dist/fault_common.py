"""Shared by tests/test_faults.py and tests/test_cluster.py: the documented launch of the tiny demo as a
child process that a test can watch, signal and kill, and the comparison with a straight run.

Every fault run uses the same configuration as the straight reference run (``conf/tiny_cpu.yaml``,
TP=2 on 2 CPU processes, :data:`STEPS` steps, a checkpoint every step), so that the metrics after a
recovery must equal the straight run's exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "pretrain_vigos.py"
CONFIG = ROOT / "conf" / "tiny_cpu.yaml"
STEPS = 4
#: the settings of every run of the fault tests (the straight run's too)
RUN_ARGS = (f"train.steps={STEPS}", "checkpoint.save_interval=1", "logging.tensorboard=false")
#: what must be equal, step by step, after a recovery
COMPARED = ("loss", "grad_norm", "lr", "completion_tokens", "invalid_rate", "clip_rate", "term/perception",
            "term/reasoning", "term/reference", "rollout_accuracy")


def launch_env(extra: dict | None = None) -> dict:
    from vigos_megatron.testing.distributed import subprocess_env

    return subprocess_env({"VIGOS_FORCE_CPU": "1", **(extra or {})})


#: a directory whose sitecustomize.py pauses a launch inside a save (see :func:`pause_in_save`)
PAUSE_DIR = Path(__file__).parent / "pause_open"


def pause_in_save(step: int, seconds: float, file: str = ".metadata*") -> dict:
    """Environment for a launch that holds the save of ``step`` for ``seconds`` before the first write of
    ``file`` (a glob) in its directory (tests/dist/pause_open/sitecustomize.py). The default holds rank 0
    after every rank's tensors are written and before its ``.metadata``. The process prints :data:`PAUSED`
    then, and :data:`PAUSE_OVER` when it goes on."""
    from vigos_megatron.testing.distributed import subprocess_env

    path = os.pathsep.join([str(PAUSE_DIR), subprocess_env()["PYTHONPATH"]])
    return {"PYTHONPATH": path, "VIGOS_TEST_PAUSE_OPEN": f"*/iter_{step:07d}/{file}={seconds:g}"}


#: what a paused save prints (:func:`pause_in_save`)
PAUSED = "[test] pausing"
PAUSE_OVER = "[test] pause over"


def launch_argv(run_dir, *overrides, nproc: int = 2) -> list[str]:
    return [sys.executable, str(ENTRY), "--nproc-per-node", str(nproc), "--config", str(CONFIG),
            f"run_dir={run_dir}", *RUN_ARGS, *overrides]


@dataclass
class Launch:
    """``python examples/pretrain_vigos.py --nproc-per-node 2 ...`` running in the background."""

    run_dir: Path
    argv: list
    env: dict
    log: Path = field(init=False)
    proc: subprocess.Popen = field(init=False)
    t0: float = field(init=False)

    def __post_init__(self):
        import tempfile

        self.log = Path(tempfile.mkdtemp(prefix="vigos-launch-")) / "output.log"  # not in run_dir (a full disk)
        self.t0 = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 600) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the launch ended ({self.proc.returncode}) before {text!r}:\n{self.output[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output[-4000:]}")

    def send(self, sig) -> None:
        os.kill(self.proc.pid, sig)

    def workers(self) -> list:
        """The ranks (children of the launcher's torchrun child), rank order."""
        import psutil

        agents = psutil.Process(self.proc.pid).children()
        ranks = [w for a in agents for w in a.children()]
        return sorted(ranks, key=lambda p: int(p.environ().get("RANK", "0")))

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the launch did not end within {timeout}s:\n{self.output[-4000:]}") from None

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def start(run_dir, *overrides, env: dict | None = None, nproc: int = 2) -> Launch:
    return Launch(Path(run_dir), launch_argv(run_dir, *overrides, nproc=nproc), launch_env(env))


def run(run_dir, *overrides, env: dict | None = None, nproc: int = 2, timeout: float = 600) -> tuple[int, str]:
    """A launch to its end: ``(exit code, output)``."""
    launch = start(run_dir, *overrides, env=env, nproc=nproc)
    code = launch.wait(timeout)
    return code, launch.output


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def differences(run_dir, reference: list[dict]) -> list[str]:
    """Where the run's metrics differ from the straight run's (empty: equal, step by step, exactly)."""
    got = metrics(run_dir)
    out = []
    if [m["step"] for m in got] != [m["step"] for m in reference]:
        out.append(f"steps {[m['step'] for m in got]} != {[m['step'] for m in reference]}")
    for a, b in zip(got, reference):
        for key in COMPARED:
            if a.get(key) != b.get(key):
                out.append(f"step {b['step']} {key}: {a.get(key)} != {b.get(key)}")
    return out


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return Path(dst)


def lines_with(text: str, *needles: str) -> list[str]:
    """The output lines holding any of ``needles`` (for the fault table)."""
    return [line.strip() for line in text.splitlines() if any(n in line for n in needles)]


def key_lines(text: str) -> str:
    keep = lines_with(text, "[vigos] received", "again", "stopped", "cannot be read", "incomplete", "falling back",
                      "moved to", "held", "saving checkpoint", "launcher:", "error:", "resuming at", "layout changed",
                      "keep_last", "tracker", "full disk")
    return " / ".join(dict.fromkeys(keep))


def iter_dirs(run_dir) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob("iter_*"))


SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
