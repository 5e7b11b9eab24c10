# Two entry points (README.md). Both create or refresh .venv first, idempotently.
PY := .venv/bin/python

.PHONY: venv demo test test-fast bench

venv:
	@bash tools/setup_venv.sh

demo: venv
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 examples/demo_vigos_loss.py

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

bench: venv
	$(PY) benchmarks/bench_kl.py
