"""Starting a training run: checks in one process, then the ranks.

``python examples/pretrain_vigos.py [--nproc-per-node N] --config X.yaml [key=value ...]`` is the
documented launch (``make demo``, the README, the NeMo-Run launcher). In that one process:

1. the configuration is loaded and validated against ``N`` ranks (:func:`load_run_config`: options,
   layout, and every path option on the file system); a mistake prints ONE line naming the option
   and the path, exit code 2, in about a second, before any process group or model;
2. the tiny demo's assets are made sure of (:mod:`~vigos_megatron.training.tiny_demo`, a cache);
3. ``N == 1``: the run goes on in this process (a one-rank process group); ``N > 1``: the process
   becomes ``torchrun --standalone --nproc_per_node N`` of the same script and arguments.

Under ``torchrun`` (each worker) the same script checks the configuration again (cheap) and runs.
A bare ``torchrun`` user who makes a mistake sees the one line from rank 0, followed by torchrun's
own failure report (every worker exits 2; torchrun then exits 1).
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


def run_rank(cfg: "PretrainConfig", layout: "Layout") -> int:
    """This rank's part of the run (process-group environment set: torchrun's, or one rank's)."""
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
        train(cfg, layout, log=print_line)
    finally:
        startup.destroy_distributed()
    return 0


def worker_main(config: str, overrides: list[str]) -> int:
    """A torchrun worker: check, then run (a mistake propagates as a
    :class:`~vigos_megatron.errors.UserError`: one line from rank 0 through :func:`~.console.run_cli`)."""
    cfg, layout = load_run_config(config, overrides, int(os.environ["WORLD_SIZE"]))
    return run_rank(cfg, layout)


def launcher_main(script: str, config: str, overrides: list[str], nproc: int) -> int:
    """The documented launch (module docstring); user errors propagate as
    :class:`~vigos_megatron.errors.UserError` (one line through :func:`~.console.run_cli`)."""
    from vigos_megatron.config.loader import ConfigError
    from vigos_megatron.training.console import print_line

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node: must be >= 1, got {nproc}")
    cfg, layout = load_run_config(config, overrides, nproc)
    if cfg.tiny.enabled:
        from vigos_megatron.training.tiny_demo import ensure_tiny_assets

        ensure_tiny_assets(cfg, log=print_line)
    if nproc == 1:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        return run_rank(cfg, layout)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
            "--config", config, *overrides]
    sys.stdout.flush()
    os.execv(sys.executable, argv)
    return 1  # not reached
