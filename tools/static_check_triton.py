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
for _path in (ROOT, ROOT / "tools"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from selora_kernels.kernels import _aot, launch_table  # noqa: E402
import triton_launches  # noqa: E402  (tools/, next to this file)

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


def _new_record(name, kernel, dtype, r_pad, size_class, flags, blocks, arch):
    return dict(config=name, kernel=kernel, dtype=dtype, r_pad=r_pad, size_class=size_class, flags=flags,
                blocks=blocks, arch=f"sm_{arch}", problems=[])


def _inspect(record: dict, compiled, arch: int, uses_dot: bool, expects_tensor_cores: bool) -> dict:
    """Registers/stack/local from cuobjdump, shared memory from the metadata, tensor-core instructions."""
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        # nvdisasm costs ~0.5-1 s per cubin: only kernels with a tl.dot need their SASS read
        sass = ""
        if uses_dot:
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
    record["expects_tensor_cores"] = expects_tensor_cores
    if record["stack_bytes"] != 0 or record["local_bytes"] != 0:
        record["problems"].append(f"spill: {record['registers']} registers, stack {record['stack_bytes']} B, "
                                  f"local {record['local_bytes']} B")
    if record["registers"] < 0:
        record["problems"].append("no resource usage found in the cubin")
    if record["shared_bytes"] > SHARED_LIMIT[arch]:
        record["problems"].append(f"shared memory {record['shared_bytes']} B over the sm_{arch} limit "
                                  f"{SHARED_LIMIT[arch]} B")
    if expects_tensor_cores and record["tensor_core_count"] == 0:
        record["problems"].append(f"matrix-product kernel without tensor-core instructions "
                                  f"({'/'.join(TENSOR_CORE_OPS[arch])}) on sm_{arch}")
    return record


def _compile(record, source, arch, options):
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # noqa: BLE001  (any compile failure is a finding, reported per config)
        record["problems"].append(f"compile error: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
        compiled = None
    record["compile_s"] = round(time.perf_counter() - start, 2)
    return compiled


def compile_and_inspect(config: launch_table.LaunchConfig, arch: int) -> dict:
    """Compiles one launch-table config with the hand-written spec of `_aot.aot_spec` (the calibration
    configs, which no launcher makes) and returns its resource record (problems listed in 'problems')."""
    import triton

    record = _new_record(config.name, config.kernel, config.dtype, config.r_pad, config.size_class,
                         {k: v for k, v in config.flags}, dict(vars(config.blocks)), arch)
    fn, signature, constexprs, attrs = _aot.aot_spec(config)
    compiled = _compile(record, triton.compiler.ASTSource(fn, signature, constexprs, attrs), arch,
                        dict(num_warps=config.blocks.num_warps, num_stages=config.blocks.num_stages))
    if compiled is None:
        return record
    return _inspect(record, compiled, arch, launch_table.KERNELS[config.kernel][2], _expects_tensor_cores(config))


def _launch_config(launch) -> launch_table.LaunchConfig:
    """The launch-table entry a recorded launch belongs to (kernel, dtype, r_pad, blocks, flags)."""
    kernel = triton_launches.kernel_label(launch)
    bound = dict(zip(launch.fn.arg_names, launch.args))
    bound.update(launch.kwargs)
    kw = launch.kwargs
    dtype_of = {"forward": "x_ptr", "grad_x": "x_ptr", "shrink": "x_ptr", "segment_reduce": "x_ptr",
                "finalize": "grad_a_ptr"}
    dtype = _DTYPE_NAMES[str(bound[dtype_of[kernel]].dtype)] if kernel in dtype_of else "fp32"
    r_pad = kw["R_PAD"]
    warps, stages = kw.get("num_warps", 4), kw.get("num_stages", 3)
    if kernel in ("forward", "grad_x"):
        blocks = launch_table.Blocks(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], warps, stages)
        size = launch_table.size_class(bound["rows"])
        flags = (("DOT_PRECISION", kw["DOT_PRECISION"]),)
        flags += ((("HAS_BIAS", kw["HAS_BIAS"]), ("KEEP", kw["EMIT_LOW_RANK"]), ("TRIAL", kw["HAS_TRIAL"]))
                  if kernel == "forward" else (("GROUPED", kw["GROUPED"]),))
    elif kernel == "shrink":
        blocks = launch_table.Blocks(kw["BLOCK_M"], 0, kw["BLOCK_K"], warps, stages)
        size = "any"
        # P = dy B (which emits dB's partials) or U = x A_ext^T
        operand = "B" if kw["EMIT_RANK_PARTIAL"] else "A"
        flags = (("DOT_PRECISION", kw["DOT_PRECISION"]), ("OPERAND", operand), ("HAS_TRIAL", kw["HAS_TRIAL"]))
    elif kernel == "segment_reduce":
        blocks, size = launch_table.Blocks(0, kw["BLOCK_N"], kw["BLOCK_T"], warps, stages), "any"
        flags = (("DOT_PRECISION", kw["DOT_PRECISION"]),)
    elif kernel == "finalize":
        blocks, size, flags = launch_table.Blocks(kw["BLOCK_P"], kw["BLOCK_N"], 0, warps, stages), "any", \
            (("FISHER", kw["FISHER"]),)
    else:
        blocks, size, flags = launch_table.Blocks(0, kw["BLOCK"], 0, warps, stages), "any", ()
    return launch_table.LaunchConfig(kernel, dtype, r_pad, blocks, size, flags)


_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _spec_text(specialised: dict) -> str:
    ones = [name for name, kind in specialised.items() if kind == "1"]
    div16 = [name for name, kind in specialised.items() if kind == "16"]
    return f"=1:{','.join(ones) or '-'} %16:{','.join(div16) or '-'}"


def real_launch_jobs(archs=ARCHS):
    """One job per distinct (arch, kernel, signature, constexprs, attrs, options) the launchers make for the
    SD shapes and the kernel tests: what the JIT would compile on a GPU of that arch."""
    jobs = {}
    for arch in archs:
        for launch in triton_launches.record_launches(arch):
            signature, constexprs, attrs, options = triton_launches.specialise(launch, arch)
            key = (arch, launch.fn.fn.__name__, repr(sorted(signature.items())),
                   repr(sorted(constexprs.items())), repr(sorted(attrs.items())), options.num_warps,
                   options.num_stages)
            job = jobs.get(key)
            if job is None:
                config = _launch_config(launch)
                specialised = triton_launches.specialised_args(launch.fn, signature, attrs)
                job = jobs[key] = dict(
                    arch=arch, config=config, module=launch.fn.fn.__module__, function=launch.fn.fn.__name__,
                    signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__),
                    specialised=specialised, launches=0, origins=[])
            job["launches"] += 1
            if len(job["origins"]) < 3:
                job["origins"].append(launch.origin)
    return list(jobs.values())


