#!/usr/bin/env bash
# Downloads the wheels that must travel to the lent GPU machine into .whl/ (ignored by git; carried with
# `carry: [".whl"]`; bench/gpu_run.sh installs them with pip --no-index --target /tmp/site).
#
#     bash tools/fetch_wheels.sh                 # the default set below
#     bash tools/fetch_wheels.sh NAME==VER ...   # the default set plus these
#
# What the GPU image lacks (its package list, as the device machine reports it): of our
# requirements only diffusers (and its importlib_metadata); torch, triton, peft, transformers, accelerate,
# safetensors, pytest, pytest-benchmark, pytest-timeout are there. The GPU tests of gpu_run.sh need none of
# these; diffusers is for GPU-marked tests that build a (tiny) pipeline. Python 3.12, manylinux x86_64,
# --no-deps (name every missing dependency). The device tool carries at most 64 MiB in all: keep it small.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${SELORA_WHEEL_DIR:-.whl}

local_version() {  # the version installed here, so both machines run the same one
  "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'
}
pin() {  # NAME DEFAULT_VERSION
  local v; v=$(local_version "$1"); echo "$1==${v:-$2}"
}

# importlib_metadata pinned to 8.7.0: 10.x adds a dependency (lazy-importer) that the GPU image lacks too.
PACKAGES=("$(pin diffusers 0.42.1)" "importlib_metadata==8.7.0" "$@")
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
echo "fetching into $DEST: ${PACKAGES[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"

# One version of each package (two stop the whole install on the GPU machine).
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one wheel of: $dupes -- remove the extra ones from $DEST" >&2
  exit 1
fi
for wheel in "$DEST"/*.whl; do
  echo "$(basename "$wheel") needs:"
  unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /' || true
done
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST holds ${size} MiB (the device tool carries at most 64 MiB with the working tree)"
if (( size > 48 )); then echo "warning: .whl is large; the working tree must still fit in 64 MiB" >&2; fi
