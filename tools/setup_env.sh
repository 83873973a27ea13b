#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and builds the C++/CUDA extension.
# Idempotent: a stamp of the dependency files skips the install when nothing changed.
#
# Torch route: the CUDA build of torch 2.14.1 + torchvision 0.29.1 (runs on CPU; torchvision is needed for
# FID), pinned by constraints.txt so that no later install swaps torch for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SELORA_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.selora-deps-$(cat requirements.txt constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing dependencies into $VENV (torch route pinned by constraints.txt)"
    "$VENV/bin/python" -m pip install -q -c constraints.txt -r requirements.txt
    touch "$stamp"
fi
src_stamp="$VENV/.selora-ext-$(cat setup.py csrc/*.cpp csrc/*.h csrc/cuda/*.cu 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$src_stamp" ]; then
    echo "[setup] building the selora_kernels extension (CPU; CUDA too where torch has CUDA and nvcc exists)"
    start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -c constraints.txt -e .
    echo "[setup] extension built in $(( $(date +%s) - start )) s"
    touch "$src_stamp"
fi
"$VENV/bin/python" -c "import selora_kernels, torch; from selora_kernels._extension import extension_status; print('[setup] selora_kernels', selora_kernels.__version__, '| torch', torch.__version__, '| extension:', extension_status())"
