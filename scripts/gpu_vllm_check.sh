#!/usr/bin/env bash
# vinterp's vLLM plugin on a GPU machine that has PyTorch 2.11+cu130 and transformers but no
# vLLM and no internet.
#
# Prepare here: bash scripts/gpu_vllm_bundle.sh (-> .gpu-bundle/, 56 MiB pieces) and .gpu-home
# (SmolLM2's tokenizer and config, no weights, in .gpu-home/models/smollm2-135m: the tiny models
# and a random-weight smollm2 are built there). A device call's transfer is capped at 64 MiB, so
# bring one piece per call while the machine stays warm, copying it out of the repository folder
# at once (the next call replaces that folder):
#   carry [".gpu-bundle"] holding one piece (and SHA256SUMS): bash scripts/gpu_vllm_check.sh receive
# and with the last piece, and .gpu-home carried too:
#   bash scripts/gpu_vllm_check.sh receive && bash scripts/gpu_vllm_check.sh run
# `run` checks the pieces against SHA256SUMS, installs vLLM 0.26 and the extras into
# /tmp/vinterp-site and runs the stages named in $STAGES (default all), each under its own time
# limit (T_PARITY, T_ARCH, T_COMPILED, T_BENCH seconds), logging to $OUT:
#   setup.log     versions, the install;
#   parity.log    tests/plugins/test_gpu_parity.py: steered generation in vLLM (compiled,
#                 piecewise CUDA graphs split at vinterp::point) equals the HF backend on the
#                 same GPU, for each tiny architecture;
#   architectures.log  tests/plugins/test_architectures.py (every point, every vLLM mapping);
#   compiled.log  tests/plugins/test_compiled_mode.py on the GPU (compiled equals eager and HF);
#   tables.log    tests/plugins/test_tables.py: graph_points="tables" under vLLM's default full
#                 CUDA graphs (steering and captures from persistent tables, equal to HF);
#   bench.log     the steer_generate workload on smollm2-135m-shaped random weights (float32):
#                 plain vLLM with its default CUDA graphs and eager, vinterp compiled (piecewise,
#                 residual points), with tables (full graphs) and eager (targets: 1c >= 0.9x and 1d >= 0.8x of plain vLLM with CUDA graphs), and
#                 bench.tgz, the run's directory.
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
T_PARITY=${T_PARITY:-180} T_ARCH=${T_ARCH:-150} T_COMPILED=${T_COMPILED:-120} T_BENCH=${T_BENCH:-230}
{
    nvidia-smi -L
    (cd "$BUNDLE" && sha256sum -c SHA256SUMS) || { echo "missing or damaged pieces"; exit 1; }
    cat "$BUNDLE"/vllm-bundle.tar.xz.part-* | xz -d -T0 | tar -C "$BUNDLE" -xf - || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vinterp-site \
        "$BUNDLE"/wheels/*.whl || exit 1
} >"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
export PYTHONPATH=/tmp/vinterp-site:$PWD:$PWD/plugins:$PWD/server PYTHONUNBUFFERED=1
export VINTERP_HOME=$PWD/.gpu-home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
# --target installs skip entry points: register the plugin the way pip would
dist=/tmp/vinterp-site/vinterp_gpu-0.dist-info
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: vinterp-gpu\nVersion: 0\n' > "$dist/METADATA"
printf '[vllm.general_plugins]\nvinterp = vinterp_vllm:register\n' > "$dist/entry_points.txt"
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/setup.log"
python3 -m vinterp.cli models pull tiny-llama tiny-gpt2 tiny-gptneox tiny-qwen2 tiny-mistral \
    >>"$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
status=0
PYTEST="python3 -m pytest -p no:cacheprovider -rfE -v -s --tb=short"
STAGES=${STAGES:-parity tables architectures compiled bench}
stage() {   # stage NAME SECONDS TEST_FILE [pytest args]: runs if named in $STAGES
    local name=$1 limit=$2; shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    # SIGINT first: pytest then prints the failures it has so far (a run cut by its time
    # limit lost its failure report once); SIGKILL 20 s later if it does not stop
    timeout -s INT -k 20 "$limit" $PYTEST "$@" >"$OUT/$name.log" 2>&1 || status=1
    grep -E "worst relative|PASSED|FAILED|ERROR|passed|failed|Error:" "$OUT/$name.log" | tail -15
}
stage parity "$T_PARITY" tests/plugins/test_gpu_parity.py ${PARITY_K:+-k "$PARITY_K"}
stage tables "${T_TABLES:-120}" tests/plugins/test_tables.py
stage architectures "$T_ARCH" tests/plugins/test_architectures.py
stage compiled "$T_COMPILED" tests/plugins/test_compiled_mode.py
[[ " $STAGES " == *" bench "* ]] || exit $status
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
timeout "$T_BENCH" python3 -m benchmarks run --model-path "$MODEL" --results-dir /tmp/bench \
    --only steer_generate --systems vllm_compiled vllm_eager vinterp_vllm vinterp_vllm_tables vinterp_vllm_eager \
    --reps "${BENCH_REPS:-3}" >"$OUT/bench.log" 2>&1 || status=1
tail -30 "$OUT/bench.log"
tar -C /tmp -czf "$OUT/bench.tgz" bench 2>/dev/null
exit $status
