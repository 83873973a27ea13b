#!/usr/bin/env bash
# The one-call GPU run of selora_kernels: build, GPU tests, benchmarks, results into $OUT.
#
# A session holding a lent GPU runs, in ONE device call (repo root, $OUT set, under 10 minutes):
#     bash bench/gpu_run.sh                       # carry [".whl"] when tools/fetch_wheels.sh filled it
# Locally, without a GPU, check everything that can be checked (files, syntax, package install, collection):
#     bash bench/gpu_run.sh --dry-run             # or SELORA_GPU_DRY_RUN=1; OUT defaults to a temp folder
#
# Steps run one after another, each under its own `timeout`, all capped by a deadline
# (SELORA_GPU_DEADLINE_S, default 540 s = 9 min); a failing step never stops the later ones. Every step's
# exit code, duration and log go into $OUT/summary.json and $OUT/logs.tar.gz; the benchmark JSON
# (bench_<gpu>_<time>.json, see bench/harness.py) is copied to $OUT as is. At most 8 files come back.
#
# Environment: OUT, PYTHON (default python3), SELORA_GPU_DEADLINE_S, SELORA_GPU_DRY_RUN=1,
# SELORA_BENCH_DEVICES (default cuda here: the CPU cases are measured on the CPU machine),
# SELORA_GPU_TEST_TIMEOUT (per-test limit of pytest-timeout, default 120 s).
set -u -o pipefail

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
case "${SELORA_GPU_DRY_RUN:-0}" in 1|true|yes|on) DRY_RUN=1 ;; esac
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 2
PY="${PYTHON:-python3}"
START=$(date +%s)
STAMP=$(date +%Y%m%d-%H%M%S)
DEADLINE_S="${SELORA_GPU_DEADLINE_S:-540}"
RESERVE_S=20  # kept back for packing the results
if [ -z "${OUT:-}" ]; then
  if [ "$DRY_RUN" = 1 ]; then OUT="$(mktemp -d /tmp/selora_gpu_dry_out.XXXXXX)"; else OUT="$REPO_ROOT/bench/results/gpu_run_$STAMP"; fi
fi
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/selora_gpu_run.XXXXXX)"
LOGS="$WORK/logs"
BENCH_OUT="$WORK/bench"
mkdir -p "$LOGS" "$BENCH_OUT"
STEPS_TSV="$WORK/steps.tsv"
: > "$STEPS_TSV"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # the GPU tests run the real kernels, not the interpreter

echo "selora_kernels gpu_run.sh: dry_run=$DRY_RUN OUT=$OUT deadline=${DEADLINE_S}s python=$PY work=$WORK"

remaining() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }

LAST_RC=0
# run_step NAME TIMEOUT_S CRITICAL(0/1) COMMAND  -- COMMAND is one bash string, logged to $LOGS/NAME.log
run_step() {
  local name=$1 limit=$2 critical=$3 command=$4
  local left=$(( $(remaining) - RESERVE_S ))
  if (( left < 5 )); then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 "$critical" "deadline reached" >> "$STEPS_TSV"
    echo "== [$name] skipped: deadline reached"
    LAST_RC=124
    return 0
  fi
  (( limit > left )) && limit=$left
  local oneline; oneline=$(printf '%s' "$command" | tr '\n\t' '  ' | tr -s ' ' | cut -c1-600)
  echo "== [$name] (timeout ${limit}s) $(printf '%s' "$oneline" | cut -c1-200)"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$command" > "$LOGS/$name.log" 2>&1 < /dev/null
  LAST_RC=$?
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$LAST_RC" "$dt" "$limit" "$critical" "$oneline" >> "$STEPS_TSV"
  echo "   rc=$LAST_RC in ${dt}s"
  tail -n 6 "$LOGS/$name.log" | cut -c1-240 | sed 's/^/   | /'
  return 0
}

skip_step() {  # NAME REASON
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "skipped" 0 0 0 "$2" >> "$STEPS_TSV"
  echo "== [$1] skipped: $2"
}

