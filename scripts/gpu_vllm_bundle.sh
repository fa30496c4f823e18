#!/usr/bin/env bash
# Build the bundle that brings vLLM 0.26 (CUDA, built for torch 2.11) and vinterp's test models
# to a GPU machine that has PyTorch 2.11+cu130 and transformers but no vLLM and no internet.
#
#   bash scripts/gpu_vllm_bundle.sh [OUT_DIR]      # default .gpu-bundle (git-ignored)
#
# Output: OUT_DIR/vllm-bundle.tar.xz.part-aa, -ab, ... (56 MiB each: one piece fits a device call's 64 MiB with the working tree) and OUT_DIR/SHA256SUMS. The tarball holds wheels/: vllm 0.26.0
# without vllm_flash_attn/_vllm_fa2_C (Hopper uses FA3) plus the wheels that image lacks
# (../shared/gpu/vllm-0.26-cuda-extra-wheels.txt, CPython 3.12). The models travel as for
# scripts/gpu_check.sh (.gpu-home: SmolLM2's tokenizer and config; tiny models are built
# there). scripts/gpu_vllm_check.sh takes the pieces over and runs the checks. Needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
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
    --implementation cp $(for n in 17 24 27 28 31 34 35; do echo --platform manylinux_2_${n}_x86_64; done) \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -r "$work/reqs.txt" -d "$work/bundle/wheels"

# Drop what a single-GPU offline engine never loads from the vLLM wheel (and its RECORD): FA2's
# 300 MB kernels (Hopper uses FA3), the Rust front end binary, and third-party C++ headers that
# only JIT builds for other chips read. Every wheel is rewritten uncompressed (ZIP_STORED) so xz
# sees the raw bytes: that packs far smaller than xz over deflate.
"$PY" - "$work/bundle/wheels" <<'PYEOF'
import pathlib, re, sys, zipfile
wheels = pathlib.Path(sys.argv[1])
drop = re.compile(r"vllm/(vllm_flash_attn/_vllm_fa2_C|vllm-rs$|third_party/.*\.(hpp|h|cuh|inl)$"
                  r"|third_party/deep_gemm/_C\.cpython-3(10|11|13|14)-)")
for src in sorted(wheels.glob("*.whl")):
    tmp = src.with_suffix(".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if drop.match(item.filename):
                continue
            data = zin.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n")
                                  if not drop.match(line.decode(errors="replace")))
            item.compress_type = zipfile.ZIP_STORED
            zout.writestr(item, data)
    tmp.replace(src)
print(f"wheels: {sum(w.stat().st_size for w in wheels.glob('*.whl')) / 2**20:.0f} MiB stored")
PYEOF

tar -C "$work/bundle" -cf - wheels | xz -T0 -8 > "$work/vllm-bundle.tar.xz"
rm -f "$OUT"/vllm-bundle.tar.xz.part-*
# 56 MiB pieces: one piece, the ~3 MB working tree and .gpu-home fit a call's 64 MiB
split -b 56M "$work/vllm-bundle.tar.xz" "$OUT/vllm-bundle.tar.xz.part-"
(cd "$OUT" && sha256sum vllm-bundle.tar.xz.part-* > SHA256SUMS)
ls -l "$OUT"
