#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and builds the C++/CUDA extension.
# Idempotent: a stamp of the dependency files skips the install when nothing changed.
#
# Torch route: the CUDA build of torch 2.14.1 + torchvision 0.29.1 (runs on CPU; torchvision is needed for
# FID), pinned by constraints.txt so that no later install swaps torch for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SELORA_VENV:-.venv}
CONSTRAINTS=${SELORA_CONSTRAINTS:-constraints.txt}  # constraints-gpu-image.txt: the lent GPU's versions
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.selora-deps-$(cat requirements.txt "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing dependencies into $VENV (torch route pinned by $CONSTRAINTS)"
    "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -r requirements.txt wheel
    touch "$stamp"
fi
# The editable install builds the extension in this checkout: the stamp covers the checkout's path too.
src_stamp="$VENV/.selora-ext-$( (pwd; cat setup.py csrc/*.cpp csrc/*.h csrc/cuda/*.cu 2>/dev/null) | sha256sum | cut -c1-16)"
if [ ! -f "$src_stamp" ]; then
    echo "[setup] building the selora_kernels extension (CPU; CUDA too where torch has CUDA and nvcc exists)"
    start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -c "$CONSTRAINTS" -e .
    echo "[setup] extension built in $(( $(date +%s) - start )) s"
    touch "$src_stamp"
fi
"$VENV/bin/python" -c "import selora_kernels, torch; from selora_kernels._extension import extension_status; print('[setup] selora_kernels', selora_kernels.__version__, '| torch', torch.__version__, '| triton', __import__('triton').__version__, '| extension:', extension_status())"
