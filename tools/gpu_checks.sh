#!/usr/bin/env bash
# The GPU acceptance checks, in parts that each fit one 10-minute command on one H100.
#
#   bash tools/gpu_checks.sh PART [PART ...]
#
# PART (each writes its output to $OUT/PART.txt, or gpu_results/PART.txt when OUT is unset):
#   smoke    tools/gpu_smoke.py --require-gpu: versions, a tiny bf16 build, forward+backward, one KL call
#   tests    the gpu-marked tests: compiled Triton KL vs torch and float64 (full vocabulary too) and
#            its < 256 MiB extra-memory goal; the bf16 model vs HF on CUDA; one ViGOS step in the
#            schedule on CUDA vs CPU fp32; the losses on CUDA tensors vs float64
#   kl       benchmarks/bench_kl.py --device cuda        (issue 10: share of copy bandwidth, extra memory)
#   student  benchmarks/bench_student.py --profile 25 (issue 12: ms/step, TFLOP/s, peak vs HF sdpa,
#            and the top operators of one step of each path)
#   rollout  benchmarks/bench_rollout.py --preset 3b     (generated tokens/s, roofline share; CUDA graphs,
#            the same static shapes eagerly, dynamic shapes; HF generate beside them)
#   step     benchmarks/bench_step.py --preset 3b        (ViGOS step vs SFT, padding)
#   precision  benchmarks/bench_precision.py --nproc-per-node 1 (issue 24: one tiny ViGOS step in bf16
#            against fp32 on CUDA, identical rollouts; local/sdpa x bf16/fp32 logits)
#   demo     the tiny ViGOS run on one GPU (NCCL, bf16): 4 steps, its metrics.jsonl
#   suite    the whole test suite on the GPU machine (what `make test-gpu` runs after `smoke`)
#
# On a machine without the project's venv (the lent GPU image): run ../shared/gpu/prepare_wheels.sh
# here first, carry .whl, and this script installs the wheels into /tmp/site before the parts.
# Parts run in the order given; a failing part is reported and the next one still runs; the exit
# status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2; }

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >/dev/null || { echo "gpu_checks: installing .whl/*.whl into /tmp/site failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset VIGOS_FORCE_CPU
results=${OUT:-gpu_results}
DEMO_RUN=${DEMO_RUN:-/tmp/vigos_gpu_demo}  # outside $OUT: the checkpoints are not wanted back
mkdir -p "$results"

part_cmd() {
  case "$1" in
    smoke)   echo "$PY tools/gpu_smoke.py --require-gpu" ;;
    tests)   echo "$PY -m pytest -q -m gpu -p no:cacheprovider tests" ;;
    kl)      echo "$PY benchmarks/bench_kl.py --device cuda" ;;
    student) echo "$PY benchmarks/bench_student.py --model 3b --profile 25" ;;
    rollout) echo "$PY benchmarks/bench_rollout.py --preset 3b" ;;
    step)    echo "$PY benchmarks/bench_step.py --preset 3b --dtype bfloat16" ;;
    precision) echo "$PY benchmarks/bench_precision.py --nproc-per-node 1" ;;
    demo)    echo "$PY examples/pretrain_vigos.py --config conf/tiny_cpu.yaml run_dir=$DEMO_RUN parallel.tp=1 \
train.steps=4" ;;
    suite)   echo "$PY -m pytest -q -p no:cacheprovider tests" ;;
    *)       return 1 ;;
  esac
}

status=0
for part in "$@"; do
  if ! cmd=$(part_cmd "$part"); then
    echo "gpu_checks: unknown part '$part' (run 'bash $0' for the list)" >&2
    [ "$status" -ne 0 ] || status=2
    continue
  fi
  [ "$part" != demo ] || rm -rf "$DEMO_RUN"
  echo "=== $part: $cmd"
  start=$(date +%s)
  bash -c "$cmd" 2>&1 | tee "$results/$part.txt"
  rc=${PIPESTATUS[0]}
  if [ "$part" = demo ] && [ -f "$DEMO_RUN/metrics.jsonl" ]; then cp "$DEMO_RUN/metrics.jsonl" "$results/demo_metrics.jsonl"; fi
  echo "=== $part: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
done
exit "$status"
