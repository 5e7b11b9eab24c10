"""Starting a training run: checks in one process, then the ranks; exit codes a scheduler understands.

``python examples/pretrain_vigos.py [--nproc-per-node N] --config X.yaml [key=value ...]`` is the
documented launch (``make demo``, the README, the NeMo-Run launcher). In that one process:

1. the configuration is loaded and validated against ``N`` ranks (:func:`load_run_config`: options,
   layout, and every path option on the file system); a mistake prints ONE line naming the option
   and the path, exit code 2, in about a second, before any process group or model;
2. the tiny demo's assets are made sure of (:mod:`~vigos_megatron.training.tiny_demo`, a cache);
3. the run directory's newest complete checkpoint is compared with this run's settings
   (:func:`check_resume`): a changed objective, loss weights, model, data stream or optimizer is
   refused in one line (exit 2) unless ``checkpoint.allow_changes=true``;
4. ``N == 1`` (one node): the run goes on in this process (a one-rank process group); otherwise
   ``torchrun`` (``--standalone --nproc_per_node N``, or ``--nnodes/--node-rank/--master-addr`` on
   several nodes) runs as a CHILD of this process (:func:`run_torchrun`), and this process maps
   its outcome to the documented exit code.

Exit codes (:mod:`vigos_megatron.training.signals`): 0 done, or stopped on a signal after a
complete checkpoint; 1 a failure; 2 the user's input; 75 stopped on a signal before the last
steps were saved. Why the launcher stays the parent of torchrun:

* torchrun answers SIGTERM / SIGINT by passing it to its workers, killing them
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (30) seconds later, and exiting 1 with a ``SignalException``
  traceback, whatever the workers did. The launcher starts torchrun in its own session (a Ctrl-C in
  the terminal reaches the launcher only) and sends a signal it receives to the workers directly
  (torchrun's children), so torchrun sees them finish their step, save and exit 0. Where the
  signal reaches torchrun too (Slurm signals every process of the step), the launcher raises
  torchrun's grace period (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600`` unless set: the scheduler's own
  kill bounds it) and reads the outcome that rank 0 leaves in :data:`EXIT_RECORD_ENV`'s file: a
  complete save after the signal gives 0 although torchrun exits 1.
* The workers see one stop several times (Slurm, torchrun, the launcher); repeats within 2 s are
  one stop (:class:`~vigos_megatron.training.signals.StopSignal`).

A bare ``torchrun`` (each worker checks and runs) works too: a mistake prints the one line from
rank 0, then torchrun's own failure report (every worker exits 2; torchrun exits 1). A SIGTERM or
Ctrl-C to torchrun makes the workers save after their step (``[vigos] stopped on SIGTERM ...:
checkpoint ... is complete``), but torchrun itself exits 1 and kills workers still saving after
its 30 s; a second signal to torchrun is passed on as "stop at once".
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import Layout, PretrainConfig

#: set by torchrun in every worker
_TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def under_torchrun() -> bool:
    return _TORCHRUN_ENV in os.environ


def load_run_config(config: str, overrides: list[str], world_size: int):
    """The validated :class:`~vigos_megatron.config.train.PretrainConfig` and its
    :class:`~vigos_megatron.config.train.Layout`; raises :class:`~vigos_megatron.config.loader.ConfigError`."""
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.paths import check_paths
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    cfg = load_config(PretrainConfig, config, overrides)
    layout = validate_layout(cfg, world_size)
    check_paths(cfg)
    return cfg, layout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: set by the launcher for its workers: rank 0 writes the launch's outcome there (JSON) before exiting
EXIT_RECORD_ENV = "VIGOS_EXIT_RECORD"
#: torchrun's grace period after a signal, unless the user set one (the scheduler's kill bounds it)
SHUTDOWN_TIMEOUT_S = "600"
#: how the last :func:`run_rank` of this process ended (a :class:`~vigos_megatron.training.loop.Outcome`)
LAST_OUTCOME = None


def run_rank(cfg: "PretrainConfig", layout: "Layout") -> int:
    """This rank's part of the run (process-group environment set: torchrun's, or one rank's)."""
    global LAST_OUTCOME
    from vigos_megatron import runtime, startup
    from vigos_megatron.training.console import print_line, quiet_library_logs

    quiet_library_logs(int(os.environ.get("RANK", "0")))
    import torch.distributed as dist

    from vigos_megatron.training.loop import train

    startup.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.train.seed)
    log = print_line if dist.get_rank() == 0 else (lambda _line: None)
    try:
        if cfg.tiny.enabled:
            from vigos_megatron.training.tiny_demo import prepare_tiny_run

            cfg = prepare_tiny_run(cfg, log=log)
        log(f"[vigos] {runtime.describe()}; run_dir {cfg.run_dir}")
        LAST_OUTCOME = train(cfg, layout, log=print_line)
    finally:
        startup.destroy_distributed()
    return 0


def write_exit_record(code: int) -> None:
    """A launcher's worker, on its way out: rank 0 writes the launch's exit code and :data:`LAST_OUTCOME`
    as JSON into the file that :data:`EXIT_RECORD_ENV` names; another rank that fails waits (up to 5 s)
    for it, so that torchrun, which stops the other ranks as soon as one fails, does not stop rank 0
    before it has said what happened. Nothing without the variable (a bare torchrun)."""
    path = os.environ.get(EXIT_RECORD_ENV)
    if not path:
        return
    if os.environ.get("RANK", "0") != "0":
        if code != 0:
            import time

            end = time.monotonic() + 5
            while not os.path.exists(path) and time.monotonic() < end:
                time.sleep(0.05)
        return
    import dataclasses
    import json

    data = {"code": int(code)}
    if LAST_OUTCOME is not None:
        data.update(dataclasses.asdict(LAST_OUTCOME))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def worker_main(config: str, overrides: list[str]) -> int:
    """A torchrun worker: check, then run (a mistake propagates as a
    :class:`~vigos_megatron.errors.UserError`: one line from rank 0 through :func:`~.console.run_cli`)."""
    cfg, layout = load_run_config(config, overrides, int(os.environ["WORLD_SIZE"]))
    return run_rank(cfg, layout)


