#!/usr/bin/env bash
# Build the bundle that brings vLLM 0.26 (CUDA, built for torch 2.11) and vinterp's test models
# to a GPU machine that has PyTorch 2.11+cu130 and transformers but no vLLM and no internet.
#
#   bash scripts/gpu_vllm_bundle.sh [OUT_DIR]      # default .gpu-bundle (git-ignored)
#
# Output: OUT_DIR/vllm-bundle.tar.xz.part-aa, -ab, ... (each under 45 MiB, so one piece fits a
# device call's transfer) and OUT_DIR/SHA256SUMS. The tarball holds wheels/: vllm 0.26.0
# without vllm_flash_attn/_vllm_fa2_C (Hopper uses FA3) plus the wheels that image lacks
# (../shared/gpu/vllm-0.26-cuda-extra-wheels.txt, CPython 3.12). The models travel as for
# scripts/gpu_check.sh (.gpu-home: SmolLM2's tokenizer and config; tiny models are built
# there). scripts/gpu_vllm_check.sh takes the pieces over and runs the checks. Needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.gpu-bundle}
LIST=${VINTERP_GPU_WHEELS:-../shared/gpu/vllm-0.26-cuda-extra-wheels.txt}
PY=.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle/wheels" "$OUT"

# wheels for the device's interpreter (CPython 3.12, manylinux x86_64), no dependency solving:
# the list is already the complete set the image lacks
grep -v '^\s*#' "$LIST" | grep -v '^\s*$' > "$work/reqs.txt"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -r "$work/reqs.txt" -d "$work/bundle/wheels"

# drop FA2's 300 MB kernel library from the vLLM wheel (and from its RECORD)
"$PY" - "$work/bundle/wheels" <<'PYEOF'
import pathlib, sys, zipfile
wheels = pathlib.Path(sys.argv[1])
src = next(wheels.glob("vllm-0.26.0-*.whl"))
tmp = src.with_suffix(".tmp")
drop = "vllm/vllm_flash_attn/_vllm_fa2_C"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith(drop):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not l.startswith(drop.encode()))
        zout.writestr(item, data)
tmp.replace(src)
print(f"{src.name}: {src.stat().st_size / 2**20:.0f} MiB without {drop}")
PYEOF

tar -C "$work/bundle" -cf - wheels | xz -T0 -6 > "$work/vllm-bundle.tar.xz"
rm -f "$OUT"/vllm-bundle.tar.xz.part-*
split -b 45M "$work/vllm-bundle.tar.xz" "$OUT/vllm-bundle.tar.xz.part-"
(cd "$OUT" && sha256sum vllm-bundle.tar.xz.part-* > SHA256SUMS)
ls -l "$OUT"
