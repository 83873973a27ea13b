"""Static check of every SeLoRA Triton launch configuration, compiled ahead of time (no GPU needed).

For each config of `selora_kernels.kernels.launch_table.all_launch_configs()` and each target (sm_80, sm_90):
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` with the spec of
`selora_kernels.kernels._aot.aot_spec`, write the cubin, read registers,
stack and local memory with `cuobjdump --dump-resource-usage`, count tensor-core instructions in the
`nvdisasm` SASS (HMMA on sm_80; HGMMA - Triton 3.x emits wgmma on sm_90 - or HMMA on sm_90), and take the
dynamic shared memory from the compiled metadata. A config fails on:

- a compile error;
- any spill: stack > 0 or local memory > 0 bytes;
- shared memory over the per-block opt-in limit (sm_80: 163 KiB = 166912 B, sm_90: 227 KiB = 232448 B;
  cudaDevAttrMaxSharedMemoryPerBlockOptin of A100 and H100);
- a kernel that calls tl.dot with zero tensor-core instructions, except IEEE-fp32 dots, which have no
  tensor-core path by design (torch's "highest" fp32 matmul precision runs on the SIMT units).

Usage:
    python tools/static_check_triton.py [--jobs 2] [--json bench/results/static_triton.json] [--quiet]

Prints a table, writes the JSON (triton/torch versions, git commit, per-config numbers, problems) and exits
with status 1 when any config fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from selora_kernels.kernels import _aot, launch_table  # noqa: E402

ARCHS = (80, 90)
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes per block, opt-in maximum
TENSOR_CORE_OPS = {80: ("HMMA",), 90: ("HGMMA", "HMMA")}
DEFAULT_JSON = ROOT / "bench" / "results" / "static_triton.json"


def _nvidia_bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _expects_tensor_cores(config: launch_table.LaunchConfig) -> bool:
    uses_dot = launch_table.KERNELS[config.kernel][2]
    return uses_dot and dict(config.flags).get("DOT_PRECISION") != "ieee"


def compile_and_inspect(config: launch_table.LaunchConfig, arch: int) -> dict:
    """Compiles one config for one arch and returns its resource record (problems listed in 'problems')."""
    import triton
    from triton.backends.compiler import GPUTarget

    record = dict(config=config.name, kernel=config.kernel, dtype=config.dtype, r_pad=config.r_pad,
                  size_class=config.size_class, flags={k: v for k, v in config.flags},
                  blocks=dict(vars(config.blocks)), arch=f"sm_{arch}", problems=[])
    start = time.perf_counter()
    try:
        fn, signature, constexprs, attrs = _aot.aot_spec(config)
        source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=config.blocks.num_warps,
                                               num_stages=config.blocks.num_stages))
    except Exception as error:  # noqa: BLE001  (any compile failure is a finding, reported per config)
        record["problems"].append(f"compile error: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
        record["compile_s"] = round(time.perf_counter() - start, 2)
        return record
    record["compile_s"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        # nvdisasm costs ~0.5-1 s per cubin: only kernels with a tl.dot need their SASS read
        sass = ""
        if launch_table.KERNELS[config.kernel][2]:
            sass = subprocess.run([_nvidia_bin("nvdisasm"), "-c", "-ndf", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    record["registers"] = int(fields.get("REG", -1))
    record["stack_bytes"] = int(fields.get("STACK", -1))
    record["local_bytes"] = int(fields.get("LOCAL", -1))
    record["static_shared_bytes"] = int(fields.get("SHARED", 0))
    record["shared_bytes"] = int(compiled.metadata.shared) + record["static_shared_bytes"]
    opcodes = re.findall(r"\b(HGMMA|HMMA|IMMA|DMMA)\b", sass)
    record["tensor_core_instructions"] = {op: opcodes.count(op) for op in sorted(set(opcodes))}
    record["tensor_core_count"] = sum(opcodes.count(op) for op in TENSOR_CORE_OPS[arch])
    record["expects_tensor_cores"] = _expects_tensor_cores(config)
    if record["stack_bytes"] != 0 or record["local_bytes"] != 0:
        record["problems"].append(f"spill: {record['registers']} registers, stack {record['stack_bytes']} B, "
                                  f"local {record['local_bytes']} B")
    if record["registers"] < 0:
        record["problems"].append("no resource usage found in the cubin")
    if record["shared_bytes"] > SHARED_LIMIT[arch]:
        record["problems"].append(f"shared memory {record['shared_bytes']} B over the sm_{arch} limit "
                                  f"{SHARED_LIMIT[arch]} B")
    if record["expects_tensor_cores"] and record["tensor_core_count"] == 0:
        record["problems"].append(f"matrix-product kernel without tensor-core instructions "
                                  f"({'/'.join(TENSOR_CORE_OPS[arch])}) on sm_{arch}")
    return record


def _job(args):
    config, arch = args
    return compile_and_inspect(config, arch)


def run_checks(config_list, archs=ARCHS, jobs: int = 2):
    work = [(config, arch) for config in config_list for arch in archs]
    if jobs <= 1:
        return [_job(item) for item in work]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_job, work, chunksize=4))


def _versions() -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "selora_kernels/kernels"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return dict(triton=triton.__version__, torch=torch.__version__, git_commit=commit,
                kernels_dirty_or_untracked=dirty)


def format_table(records) -> str:
    header = f"{'config':<92} {'arch':>5} {'regs':>4} {'stack':>5} {'smem':>7} {'TC':>4}  status"
    lines = [header, "-" * len(header)]
    for r in records:
        status = "OK" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(f"{r['config']:<92} {r['arch']:>5} {r.get('registers', '-'):>4} "
                     f"{r.get('stack_bytes', '-'):>5} {r.get('shared_bytes', '-'):>7} "
                     f"{r.get('tensor_core_count', '-'):>4}  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config_list = list(launch_table.all_launch_configs())
    records = run_checks(config_list, jobs=args.jobs)
    failures = [r for r in records if r["problems"]]
    table = format_table(failures if args.quiet else records)
    print(table)
    elapsed = time.perf_counter() - start
    print(f"\n{len(config_list)} configs x {len(ARCHS)} archs = {len(records)} compiles in {elapsed:.1f} s; "
          f"{len(failures)} failing")
    report = dict(versions=_versions(), shared_limits_bytes={f"sm_{a}": v for a, v in SHARED_LIMIT.items()},
                  elapsed_s=round(elapsed, 1), failing=len(failures), records=records)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
