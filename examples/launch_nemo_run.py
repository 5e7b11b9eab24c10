#!/usr/bin/env python
"""Launch ViGOS training (``examples/pretrain_vigos.py``) through NeMo-Run executors.

    python examples/launch_nemo_run.py --recipe qwen2_5_vl_7b --nodes 1 --gpus-per-node 8 \\
        --executor local [--dry-run] [--hf-path DIR --shards-dir DIR] [key=value ...]
    python examples/launch_nemo_run.py --recipe qwen2_5_vl_32b --nodes 8 --gpus-per-node 8 \\
        --executor slurm --account ACCT --partition batch --time 04:00:00 \\
        --container-image nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts /data:/data [--dry-run]
    python examples/launch_nemo_run.py --config conf/tiny_cpu.yaml --cpu --gpus-per-node 2 \\
        --executor slurm --python .venv/bin/python run_dir=/shared/runs/tiny   # a CPU cluster

1. The configuration: a recipe (``--recipe``, ``vigos_megatron.recipes``) built for ``nodes x
   gpus-per-node`` GPUs, its layout from the memory estimate (or from ``parallel.tp=``/``parallel.pp=``
   overrides, checked against it); or a training YAML (``--config``, e.g. ``conf/tiny_cpu.yaml``)
   checked against the same rank count. ``key=value`` overrides apply to both. Errors exit 2 naming
   the option.
2. The config is written to ``--config-out`` (default ``<run_dir>/launch/<name>.yaml``) with
   ``vigos_megatron.config.loader.to_yaml``; ``pretrain_vigos.py --config`` reads it.
3. Every node runs the same command, the documented launch: ``python examples/pretrain_vigos.py
   --nproc-per-node G [--nnodes N --node-rank R --master-addr A --master-port P] --config FILE``
   from the repository directory. It starts torchrun as its child and exits 0 when the run stopped
   on SIGTERM after a complete checkpoint (a preemption: Slurm records the job COMPLETED and a
   requeue resumes it), 75 when it stopped before saving, 1 on a failure, 2 on an input error
   (``vigos_megatron.training.launch``).
   * ``local``: ``nemo_run.LocalExecutor`` runs the command of ``--node-rank`` on this machine
     (run the launcher once per node, each with its rank and the same ``--master-addr``).
   * ``slurm``: ``nemo_run.SlurmExecutor`` (one task per node; pyxis container options) runs it on
     every node of the allocation, with ``$SLURM_NNODES``, ``$SLURM_NODEID`` and
     ``$SLURM_LAUNCH_NODE_IPADDR`` (the batch host) as node count, rank and rendezvous address.
     Slurm sends SIGTERM ``--signal-seconds`` before the time limit: training saves and exits 0.
     NeMo-Run submits with ``sbatch --requeue``: ``scontrol requeue JOB`` (or a preemption with
     ``PreemptMode=REQUEUE``) runs the job again, and the same command resumes from the last
     complete checkpoint. ``--account`` is optional (the cluster's default account otherwise).
     Without ``--ssh-host`` the job is submitted with ``sbatch`` on this machine, and NeMo-Run's
     experiment directory is ``$NEMORUN_HOME`` (default ``<run_dir>/nemo-run``; NeMo-Run 0.11.1
     mangles its paths when that directory's path contains ``nemo_run``).
   * ``--cpu``: no GPUs are requested, ``--gpus-per-node`` is the number of CPU processes per node,
     and the nodes run with ``VIGOS_FORCE_CPU=1`` (gloo).

The launcher waits for the job (NeMo-Run tails its log) and exits 0 when it SUCCEEDED, 1 otherwise;
``--detach`` returns after the submission.

Without ``--dry-run`` every path option is checked first (one line naming it, exit code 2;
``vigos_megatron.config.paths``). ``--dry-run`` prints the exact command each node runs (local: one per node) and, for Slurm, the
batch script that submits it, then exits 0; it does not need nemo-run. The batch script printed
without nemo-run is the launcher's rendering of what it hands to NeMo-Run (the ``#SBATCH``
options, the ``srun`` container flags and the node command); NeMo-Run's own script wraps the same
command with its log and job-directory lines, and is printed as well when nemo-run is installed.
Without ``--dry-run`` nemo-run is required (``pip install nemo-run 'leptonai<0.47'``: nemo-run 0.11.1
fails to import with leptonai 0.47; the test extra pins both, constraints.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: nemo-run 0.11.1 does not import with leptonai 0.47 (no leptonai.api.v1); 0.27.x works
INSTALL_HINT = "pip install nemo-run 'leptonai<0.47'"
ENTRY_POINT = "examples/pretrain_vigos.py"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="qwen2_5_vl_3b/7b/32b/72b or qwen3_vl_2b/4b/8b/32b")
    what.add_argument("--config", help="a training YAML instead of a recipe (e.g. conf/tiny_cpu.yaml)")
    ap.add_argument("--cpu", action="store_true",
                    help="no GPUs: --gpus-per-node CPU processes per node, VIGOS_FORCE_CPU=1 on the nodes")
    ap.add_argument("--detach", action="store_true", help="submit and return (do not wait for the job)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--executor", choices=("local", "slurm"), required=True)
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit (no nemo-run needed)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=10")
    r = ap.add_argument_group("recipe")
    r.add_argument("--hf-path", default="", help="local HF directory of the model")
    r.add_argument("--shards-dir", default="", help="WebDataset shards written by tools/make_webdataset.py")
    r.add_argument("--processor-path", default="", help="HF processor directory (default: --hf-path)")
    r.add_argument("--run-dir", default="", help="default runs/<recipe>")
    r.add_argument("--config-out", default="", help="where to write the config (default <run_dir>/launch/<recipe>.yaml)")
    r.add_argument("--ignore-memory-estimate", action="store_true",
                   help="launch a user layout (parallel.tp/pp overrides) even if the estimate says it does not fit")
    t = ap.add_argument_group("torchrun")
    t.add_argument("--python", default="", help="interpreter on the nodes (default: this one for local, python for slurm)")
    t.add_argument("--node-rank", type=int, default=0, help="local executor: this machine's node rank")
    t.add_argument("--master-addr", default="127.0.0.1", help="local executor with --nodes > 1: address of node 0")
    t.add_argument("--master-port", type=int, default=29500)
    s = ap.add_argument_group("slurm")
    s.add_argument("--account", default="")
    s.add_argument("--partition", default="")
    s.add_argument("--time", default="04:00:00", help="time limit HH:MM:SS")
    s.add_argument("--job-name", default="", help="default vigos-<recipe>")
    s.add_argument("--container-image", default="", help="pyxis/enroot image (e.g. nvcr.io/nvidia/pytorch:25.01-py3)")
    s.add_argument("--container-mounts", default="", help="comma-separated SRC:DST mounts (the repository is added)")
    s.add_argument("--job-dir", default="", help="NeMo-Run job directory on shared storage (default <run_dir>/nemo-run)")
    s.add_argument("--signal-seconds", type=int, default=300, help="SIGTERM this many seconds before the time limit")
    s.add_argument("--ssh-host", default="", help="submit through an SSH tunnel to this login node (default: local sbatch)")
    s.add_argument("--ssh-user", default="")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- the commands


def shell_join(tokens: list[str]) -> str:
    """Shell-quote ``tokens``; ``$NAME`` tokens stay expandable (double quotes)."""
    return " ".join(f'"{t}"' if t.startswith("$") and t[1:].replace("_", "").isalnum() else shlex.quote(t)
                    for t in tokens)


@dataclass
class LaunchPlan:
    """What each node runs, independent of the executor."""

    nodes: int
    gpus_per_node: int
    config_path: str
    python: str
    master_port: int
    repo: str = str(REPO)
    job_name: str = "vigos"
    slurm: dict = field(default_factory=dict)
    #: no GPUs: CPU processes, VIGOS_FORCE_CPU=1 on the nodes
    cpu: bool = False

    @property
    def env(self) -> dict[str, str]:
        """Variables every node's command needs (exported in front of it)."""
        return {"VIGOS_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"} if self.cpu else {}

    def node_command(self, node_rank, master_addr, nnodes=None) -> list[str]:
        """``python examples/pretrain_vigos.py --nproc-per-node G ... --config FILE`` for one node (the
        documented launch: it runs torchrun as its child and maps the exit code).

        ``nnodes`` / ``node_rank`` / ``master_addr`` may be shell variables (``$SLURM_NODEID``).
        """
        cmd = [self.python, ENTRY_POINT, "--nproc-per-node", str(self.gpus_per_node)]
        if self.nodes > 1:
            cmd += ["--nnodes", str(nnodes or self.nodes), "--node-rank", str(node_rank), "--master-addr",
                    str(master_addr), "--master-port", str(self.master_port)]
        return cmd + ["--config", self.config_path]

    def _env_prefix(self) -> str:
        return "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())

    def local_commands(self, master_addr: str) -> list[str]:
        """One shell line per node (run from the repository directory)."""
        return [f"cd {shlex.quote(self.repo)} && {self._env_prefix()}{shell_join(self.node_command(r, master_addr))}"
                for r in range(self.nodes)]

    def slurm_node_script(self) -> str:
        """The script every Slurm node runs (inside the container when one is given)."""
        cmd = self.node_command("$SLURM_NODEID", "$SLURM_LAUNCH_NODE_IPADDR", nnodes="$SLURM_NNODES")
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())
        return f"cd {shlex.quote(self.repo)}\nexport PYTHONUNBUFFERED=1\n{exports}exec {shell_join(cmd)}\n"

    def container_mounts(self) -> list[str]:
        """The user's mounts plus, in a container, the repository, the config's directory and the run
        directory at their own paths (when not already inside a mounted path)."""
        mounts = [m for m in self.slurm.get("container_mounts", "").split(",") if m]
        if not self.slurm.get("container_image"):
            return mounts
        for path in (self.repo, self.slurm.get("run_dir", ""), str(Path(self.config_path).parent)):
            if not path:
                continue
            inside = [m.split(":")[1] if ":" in m else m for m in mounts]
            if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in inside):
                mounts.append(f"{path}:{path}")
        return mounts

    def sbatch_script(self) -> str:
        """The batch script: ``#SBATCH`` options, then ``srun`` of the node script on every node."""
        s = self.slurm
        job_dir = s["job_dir"]
        opts = [("account", s.get("account")), ("partition", s.get("partition")), ("job-name", self.job_name),
                ("nodes", self.nodes), ("ntasks-per-node", 1),
                ("gpus-per-node", None if self.cpu else self.gpus_per_node),
                ("time", s.get("time")), ("signal", f"TERM@{s['signal_seconds']}" if s.get("signal_seconds") else None),
                ("output", f"{job_dir}/{self.job_name}_%j.out"), ("open-mode", "append")]
        # --requeue: a preemption (or scontrol requeue) runs the same script again, which resumes
        lines = ["#!/bin/bash"] + [f"#SBATCH --{k}={v}" for k, v in opts if v not in (None, "")] + ["#SBATCH --requeue"]
        srun = ["srun"]
        if s.get("container_image"):
            srun += ["--container-image", s["container_image"]]
            if self.container_mounts():
                srun += ["--container-mounts", ",".join(self.container_mounts())]
            srun += ["--container-workdir", self.repo]
        srun += ["bash", "-c", self.slurm_node_script()]
        return "\n".join(lines + ["", "set -euo pipefail", shlex.join(srun), ""])


