# Two entry points (README.md). Both create or refresh .venv first, idempotently.
PY := .venv/bin/python
# the GPU lane runs where the project's venv may not exist (a GPU image with wheels on PYTHONPATH)
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
DEMO_RUN ?= runs/demo

.PHONY: venv demo demo-loss test test-fast test-gpu bench

venv:
	@bash tools/setup_venv.sh

# The main job: ViGOS training of a tiny Qwen2.5-VL on synthetic samples, TP=2 on 2 CPU processes
# (a fresh run in $(DEMO_RUN) each time; the model and shards are built once in a cache; pass more
# overrides with ARGS="key=value ...").
demo: venv
	rm -rf $(DEMO_RUN)
	VIGOS_FORCE_CPU=1 OMP_NUM_THREADS=1 $(PY) examples/pretrain_vigos.py --nproc-per-node 2 \
		--config conf/tiny_cpu.yaml run_dir=$(DEMO_RUN) $(ARGS)

# The loss alone: the ViGOS objective on random vocabulary-sharded logits at TP=2.
demo-loss: venv
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 examples/demo_vigos_loss.py

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

# On a machine with a CUDA GPU: the install check, then the whole suite (gpu-marked tests included).
test-gpu:
	$(GPU_PY) tools/gpu_smoke.py --require-gpu
	$(GPU_PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/bench_kl.py
