#!/usr/bin/env bash
# The benchmarks' HF-side systems (vinterp on HF, nnsight, raw HF hooks) on a GPU machine that
# has PyTorch but no vLLM and no internet. vLLM systems are recorded as skipped there.
#
# Prepare as for scripts/gpu_check.sh (.gpu-wheels, .gpu-home), and add nnsight's wheels:
#   .venv/bin/pip download -d .gpu-wheels --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
#       nnsight==0.8.1 greenlet cloudpickle websocket-client zstandard httpx==0.28.1 \
#       httpcore==1.0.9 certifi accelerate==1.15.0 psutil
# SmolLM2's weights ship as a 98 MB GGUF in a PyPI package that cannot be carried there, so the
# model is built from its config with random weights (seed 0): the same shapes and compute,
# hence the same speed; the patch sweep's P(" Paris") check is meaningless on it.
# Usage there, from the repository root: OUT=/some/dir bash scripts/gpu_bench.sh [ARGS...]
# where ARGS go to `python -m benchmarks run` (default: full sizes, 3 repetitions).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --target /tmp/vinterp-site .gpu-wheels/*.whl \
    || exit 1
export PYTHONPATH=/tmp/vinterp-site:$PWD:$PWD/plugins:$PWD/server
export VINTERP_HOME=$PWD/.gpu-home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VINTERP_BENCH_NNSIGHT_PYTHON=$(command -v python3)
MODEL=/tmp/smollm2-135m-random
python3 - "$MODEL" <<'EOF' || exit 1
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(".gpu-home/models/smollm2-135m"), Path(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
print("gpu-bench: built", dst, sum(p.numel() for p in model.parameters()), "parameters")
EOF
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--reps 3)
python3 -m benchmarks run --device cuda --model-path "$MODEL" --results-dir "$OUT" \
    --systems vinterp_hf nnsight hf_hooks "${ARGS[@]}" 2>&1 | tee "$OUT/run.log"
