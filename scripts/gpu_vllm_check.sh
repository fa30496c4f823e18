#!/usr/bin/env bash
# vinterp's vLLM plugin on a GPU machine that has PyTorch 2.11+cu130 and transformers but no
# vLLM and no internet. Not yet run on a GPU (no session so far had one with this script).
#
# Prepare here: bash scripts/gpu_vllm_bundle.sh (-> .gpu-bundle/, pieces under 45 MiB) and
# .gpu-wheels + .gpu-home as scripts/gpu_check.sh says. A device call's transfer is capped, so
# bring one piece per call while the machine stays warm, copying it out of the repository
# folder at once (the next call replaces that folder):
#   carry [".gpu-bundle"] with only that piece in it, command: bash scripts/gpu_vllm_check.sh receive
# and then, with .gpu-wheels and .gpu-home carried:
#   OUT=$OUT bash scripts/gpu_vllm_check.sh run
# `run` checks the pieces against SHA256SUMS, installs vLLM 0.26 and the extras into
# /tmp/vinterp-site, and then runs, logging to $OUT:
#   1. tests/plugins/test_compiled_mode.py and test_capture_steer.py with the engine on the GPU
#      (compiled: piecewise CUDA graphs split at vinterp::point), then test_compiled_mode.py
#      eager (VINTERP_VLLM_EAGER=1);
#   2. the steer_generate workload on smollm2-135m-shaped random weights (float32): plain vLLM
#      with its default CUDA graphs and eager, vinterp compiled and eager, 5 repetitions
#      (targets: 1c >= 0.9x and 1d >= 0.8x of plain vLLM with CUDA graphs).
set -uo pipefail
BUNDLE=/tmp/vinterp-bundle
case "${1:-}" in
receive)
    mkdir -p "$BUNDLE"
    cp -v .gpu-bundle/* "$BUNDLE"/
    ls -l "$BUNDLE"
    exit 0 ;;
run) ;;
*) echo "usage: $0 receive|run" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu-vllm-check}
mkdir -p "$OUT"
nvidia-smi -L
(cd "$BUNDLE" && sha256sum -c SHA256SUMS) || { echo "missing or damaged pieces" >&2; exit 1; }
cat "$BUNDLE"/vllm-bundle.tar.xz.part-* | xz -d | tar -C "$BUNDLE" -xf - || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/vinterp-site \
    "$BUNDLE"/wheels/*.whl .gpu-wheels/*.whl || exit 1
export PYTHONPATH=/tmp/vinterp-site:$PWD:$PWD/plugins:$PWD/server
export VINTERP_HOME=$PWD/.gpu-home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
# --target installs skip entry points: register the plugin the way pip would
dist=/tmp/vinterp-site/vinterp_gpu-0.dist-info
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: vinterp-gpu\nVersion: 0\n' > "$dist/METADATA"
printf '[vllm.general_plugins]\nvinterp = vinterp_vllm:register\n' > "$dist/entry_points.txt"
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"
python3 -m vinterp.cli models pull tiny-llama || exit 1
status=0
python3 -m pytest -p no:cacheprovider -rfE -v tests/plugins/test_compiled_mode.py \
    tests/plugins/test_capture_steer.py >"$OUT/plugin_tests_compiled.log" 2>&1 || status=1
tail -20 "$OUT/plugin_tests_compiled.log"
VINTERP_VLLM_EAGER=1 python3 -m pytest -p no:cacheprovider -rfE -v \
    tests/plugins/test_compiled_mode.py >"$OUT/plugin_tests_eager.log" 2>&1 || status=1
tail -8 "$OUT/plugin_tests_eager.log"
MODEL=/tmp/smollm2-135m-random
python3 - "$MODEL" <<'PYEOF' || exit 1
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(".gpu-home/models/smollm2-135m"), Path(sys.argv[1])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
PYEOF
python3 -m benchmarks run --device cuda --model-path "$MODEL" --results-dir "$OUT" \
    --only steer_generate --systems vllm_compiled vllm_eager vinterp_vllm vinterp_vllm_eager \
    --reps 5 2>&1 | tee "$OUT/bench.log" | tail -30
exit $status