# --------------------------------------------------------------------------- executors


def import_nemo_run():
    try:
        import nemo_run as run
    except ImportError as e:
        raise SystemExit(
            f"launch_nemo_run: nemo-run is not installed or does not import ({e}). Install it with `{INSTALL_HINT}`, "
            "or print the commands with --dry-run and run them yourself."
        ) from None
    return run


def make_executor(run, args, plan: LaunchPlan):
    if args.executor == "local":
        return run.LocalExecutor(ntasks_per_node=1, nodes=1, env_vars=plan.env)
    if args.ssh_host:
        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user or os.environ.get("USER", ""),
                               job_dir=plan.slurm["job_dir"])
    else:  # sbatch here: NeMo-Run's experiment directory ($NEMORUN_HOME, set in main) is the job directory
        tunnel = run.LocalTunnel(job_dir="")
    return run.SlurmExecutor(
        account=args.account or "", partition=args.partition or None, time=args.time, nodes=plan.nodes,
        ntasks_per_node=1, gpus_per_node=None if plan.cpu else plan.gpus_per_node,
        container_image=args.container_image or None, container_mounts=plan.container_mounts(),
        signal=f"TERM@{args.signal_seconds}" if args.signal_seconds else None,
        tunnel=tunnel, packager=run.Packager(), env_vars=plan.env,
    )


