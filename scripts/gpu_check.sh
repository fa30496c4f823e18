#!/usr/bin/env bash
# The HF backend's CUDA checks, on a GPU machine with PyTorch but no internet.
#
# Prepare on a machine with PyPI access (both folders are git-ignored):
#   .venv/bin/pip download -d .gpu-wheels --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform any transformers==5.19.0 pydantic==2.14.4
#   (drop numpy: the GPU image has one) and copy SmolLM2's tokenizer and config (no weights)
#   into .gpu-home/models/smollm2-135m, from which the tiny models are built there.
# Then run this script there from the repository root. It runs:
#   1. tests/backends/hf/test_cuda.py (CUDA vs raw PyTorch on the GPU, CUDA vs CPU, bf16);
#   2. the whole HF-backend suite with its models on the GPU (VINTERP_TEST_DEVICE=cuda).
# vLLM is not installed there, so the plugin's tests do not run.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q --no-index --no-deps --target /tmp/vinterp-site .gpu-wheels/*.whl \
    || exit 1
export PYTHONPATH=/tmp/vinterp-site:$PWD:$PWD/plugins:$PWD/server
export VINTERP_HOME=$PWD/.gpu-home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m vinterp.cli models pull tiny-gpt2 tiny-llama tiny-mistral tiny-qwen2 tiny-gptneox \
    || exit 1
status=0
python3 -m pytest -p no:cacheprovider -rfE -v tests/backends/hf/test_cuda.py \
    >"$OUT/test_cuda.log" 2>&1 || status=1
tail -25 "$OUT/test_cuda.log"
VINTERP_TEST_DEVICE=cuda python3 -m pytest -p no:cacheprovider -q -rfE \
    tests/backends/hf tests/tracing tests/steering tests/test_seed_workflows.py \
    -k "not paris" >"$OUT/hf_suite_on_cuda.log" 2>&1 || status=1
tail -25 "$OUT/hf_suite_on_cuda.log"
exit $status
