"""examples/launch_nemo_run.py: dry runs of both executors (no nemo-run needed), overrides, errors; every
node runs the documented launch (examples/pretrain_vigos.py, which runs torchrun as its child); --config
and --cpu for a training YAML on CPU nodes. The real submission to a Slurm cluster: tests/test_cluster.py."""

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


def node_args(line: str, *, env=None) -> tuple[list[str], object]:
    """Split ``cd REPO && [VAR=1 ...] python examples/pretrain_vigos.py ARGS`` and parse ARGS with the entry
    point's own parser (the documented launch, which runs torchrun as its child)."""
    import importlib.util as iu

    cd, cmd = line.split(" && ", 1)
    assert shlex.split(cd) == ["cd", str(ROOT)]
    tokens = shlex.split(cmd)
    assigned = {}
    while "=" in tokens[0] and not tokens[0].startswith("/"):
        k, v = tokens.pop(0).split("=", 1)
        assigned[k] = v
    assert assigned == (env or {}), assigned
    assert tokens[1] == "examples/pretrain_vigos.py"
    spec = iu.spec_from_file_location("pretrain_vigos_args", ROOT / "examples" / "pretrain_vigos.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return tokens, mod.parse_args(tokens[2:])


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
    tokens, a = node_args(lines[0])
    assert a.nnodes == 1 and a.nproc_per_node == 8 and "--nnodes" not in tokens
    cfg, layout = check_config(a.config, 8, **{"train.steps": 10, "parallel.tp": 4})
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
        _, a = node_args(line)
        assert (a.nnodes, a.nproc_per_node, a.node_rank) == (2, 8, rank)
        assert (a.master_addr, a.master_port) == ("10.1.2.3", 29511)
        check_config(a.config, 16, **{"parallel.tp": 2, "data.loader.batch_size": 4})


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
                  '--master-addr "$SLURM_LAUNCH_NODE_IPADDR"', "examples/pretrain_vigos.py --nproc-per-node 8",
                  "--config"):
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


def test_config_and_cpu_mode_render_a_cpu_job(launcher, capsys, tmp_path):
    """--config (a training YAML, not a recipe) and --cpu: no GPUs requested, VIGOS_FORCE_CPU=1 on the nodes,
    --account optional; the launch's exit codes pass through srun to Slurm."""
    code, out, _ = run_main(launcher, capsys, "--config", ROOT / "conf" / "tiny_cpu.yaml", "--cpu",
                            "--gpus-per-node", 2, "--executor", "slurm", "--dry-run", "--run-dir", tmp_path / "run",
                            "--python", "/opt/py/bin/python", "train.steps=3")
    assert code == 0, out
    assert "on 1 x 2 CPU processes: tp=2 pp=1 dp=1" in out
    lines = out.splitlines()
    assert not any("--gpus-per-node" in l for l in lines if l.startswith("#SBATCH"))
    assert not any(l.startswith("#SBATCH --account") for l in lines)
    assert "export VIGOS_FORCE_CPU=1" in lines and "export OMP_NUM_THREADS=1" in lines
    exec_line = next(l for l in lines if l.startswith("exec /opt/py/bin/python examples/pretrain_vigos.py"))
    config = shlex.split(exec_line)[-1]
    check_config(config, 2, **{"train.steps": 3, "tiny.enabled": True, "run_dir": str(tmp_path / "run")})

    code, out, _ = run_main(launcher, capsys, "--config", ROOT / "conf" / "tiny_cpu.yaml", "--cpu",
                            "--gpus-per-node", 2, "--executor", "local", "--dry-run", "--run-dir", tmp_path / "run")
    assert code == 0
    line = next(l for l in out.splitlines() if not l.startswith("#"))
    node_args(line, env={"VIGOS_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"})
    code, _, err = run_main(launcher, capsys, "--config", ROOT / "conf" / "tiny_cpu.yaml", "--gpus-per-node", 3,
                            "--executor", "local", "--dry-run", "--run-dir", tmp_path / "run")
    assert code == 2 and "parallel.tp" in err


def test_the_launch_runs_torchrun_as_its_child_with_the_node_arguments(tmp_path, monkeypatch):
    """launcher_main builds torchrun's command (standalone on one node, static rendezvous on several) and hands
    it to run_torchrun, which maps the exit code; no rank is started here."""
    from vigos_megatron.training import launch

    seen = []
    monkeypatch.setattr(launch, "run_torchrun", lambda argv, log: seen.append(argv) or 0)
    monkeypatch.setattr(launch, "ensure_tiny_assets", None, raising=False)
    cfg = str(ROOT / "conf" / "tiny_cpu.yaml")
    ov = [f"run_dir={tmp_path / 'run'}", "tiny.enabled=false", f"model.hf_path={tmp_path}",
          f"data.loader.shards_dir={tmp_path}", f"data.context.processor_path={tmp_path}"]
    monkeypatch.setattr("vigos_megatron.config.paths.check_paths", lambda cfg: None)
    assert launch.launcher_main("S.py", cfg, ov, 2) == 0
    assert seen[-1][1:] == ["-m", "vigos_megatron.training.torchrun_child", "--nproc_per_node=2", "--standalone",
                            "S.py", "--config", cfg, *ov]
    from torch.distributed.run import parse_args

    assert parse_args(seen[-1][3:]).nproc_per_node == "2"  # torchrun's own arguments
    assert launch.launcher_main("S.py", cfg, ov, 2, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                master_port=29511) == 0
    assert seen[-1][3:8] == ["--nproc_per_node=2", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                             "--master_port=29511"]
    from vigos_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="--master-addr"):
        launch.launcher_main("S.py", cfg, ov, 2, nnodes=2)


def test_exit_code_mapping():
    """torchrun's exit code, rank 0's record and the signals the launcher received -> the documented code."""
    from vigos_megatron.training.launch import exit_code_for

    lines = []
    saved = {"code": 0, "signal": "SIGTERM", "saved": "/r/iter_0000003", "saved_step": 3, "steps": 3}
    assert exit_code_for(1, saved, ["SIGTERM"], log=lines.append) == 0  # torchrun re-raised the signal
    assert "torchrun exited 1 after passing SIGTERM on" in lines[-1] and "iter_0000003" in lines[-1]
    assert exit_code_for(0, saved, ["SIGINT"], log=lines.append) == 0
    assert exit_code_for(0, {"code": 0, "signal": None}, [], log=lines.append) == 0
    assert exit_code_for(1, {"code": 75, "signal": None}, ["SIGINT"], log=lines.append) == 75  # stopped at once
    assert exit_code_for(1, {"code": 2}, [], log=lines.append) == 2  # refused resume, corrupt checkpoint
    assert exit_code_for(1, None, ["SIGTERM"], log=lines.append) == 75  # no rank saved: stopped before saving
    assert "stopped on SIGTERM before the ranks saved" in lines[-1]
    assert exit_code_for(1, None, [], log=lines.append) == 1  # a crash, a killed rank
    assert exit_code_for(-9, None, [], log=lines.append) == 1