def node_script_for(args, plan: LaunchPlan) -> str:
    if args.executor == "slurm":
        return plan.slurm_node_script()
    return plan.local_commands(args.master_addr)[args.node_rank] + "\n"


# --------------------------------------------------------------------------- main


def config_from_file(args, world: int):
    """``--config FILE`` with the overrides (and ``--run-dir``), checked for ``world`` ranks."""
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    return cfg, validate_layout(cfg, world)


def build_plan(args):
    """Recipe or YAML -> validated config (written to disk) -> :class:`LaunchPlan`; ConfigError on bad input.
    Returns ``(cfg, estimate or None, layout, plan)``."""
    from vigos_megatron.config.loader import ConfigError, to_yaml
    from vigos_megatron.config.train import validate_layout

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {args.nodes}, {args.gpus_per_node}")
    if args.executor == "local" and not 0 <= args.node_rank < args.nodes:
        raise ConfigError(f"--node-rank: {args.node_rank} outside [0, {args.nodes})")
    world = args.nodes * args.gpus_per_node
    est = None
    if args.recipe:
        from vigos_megatron.recipes.memory import estimate_for_config
        from vigos_megatron.recipes.registry import MODELS, build_recipe

        cfg = build_recipe(args.recipe, world, hf_path=args.hf_path, run_dir=args.run_dir,
                           shards_dir=args.shards_dir, processor_path=args.processor_path, overrides=args.overrides,
                           check_memory=not args.ignore_memory_estimate)
        est = estimate_for_config(cfg, world, model=MODELS[args.recipe].model)
        layout = validate_layout(cfg, world)
        name = args.recipe
    else:
        cfg, layout = config_from_file(args, world)
        name = Path(args.config).stem
    config_path = Path(args.config_out or Path(cfg.run_dir) / "launch" / f"{name}.yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(to_yaml(cfg))
    python = args.python or (sys.executable if args.executor == "local" else "python")
    plan = LaunchPlan(nodes=args.nodes, gpus_per_node=args.gpus_per_node, config_path=str(config_path.resolve()),
                      python=python, master_port=args.master_port, job_name=args.job_name or f"vigos-{name}",
                      cpu=args.cpu,
                      slurm=dict(account=args.account, partition=args.partition, time=args.time,
                                 container_image=args.container_image, container_mounts=args.container_mounts,
                                 job_dir=str(Path(args.job_dir or Path(cfg.run_dir) / "nemo-run").resolve()),
                                 run_dir=str(Path(cfg.run_dir).resolve()),
                                 signal_seconds=args.signal_seconds))
    return cfg, est, layout, plan


@contextlib.contextmanager
def _no_stdin():
    """NeMo-Run runs its shell commands through invoke, which mirrors this process's stdin into them: a
    launcher is not interactive (and under pytest stdin cannot be read)."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


def _terminal(state) -> bool:
    try:
        from torchx.specs import AppState, is_terminal

        return state is not None and is_terminal(state if isinstance(state, AppState) else AppState[str(state)])
    except (ImportError, KeyError):
        return True


def submit(run, args, plan: LaunchPlan) -> int:
    """Submit the job through NeMo-Run; wait for it unless ``--detach``. Returns the exit code."""
    with _no_stdin(), run.Experiment(plan.job_name, executor=make_executor(run, args, plan)) as exp:
        exp.add(run.Script(inline=node_script_for(args, plan)), name=plan.job_name, tail_logs=not args.detach)
        exp.run(detach=args.detach)
        info = (exp.status(return_dict=True) or {}).get(plan.job_name, {})
        for _ in range(60):  # the scheduler's accounting may lag the end NeMo-Run saw (COMPLETING)
            if args.detach or _terminal(info.get("status")):
                break
            time.sleep(2)
            info = (exp.status(return_dict=True) or {}).get(plan.job_name, {})
    state = str(info.get("status", "UNKNOWN"))
    print(f"# job {info.get('job_id', '?')}: {state}; NeMo-Run directory {info.get('local_dir', '?')}")
    if args.detach:
        return 0
    return 0 if state.endswith("SUCCEEDED") else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    from vigos_megatron.config.loader import ConfigError

    try:
        cfg, est, layout, plan = build_plan(args)
    except ConfigError as e:
        print(f"launch_nemo_run: configuration error: {e}", file=sys.stderr)
        return 2
    what = f"recipe {args.recipe}" if args.recipe else f"config {args.config}"
    ranks = "CPU processes" if args.cpu else "GPUs"
    peak = f"; estimated peak {est.peak_gib:.1f} GiB per GPU" if est is not None else ""
    print(f"# {what} on {args.nodes} x {args.gpus_per_node} {ranks}: tp={cfg.parallel.tp} "
          f"pp={cfg.parallel.pp} dp={layout.dp}, rollout batch {cfg.sampling.max_batch_size}, "
          f"{cfg.train.steps} steps{peak}")
    print(f"# config: {plan.config_path}")
    if args.executor == "slurm" and not args.ssh_host:  # NeMo-Run's experiment directory is the job directory
        os.environ.setdefault("NEMORUN_HOME", str(Path(plan.slurm["run_dir"]) / "nemo-run"))
    if args.dry_run:
        if args.executor == "local":
            for rank, line in enumerate(plan.local_commands(args.master_addr)):
                print(f"# node {rank} of {plan.nodes}:")
                print(line)
        else:
            print("# node command (every node, inside the allocation):")
            print(plan.slurm_node_script(), end="")
            print("# sbatch script:")
            print(plan.sbatch_script(), end="")
            try:
                import nemo_run as run
            except ImportError:
                print(f"# (nemo-run not installed: `{INSTALL_HINT}` to submit; its own script wraps the same command)")
            else:
                print("# NeMo-Run's rendering of the job:")
                with _no_stdin():
                    run.run(run.Script(inline=node_script_for(args, plan)), executor=make_executor(run, args, plan),
                            name=plan.job_name, dryrun=True)
        return 0
    run = import_nemo_run()
    from vigos_megatron.config.paths import check_paths

    try:  # the paths the nodes will read, checked here first (a shared file system is assumed)
        check_paths(cfg)
    except ConfigError as e:
        print(f"launch_nemo_run: configuration error: {e}", file=sys.stderr)
        return 2
    return submit(run, args, plan)


if __name__ == "__main__":
    sys.exit(main())
