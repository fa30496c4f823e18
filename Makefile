# vinterp developer entry points. `make test` is what CI runs (.ci/run).
PY := .venv/bin/python

.PHONY: setup test demo lint bench bench-setup

setup:
	@bash scripts/setup.sh

test: setup
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m vinterp.demo

lint: setup
	.venv/bin/ruff check .

bench: setup
	$(PY) -m benchmarks run

bench-setup: setup
	bash benchmarks/setup_nnsight.sh
