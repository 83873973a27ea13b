#!/usr/bin/env bash
# Runs the README's test command against the GPU image's versions (torch 2.11, triton 3.6; see
# constraints-gpu-image.txt) on this CPU machine, so that the lent GPU never finds the package broken.
#
# In a throwaway clone of HEAD: the editable install builds the extension in place, and a build against
# torch 2.11 must not replace the main checkout's (torch 2.14.1) one. torch 2.11 comes from PyPI (~3 GB
# with its CUDA libraries; a few minutes here the first time). The venv is kept between runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export SELORA_VENV=${SELORA_COMPAT_VENV:-$ROOT/.venv-gpu-image}
export SELORA_CONSTRAINTS=constraints-gpu-image.txt
WORK=$(mktemp -d /tmp/selora-gpu-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/repo"
cd "$WORK/repo"
bash tools/setup_env.sh
"$SELORA_VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
