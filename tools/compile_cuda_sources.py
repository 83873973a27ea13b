"""Compile-only check of the CUDA sources for the real GPU targets (sm_80, sm_90).

Runs the machine's nvcc on every ``csrc/cuda/*.cu`` with the flags a torch extension build uses, then
``cuobjdump --dump-resource-usage`` on the object, and prints registers / stack / shared memory per
kernel. Needs nvcc, not a GPU. Exit status 1 on a compile error or on a kernel that uses stack (a
spill) unless the kernel is listed in ``STACK_ALLOWED``.

    python tools/compile_cuda_sources.py [--arch 80 --arch 90] [--out-dir /tmp/selora_cuda_objs]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCE_DIR = REPO_ROOT / "csrc" / "cuda"
DEFAULT_ARCHS = ("80", "90")

# Kernels allowed a non-zero stack frame, with the reason. Empty: none of ours needs one.
STACK_ALLOWED: dict[str, str] = {}


@dataclasses.dataclass
class KernelUsage:
    arch: str
    name: str
    registers: int
    stack: int
    shared: int
    local: int

    def line(self) -> str:
        return (f"sm_{self.arch:<3} REG={self.registers:<4} STACK={self.stack:<5} SHARED={self.shared:<6} "
                f"LOCAL={self.local:<5} {self.name}")


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.realpath(nvcc)  # /usr/local/bin/nvcc may be a wrapper script or a symlink
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def find_cuobjdump(nvcc: str | None) -> str | None:
    candidates = []
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    try:
        import triton  # noqa: PLC0415 (optional: triton ships a cuobjdump)

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _cxx_standard() -> str:
    """The C++ standard torch's own extension builder uses for this torch version."""
    import torch.utils.cpp_extension as cpp_extension  # noqa: PLC0415

    source = Path(cpp_extension.__file__).read_text()
    return "c++20" if "-std=c++20" in source else "c++17"


def torch_nvcc_flags(arch_list: list[str], extension_name: str = "_C") -> list[str]:
    import torch  # noqa: PLC0415
    import torch.utils.cpp_extension as cpp_extension  # noqa: PLC0415

    try:
        include_dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        include_dirs = cpp_extension.include_paths(cuda=True)
    # include_paths(cuda) appends CUDA_HOME/include, which may be wrong (nvcc found through a wrapper);
    # nvcc adds its own toolkit include directory anyway.
    include_dirs = [d for d in include_dirs if Path(d).is_dir()]
    include_dirs.append(sysconfig.get_paths()["include"])
    include_dirs.append(str(REPO_ROOT / "csrc"))
    flags = [f"-I{d}" for d in include_dirs]
    flags += [
        f"-std={_cxx_standard()}",
        "-O3",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-DTORCH_EXTENSION_NAME={extension_name}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-Xcompiler",
        "-fPIC",
    ]
    for arch in arch_list:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


_FUNCTION_RE = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RESOURCE_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_ARCH_RE = re.compile(r"arch\s*=\s*sm_(\d+)")


def parse_resource_usage(text: str) -> list[KernelUsage]:
    usages: list[KernelUsage] = []
    arch = "?"
    name = None
    for line in text.splitlines():
        arch_match = _ARCH_RE.search(line)
        if arch_match:
            arch = arch_match.group(1)
            continue
        function_match = _FUNCTION_RE.match(line)
        if function_match:
            name = function_match.group(1)
            continue
        if name is not None and "REG:" in line:
            values = {key: int(value) for key, value in _RESOURCE_RE.findall(line)}
            usages.append(KernelUsage(arch, name, values.get("REG", 0), values.get("STACK", 0),
                                      values.get("SHARED", 0), values.get("LOCAL", 0)))
            name = None
    return usages


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    demangled = out.stdout.splitlines()
    return dict(zip(names, demangled)) if len(demangled) == len(names) else {n: n for n in names}


def compile_and_report(arch_list: list[str], out_dir: Path) -> int:
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found: nothing compiled")
        return 2
    sources = sorted(CUDA_SOURCE_DIR.glob("*.cu"))
    if not sources:
        print(f"no CUDA sources under {CUDA_SOURCE_DIR}")
        return 1
    cuobjdump = find_cuobjdump(nvcc)
    flags = torch_nvcc_flags(arch_list)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for source in sources:
        obj = out_dir / (source.stem + ".o")
        cmd = [nvcc, *flags, "-c", str(source), "-o", str(obj)]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            print(f"FAIL compile {source.relative_to(REPO_ROOT)} ({elapsed:.1f}s)\n$ {' '.join(cmd)}")
            print(result.stdout[-8000:], result.stderr[-8000:])
            failures += 1
            continue
        print(f"ok   compile {source.relative_to(REPO_ROOT)} for sm_{', sm_'.join(arch_list)} ({elapsed:.1f}s)")
        if result.stderr.strip():
            print(result.stderr.strip()[-4000:])
        if cuobjdump is None:
            print("cuobjdump not found: resource usage not checked")
            continue
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)], capture_output=True,
                              text=True, check=False)
        if dump.returncode != 0:
            print(f"FAIL cuobjdump on {obj}: {dump.stderr.strip()}")
            failures += 1
            continue
        usages = parse_resource_usage(dump.stdout)
        if not usages:
            print(f"FAIL no kernels found in {obj}:\n{dump.stdout}")
            failures += 1
            continue
        pretty = demangle([u.name for u in usages])
        for usage in usages:
            usage.name = pretty[usage.name]
            print("     " + usage.line())
            if usage.stack > 0 or usage.local > 0:
                reason = next((why for key, why in STACK_ALLOWED.items() if key in usage.name), None)
                if reason is None:
                    print(f"FAIL {usage.name} on sm_{usage.arch} uses {usage.stack} B stack / {usage.local} B "
                          "local memory (register spill?)")
                    failures += 1
                else:
                    print(f"     (stack allowed: {reason})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="SM architecture, e.g. 80 (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to put the objects (default: a fresh directory under /tmp)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="selora_cuda_objs_"))
    return compile_and_report(args.arch or list(DEFAULT_ARCHS), out_dir)


if __name__ == "__main__":
    sys.exit(main())