def compile_launch(job: dict) -> dict:
    """Compiles one recorded specialisation for its arch and returns its resource record."""
    import importlib

    import triton

    config, arch = job["config"], job["arch"]
    name = f"{config.name}{{{_spec_text(job['specialised'])}}}"
    record = _new_record(name, config.kernel, config.dtype, config.r_pad, config.size_class,
                         {k: v for k, v in config.flags}, dict(vars(config.blocks)), arch)
    record.update(table_config=config.name, specialised=job["specialised"], launches=job["launches"],
                  origins=job["origins"])
    fn = getattr(importlib.import_module(job["module"]), job["function"])
    source = triton.compiler.ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    compiled = _compile(record, source, arch, job["options"])
    if compiled is None:
        return record
    return _inspect(record, compiled, arch, launch_table.KERNELS[config.kernel][2], _expects_tensor_cores(config))


def run_checks(jobs, workers: int = 2):
    if workers <= 1:
        return [compile_launch(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_launch, jobs, chunksize=2))


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


def summarise(records) -> list:
    """One row per (launch-table config, arch): specialisations compiled, worst registers/stack, max shared."""
    rows = {}
    for r in records:
        row = rows.setdefault((r.get("table_config", r["config"]), r["arch"]), dict(
            config=r.get("table_config", r["config"]), arch=r["arch"], specialisations=0, launches=0,
            max_registers=0, max_stack_bytes=0, max_shared_bytes=0, min_tensor_core_count=None, failing=0))
        row["specialisations"] += 1
        row["launches"] += r.get("launches", 0)
        row["max_registers"] = max(row["max_registers"], r.get("registers", 0))
        row["max_stack_bytes"] = max(row["max_stack_bytes"], r.get("stack_bytes", 0), r.get("local_bytes", 0))
        row["max_shared_bytes"] = max(row["max_shared_bytes"], r.get("shared_bytes", 0))
        count = r.get("tensor_core_count")
        if count is not None:
            previous = row["min_tensor_core_count"]
            row["min_tensor_core_count"] = count if previous is None else min(previous, count)
        row["failing"] += bool(r["problems"])
    return list(rows.values())


def format_summary(rows) -> str:
    header = f"{'launch-table config':<82} {'arch':>5} {'spec':>4} {'regs':>4} {'stack':>5} {'smem':>7} {'TC':>4}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['config']:<82} {row['arch']:>5} {row['specialisations']:>4} {row['max_registers']:>4} "
                     f"{row['max_stack_bytes']:>5} {row['max_shared_bytes']:>7} "
                     f"{row['min_tensor_core_count'] if row['min_tensor_core_count'] is not None else '-':>4}"
                     f"{'  FAIL' if row['failing'] else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    jobs = real_launch_jobs()
    records = run_checks(jobs, workers=args.jobs)
    table_names = {config.name for config in launch_table.all_launch_configs()}
    for record in records:
        if record["table_config"] not in table_names:  # a launcher picked blocks the table does not list
            record["problems"].append("launch configuration missing from launch_table.all_launch_configs()")
    reached = {record["table_config"] for record in records}
    unreached = sorted(table_names - reached)
    failures = [r for r in records if r["problems"]]
    summary = summarise(records)
    print(format_table(failures if args.quiet else records))
    print()
    print(format_summary(summary))
    elapsed = time.perf_counter() - start
    launches = sum(job["launches"] for job in jobs)
    print(f"\n{launches} recorded launches -> {len(records)} distinct specialisations of {len(summary)} "
          f"(config, arch) pairs compiled in {elapsed:.1f} s; {len(failures)} failing "
          f"({sum(1 for row in summary if row['failing'])} (config, arch) pairs)")
    if unreached:
        print(f"{len(unreached)} launch-table configs no recorded launch reaches: " + ", ".join(unreached))
    report = dict(versions=_versions(), shared_limits_bytes={f"sm_{a}": v for a, v in SHARED_LIMIT.items()},
                  sd_layers=[list(layer) for layer in triton_launches.SD_LAYERS], sd_batch=triton_launches.SD_BATCH,
                  sd_capacities=list(triton_launches.SD_CAPACITIES), elapsed_s=round(elapsed, 1),
                  recorded_launches=launches, failing=len(failures), unreached_table_configs=unreached,
                  summary=summary, records=records)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
