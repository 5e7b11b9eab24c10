"""examples/launch_nemo_run.py: dry runs of both executors (no nemo-run needed), overrides, errors."""

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "launch_nemo_run.py"
HAVE_NEMO_RUN = importlib.util.find_spec("nemo_run") is not None


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("launch_nemo_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["launch_nemo_run"] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


def run_main(launcher, capsys, *argv):
    code = launcher.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def torchrun_args(line: str) -> tuple[list[str], object]:
    """Split ``cd REPO && python -m torch.distributed.run ARGS`` and parse ARGS with torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    cd, cmd = line.split(" && ", 1)
    assert shlex.split(cd) == ["cd", str(ROOT)]
    tokens = shlex.split(cmd)
    assert tokens[1:3] == ["-m", "torch.distributed.run"]
    return tokens, get_args_parser().parse_args(tokens[3:])


def check_config(path: str, world: int, **expect):
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    cfg = load_config(PretrainConfig, path)  # what pretrain_vigos.py --config does first
    layout = validate_layout(cfg, world)
    for key, value in expect.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj == value, (key, obj, value)
    return cfg, layout


def test_local_dry_run_single_node(launcher, capsys, tmp_path):
    code, out, _ = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_7b", "--nodes", 1, "--gpus-per-node", 8,
                            "--executor", "local", "--dry-run", "--run-dir", tmp_path / "run", "train.steps=10")
    assert code == 0
    lines = [l for l in out.splitlines() if not l.startswith("#")]
    assert len(lines) == 1
    tokens, a = torchrun_args(lines[0])
    assert a.standalone and a.nnodes == "1" and a.nproc_per_node == "8"
    assert a.training_script == "examples/pretrain_vigos.py" and a.training_script_args[0] == "--config"
    cfg, layout = check_config(a.training_script_args[1], 8, **{"train.steps": 10, "parallel.tp": 4})
    assert (layout.tp, layout.pp, layout.dp) == (4, 1, 2)
    assert "tp=4 pp=1 dp=2" in out and "estimated peak" in out


def test_local_dry_run_two_nodes_prints_one_command_per_node(launcher, capsys, tmp_path):
    code, out, _ = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_3b", "--nodes", 2, "--gpus-per-node", 8,
                            "--executor", "local", "--dry-run", "--run-dir", tmp_path / "run",
                            "--master-addr", "10.1.2.3", "--master-port", 29511)
    assert code == 0
    lines = [l for l in out.splitlines() if not l.startswith("#")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        _, a = torchrun_args(line)
        assert (a.nnodes, a.nproc_per_node, a.node_rank) == ("2", "8", rank)
        assert (a.master_addr, a.master_port) == ("10.1.2.3", 29511) and not a.standalone
        check_config(a.training_script_args[1], 16, **{"parallel.tp": 2, "data.loader.batch_size": 4})


def test_slurm_dry_run_prints_the_sbatch_script(launcher, capsys, tmp_path):
    code, out, _ = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_32b", "--nodes", 8, "--gpus-per-node", 8,
                            "--executor", "slurm", "--dry-run", "--run-dir", tmp_path / "run",
                            "--account", "proj123", "--partition", "batch", "--time", "02:30:00",
                            "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3",
                            "--container-mounts", "/lustre/data:/data", "sampling.max_batch_size=4")
    assert code == 0
    for line in ("#!/bin/bash", "#SBATCH --account=proj123", "#SBATCH --partition=batch", "#SBATCH --nodes=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=02:30:00",
                 "#SBATCH --signal=TERM@300", "#SBATCH --job-name=vigos-qwen2_5_vl_32b"):
        assert line in out.splitlines(), line
    srun = next(l for l in out.splitlines() if l.startswith("srun "))
    tokens = shlex.split(srun + "\n" + out.split(srun, 1)[1].split("\n'\n", 1)[0] + "\n'")
    assert tokens[tokens.index("--container-image") + 1] == "nvcr.io/nvidia/pytorch:25.01-py3"
    mounts = tokens[tokens.index("--container-mounts") + 1].split(",")
    assert mounts[0] == "/lustre/data:/data" and f"{ROOT}:{ROOT}" in mounts
    assert f"{tmp_path / 'run'}:{tmp_path / 'run'}" in mounts
    node_script = tokens[-1]
    assert tokens[-3:-1] == ["bash", "-c"]
    cmd = node_script.strip().splitlines()[-1]
    for piece in ('--nnodes "$SLURM_NNODES"', '--node-rank "$SLURM_NODEID"',
                  '--master-addr "$SLURM_LAUNCH_NODE_IPADDR"', "--nproc-per-node 8", "examples/pretrain_vigos.py --config"):
        assert piece in cmd, piece
    config = shlex.split(cmd)[-1]
    check_config(config, 64, **{"parallel.tp": 8, "parallel.pp": 2, "sampling.max_batch_size": 4})
    if not HAVE_NEMO_RUN:
        assert "pip install nemo-run" in out


def test_bad_input_exits_2_naming_the_option(launcher, capsys, tmp_path):
    base = ["--executor", "local", "--dry-run", "--run-dir", tmp_path / "run", "--gpus-per-node", 8]
    code, _, err = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_7b", *base, "train.stepz=3")
    assert code == 2 and "train.stepz" in err
    code, _, err = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_72b", *base)
    assert code == 2 and "does not fit on 8 x 80 GB GPUs" in err and "smallest count that fits is 512" in err
    code, _, err = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_7b", *base, "parallel.tp=2")
    assert code == 2 and "parallel: tp=2 pp=1 dp=4 needs about" in err
    code, _, err = run_main(launcher, capsys, "--recipe", "qwen2_5_vl_7b", *base, "parallel.tp=3")
    assert code == 2 and "parallel.tp" in err
    code, _, err = run_main(launcher, capsys, "--recipe", "llama", *base)
    assert code == 2 and "unknown recipe 'llama'" in err


@pytest.mark.skipif(HAVE_NEMO_RUN, reason="nemo-run is installed here")
def test_without_nemo_run_a_real_launch_names_the_install_command(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--recipe", "qwen2_5_vl_7b", "--executor", "local",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "nemo-run is not installed" in proc.stderr and "pip install nemo-run" in proc.stderr, proc.stderr
