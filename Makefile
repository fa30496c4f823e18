# vinterp developer entry points. `make test` is what CI runs (.ci/run).
PY := .venv/bin/python
# `make serve` options (any `vinterp serve` or vLLM engine option), e.g.
#   make serve SERVE_ARGS="--port 8001 --api-keys keys.txt --max-model-len 2048"
SERVE_ARGS ?= --model smollm2-135m --host 127.0.0.1 --port 8000

.PHONY: setup test demo serve lint bench bench-setup

setup:
	@bash scripts/setup.sh

# the whole suite (vLLM compiled, the default), then the plugin tests again in eager mode;
# engines get 512 MiB of KV cache, not 1 GiB: the suite holds many at once (in-process, the
# shared server, Ray Serve's replicas), and 24 GB ran out under Ray's memory monitor
TEST_ENV := VLLM_ENABLE_V1_MULTIPROCESSING=0 VINTERP_KV_CACHE_BYTES=536870912
test: setup
	$(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider
	VINTERP_VLLM_EAGER=1 $(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/plugins

demo: setup
	$(PY) -m vinterp.demo

# the OpenAI-compatible server in the foreground (Ctrl-C stops it)
serve: setup
	$(PY) -m vinterp.cli serve $(SERVE_ARGS)

lint: setup
	.venv/bin/ruff check .

bench: setup
	$(PY) -m benchmarks run

bench-setup: setup
	bash benchmarks/setup_nnsight.sh