def check_resume(cfg: "PretrainConfig", layout: "Layout") -> None:
    """The launcher's early refusal (file reads only, no torch): the settings stored with the newest
    complete checkpoint of ``run_dir`` against this run's (raises
    :class:`~vigos_megatron.training.checkpoint_files.ResumeRefused`; the ranks check again)."""
    from vigos_megatron.training import checkpoint_files as cf

    scan = cf.scan_run(cfg.run_dir) if cfg.run_dir else None
    if scan is None or scan.newest is None or scan.newest.manifest is None:
        return
    saved = scan.newest.manifest.get("settings")
    changes = cf.settings_changes(saved, cf.run_settings(cfg, layout))
    line = cf.refusal(scan.newest.path, changes)
    if line and not cfg.checkpoint.allow_changes:
        raise cf.ResumeRefused(line)


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the launcher dies
    try:
        import ctypes
        import signal as _signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(_signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: nothing to do
        pass


def exit_code_for(torchrun_rc: int, record: dict | None, signals: list[str], *, log) -> int:
    """The launcher's exit code from torchrun's, rank 0's record and the signals the launcher received."""
    from vigos_megatron.training.signals import EXIT_FAILED, EXIT_OK, EXIT_STOPPED_UNSAVED

    stopped = record.get("signal") if record else None
    if record is not None and record.get("code") == EXIT_OK:
        if stopped and torchrun_rc != 0:
            log(f"[vigos] launcher: torchrun exited {torchrun_rc} after passing {stopped} on, but the ranks "
                f"saved a complete checkpoint ({record.get('saved') or 'step ' + str(record.get('saved_step'))}): "
                f"exit code {EXIT_OK}")
        elif torchrun_rc != 0:
            log(f"[vigos] launcher: rank 0 finished, torchrun exited {torchrun_rc}: exit code {EXIT_FAILED}")
            return EXIT_FAILED
        return EXIT_OK
    if record is not None and record.get("code") not in (None, EXIT_OK):
        return int(record["code"])  # 2 (the user's input), 75 (stopped at once), 1 (a failed save)
    if signals:
        log(f"[vigos] launcher: stopped on {signals[0]} before the ranks saved (torchrun exited {torchrun_rc}): "
            f"exit code {EXIT_STOPPED_UNSAVED}; the next launch resumes from the last complete checkpoint")
        return EXIT_STOPPED_UNSAVED
    return torchrun_rc if torchrun_rc > 0 else EXIT_FAILED


def run_torchrun(argv: list[str], *, log) -> int:
    """Run ``argv`` (a torchrun command line) as a child and return the documented exit code (module docstring)."""
    import json
    import signal
    import subprocess
    import tempfile

    import psutil

    with tempfile.TemporaryDirectory(prefix="vigos-launch-") as tmp:
        record_path = os.path.join(tmp, "exit.json")
        env = dict(os.environ)
        env[EXIT_RECORD_ENV] = record_path
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
        proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        received: list[str] = []

        def forward(signum, _frame):
            received.append(signal.Signals(signum).name)
            try:
                workers = psutil.Process(proc.pid).children()
            except psutil.NoSuchProcess:
                return
            if not workers:  # not started yet: torchrun stops (nothing of this launch to save)
                proc.send_signal(signum)
            for w in workers:
                try:
                    os.killpg(w.pid, signum)  # the worker's group (torchrun starts each in its own session)
                except (ProcessLookupError, PermissionError):
                    pass

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        record = None
        try:
            with open(record_path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            pass
    return exit_code_for(rc, record, received, log=log)


def launcher_main(script: str, config: str, overrides: list[str], nproc: int, *, nnodes: int = 1,
                  node_rank: int = 0, master_addr: str = "", master_port: int = 29500) -> int:
    """The documented launch (module docstring); user errors propagate as
    :class:`~vigos_megatron.errors.UserError` (one line through :func:`~.console.run_cli`)."""
    from vigos_megatron.config.loader import ConfigError
    from vigos_megatron.training.console import print_line

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node: must be >= 1, got {nproc}")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError(f"--nnodes {nnodes} / --node-rank {node_rank}: need nnodes >= 1 and 0 <= node-rank < nnodes")
    if nnodes > 1 and not master_addr:
        raise ConfigError("--master-addr: required with --nnodes > 1 (the address of node 0)")
    cfg, layout = load_run_config(config, overrides, nproc * nnodes)
    if cfg.tiny.enabled:
        from vigos_megatron.training.tiny_demo import ensure_tiny_assets, with_tiny_paths

        ensure_tiny_assets(cfg, log=print_line)
        check_resume(with_tiny_paths(cfg), layout)
    else:
        check_resume(cfg, layout)
    if nproc == 1 and nnodes == 1:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        return run_rank(cfg, layout)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    # torchrun's own launch, quiet about what rank 0 already reported (training/torchrun_child.py)
    argv = [sys.executable, "-m", "vigos_megatron.training.torchrun_child", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                 f"--master_port={master_port}"]
    argv += [script, "--config", config, *overrides]
    sys.stdout.flush()
    return run_torchrun(argv, log=print_line)