# ---------------------------------------------------------------------------------------------- files
TRITON_TESTS="tests/kernels/test_selora_linear_forward.py tests/kernels/test_selora_linear_backward.py tests/ops/test_selora_linear_dispatch.py"
GPU_TESTS_ALL="$TRITON_TESTS tests/ops/test_capacity.py tests/nn/test_selora_linear.py tests/expansion/test_fisher.py tests/expansion/test_growth.py"
GPU_TESTS_REST=""
for f in tests/ops/test_capacity.py tests/nn/test_selora_linear.py tests/expansion/test_fisher.py tests/expansion/test_growth.py; do
  [ -f "$f" ] && GPU_TESTS_REST="$GPU_TESTS_REST $f"
done
BENCH_FILES="bench/bench_selora_linear.py bench/bench_capacity.py bench/bench_selora_linear_fisher.py"  # priority order
run_step files 30 1 "
  missing=0
  for f in setup.py selora_kernels/__init__.py bench/__init__.py bench/conftest.py bench/harness.py $BENCH_FILES bench/gpu_run.sh; do
    if [ -f \"\$f\" ]; then echo \"ok       \$f\"; else echo \"MISSING  \$f\"; missing=1; fi
  done
  for f in $GPU_TESTS_ALL tools/fetch_wheels.sh tools/static_check_triton.py selora_kernels/ops/cuda_impl.py; do
    if [ -f \"\$f\" ]; then echo \"ok       \$f\"; else echo \"absent   \$f (optional: its step is skipped)\"; fi
  done
  if ls .whl/*.whl >/dev/null 2>&1; then ls -l .whl/; else echo 'no .whl/ wheels carried'; fi
  exit \$missing"

# ---------------------------------------------------------------------------------------------- wheels
if ls .whl/*.whl > /dev/null 2>&1; then
  if [ "$DRY_RUN" = 1 ]; then SITE="$WORK/site"; else SITE=/tmp/site; fi
  run_step wheels 90 1 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target '$SITE' .whl/*.whl && ls '$SITE'"
  if [ "$LAST_RC" = 0 ] && [ "$DRY_RUN" = 0 ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
else
  skip_step wheels "no .whl/*.whl carried (tools/fetch_wheels.sh makes them)"
fi

# ---------------------------------------------------------------------------------------------- versions
run_step versions 90 1 "$PY - <<'EOF'
import importlib, platform, sys
print('python', sys.version.split()[0], platform.platform())
for name in ('torch', 'triton', 'peft', 'transformers', 'accelerate', 'diffusers', 'safetensors', 'numpy',
             'pytest', 'pytest_benchmark', 'pytest_timeout'):
    try:
        print(f'{name:18s}', getattr(importlib.import_module(name), '__version__', '?'))
    except Exception as error:
        print(f'{name:18s} unavailable ({type(error).__name__}: {error})')
import torch
print('cuda available', torch.cuda.is_available(), 'torch.version.cuda', torch.version.cuda)
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
EOF"
if [ "$DRY_RUN" = 1 ]; then
  skip_step nvidia_smi "dry run"
else
  run_step nvidia_smi 30 0 "nvidia-smi; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv"
fi

# ---------------------------------------------------------------------------------------------- build
if [ "$DRY_RUN" = 1 ]; then
  # Venv-less install of the pure-Python package into a temp target, then import it from elsewhere. Built
  # from a copy of the sources, so that pip's in-tree build leaves no build/ or egg-info in the repo.
  run_step package 180 1 "mkdir -p '$WORK/src' && tar --exclude=__pycache__ --exclude='*.so' -cf - setup.py selora_kernels csrc python \
    | tar -xf - -C '$WORK/src' && cd '$WORK/src' \
    && SELORA_SKIP_EXTENSION=1 $PY -m pip install -q --no-build-isolation --no-deps --no-index --target '$WORK/pkg' . \
    && cd /tmp && PYTHONPATH='$WORK/pkg' $PY -c 'import selora_kernels, sys; print(\"imported\", selora_kernels.__version__, \"from\", selora_kernels.__file__)'"
else
  # The extension for this GPU's arch only (much faster than 8.0;9.0), in place: the tests and benchmarks
  # import selora_kernels from the repo root, so selora_kernels/_C*.so is found (route "aot").
  run_step build 200 1 "ARCH=\$($PY -c 'import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())') \
    && echo TORCH_CUDA_ARCH_LIST=\$ARCH && TORCH_CUDA_ARCH_LIST=\$ARCH MAX_JOBS=\${MAX_JOBS:-16} SELORA_BUILD_CUDA=1 \
    $PY setup.py build_ext --inplace && ls -l selora_kernels/_C*.so"
  if [ "$LAST_RC" != 0 ]; then
    export SELORA_EXTENSION=off  # no surprise JIT compile in every later step: the fallback, announced
    echo "   build failed: SELORA_EXTENSION=off for the later steps (fallback implementations)"
  fi
fi
run_step ext_status 120 1 "$PY - <<'EOF'
import torch
from selora_kernels._extension import extension_status
print('extension route:', extension_status())
if torch.cuda.is_available():
    try:
        import selora_kernels.ops.cuda_impl as cuda_impl
        print('cuda_impl imported; last_paths:', getattr(cuda_impl, 'last_paths', lambda: 'n/a')())
    except Exception as error:
        print('cuda_impl unavailable:', type(error).__name__, error)
    try:
        import selora_kernels.kernels as kernels
        print('kernels:', [n for n in dir(kernels) if 'triton' in n])
    except Exception as error:
        print('kernels unavailable:', type(error).__name__, error)
EOF"

# ---------------------------------------------------------------------------------------------- tests + bench
TEST_TIMEOUT="${SELORA_GPU_TEST_TIMEOUT:-120}"
PYTEST="$PY -m pytest -p no:cacheprovider -q -rfEs"
if [ "$DRY_RUN" = 1 ]; then
  run_step syntax 60 1 "bash -n bench/gpu_run.sh && { [ ! -f tools/fetch_wheels.sh ] || bash -n tools/fetch_wheels.sh; } \
    && $PY -m py_compile bench/conftest.py bench/harness.py $BENCH_FILES && echo syntax ok"
  run_step bench_collect 120 1 "$PYTEST bench/ --benchmark --co"
  existing=""
  for f in $GPU_TESTS_ALL; do [ -f "$f" ] && existing="$existing $f"; done
  if [ -n "$existing" ]; then
    run_step tests_collect 120 0 "$PYTEST --co $existing"
  else
    skip_step tests_collect "none of the GPU test files exists yet"
  fi
else
  triton_existing=""
  for f in $TRITON_TESTS; do [ -f "$f" ] && triton_existing="$triton_existing $f"; done
  if [ -n "$triton_existing" ]; then
    run_step tests_triton 120 1 "$PYTEST --timeout=$TEST_TIMEOUT --junitxml='$LOGS/junit_triton.xml' $triton_existing"
  else
    skip_step tests_triton "none of the Triton kernel test files ($TRITON_TESTS) exists"
  fi
  # The benchmarks stop starting cases SELORA_BENCH_BUDGET_S after they begin, so the JSON is always written.
  BENCH_LIMIT=240
  left=$(( $(remaining) - RESERVE_S ))
  (( BENCH_LIMIT > left )) && BENCH_LIMIT=$left
  BENCH_BUDGET=$(( BENCH_LIMIT - 50 ))
  (( BENCH_BUDGET < 10 )) && BENCH_BUDGET=10
  run_step bench "$BENCH_LIMIT" 1 "SELORA_BENCH_DEVICES=\${SELORA_BENCH_DEVICES:-cuda} SELORA_BENCH_BUDGET_S=$BENCH_BUDGET \
    SELORA_BENCH_RESULTS_DIR='$BENCH_OUT' $PYTEST $BENCH_FILES --benchmark --benchmark-json='$LOGS/pytest_benchmark.json'"
  if [ -n "$GPU_TESTS_REST" ]; then
    run_step tests_gpu 120 1 "$PYTEST --timeout=$TEST_TIMEOUT --junitxml='$LOGS/junit_gpu.xml' $GPU_TESTS_REST"
  else
    skip_step tests_gpu "no GPU test files"
  fi
  # Anything else marked for the GPU (exit 5 = none collected).
  run_step tests_marked 60 0 "$PYTEST --timeout=$TEST_TIMEOUT -m 'gpu or cuda' tests/ $(for f in $GPU_TESTS_ALL; do printf -- '--ignore=%s ' "$f"; done) ; rc=\$?; [ \$rc = 5 ] && { echo 'no GPU-marked tests'; exit 0; }; exit \$rc"
  # Last and optional: the editable install touches the interpreter's site-packages, so only on the lent
  # (throw-away) GPU machine, never where no GPU is seen.
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    run_step pip_editable 60 0 "SELORA_SKIP_EXTENSION=1 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . && $PY -m pip show selora_kernels"
  else
    skip_step pip_editable "no GPU seen: not installing into this machine's environment"
  fi
fi

# ---------------------------------------------------------------------------------------------- results
cp "$BENCH_OUT"/bench_*.json "$OUT"/ 2>/dev/null
n_bench=$(ls "$OUT"/bench_*.json 2>/dev/null | wc -l)
if (( n_bench > 4 )); then  # keep under the 8-file limit
  tar czf "$OUT/bench_results.tar.gz" -C "$OUT" $(cd "$OUT" && ls bench_*.json) && rm -f "$OUT"/bench_*.json
fi
GIT_COMMIT="${SELORA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
DRY_RUN="$DRY_RUN" START="$START" DEADLINE_S="$DEADLINE_S" STEPS_TSV="$STEPS_TSV" OUT="$OUT" WORK="$WORK" \
GIT_COMMIT="$GIT_COMMIT" "$PY" - <<'EOF' || printf '{"error": "summary writer failed", "dry_run": %s}\n' "$DRY_RUN" > "$OUT/summary.json"
import glob, json, os, time
steps, ok = [], True
for line in open(os.environ["STEPS_TSV"]):
    name, rc, seconds, limit, critical, command = line.rstrip("\n").split("\t", 5)
    if rc == "skipped":
        status = "skipped"
    elif rc == "0":
        status = "ok"
    elif rc in ("124", "137"):
        status = "timeout"
    else:
        status = "failed"
    critical = critical == "1"
    if critical and status in ("failed", "timeout"):
        ok = False
    steps.append({"name": name, "status": status, "rc": None if rc == "skipped" else int(rc),
                  "seconds": int(seconds), "timeout_s": int(limit), "critical": critical,
                  "command": command.strip()[:600], "log": f"logs/{name}.log"})
bench = []
for path in sorted(glob.glob(os.path.join(os.environ["WORK"], "bench", "bench_*.json"))):
    try:
        doc = json.load(open(path))
        bench.append({"file": os.path.basename(path), "device": doc["metadata"]["device_name"],
                      "cases": len(doc["cases"]), "complete": doc["complete"], "targets": doc["targets_summary"]})
    except Exception as error:  # noqa: BLE001
        bench.append({"file": os.path.basename(path), "error": str(error)})
summary = {"dry_run": os.environ["DRY_RUN"] == "1", "ok": ok, "git_commit": os.environ["GIT_COMMIT"],
           "elapsed_s": int(time.time()) - int(os.environ["START"]), "deadline_s": int(os.environ["DEADLINE_S"]),
           "steps": steps, "bench_results": bench,
           "out_files": sorted(set(os.listdir(os.environ["OUT"])) | {"summary.json", "logs.tar.gz"})}
json.dump(summary, open(os.path.join(os.environ["OUT"], "summary.json"), "w"), indent=1)
print(f"{'step':16s} {'status':8s} {'rc':>4s} {'s':>5s}")
for step in steps:
    print(f"{step['name']:16s} {step['status']:8s} {str(step['rc']):>4s} {step['seconds']:>5d}")
for entry in bench:
    print("bench:", json.dumps(entry))
EOF
cp "$STEPS_TSV" "$LOGS/steps.tsv"
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "elapsed $(( $(date +%s) - START ))s"
if [ "$DRY_RUN" = 1 ]; then rm -rf "$WORK"; fi
"$PY" -c "import json, sys; sys.exit(0 if json.load(open('$OUT/summary.json')).get('ok') else 1)"
