#!/usr/bin/env bash
# Runs the README's test command against the GPU image's versions (torch 2.11, triton 3.6; see
# constraints-gpu-image.txt) on this CPU machine, so that the lent GPU never finds the package broken.
#
# In a throwaway clone of HEAD: the editable install builds the extension in place, and a build against
# torch 2.11 must not replace the main checkout's (torch 2.14.1) one. torch 2.11 comes from PyPI (~3 GB
# with its CUDA libraries; about a minute here). The venv is kept between runs (SELORA_COMPAT_VENV).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV=${SELORA_COMPAT_VENV:-$ROOT/.venv-gpu-image}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/selora-gpu-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/repo"
cd "$WORK/repo"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.selora-deps-$(cat requirements.txt constraints-gpu-image.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "[gpu-image] installing torch 2.11 / triton 3.6 and the requirements into $VENV"
    "$VENV/bin/python" -m pip install -q -c constraints-gpu-image.txt -r requirements.txt wheel
    touch "$stamp"
fi
echo "[gpu-image] building the extension against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import torch, triton, selora_kernels; from selora_kernels._extension import extension_status; print('[gpu-image] torch', torch.__version__, '| triton', triton.__version__, '| extension:', extension_status())"
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
