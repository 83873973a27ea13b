"""Build of selora_kernels and its compiled operator library selora_kernels._C (torch.ops.selora_ext).

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

Environment:
    SELORA_SKIP_EXTENSION=1   pure-Python package only (the ops then use the JIT build or the fallback)
    SELORA_BUILD_CUDA=0|1     force the CUDA kernels off / on (default: on when torch is a CUDA build and
                              nvcc is found)
    TORCH_CUDA_ARCH_LIST      default "8.0;9.0" (A100, H100)
    MAX_JOBS                  parallel compile jobs (ninja)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_find_cuda_home():
    """selora_kernels/_cuda_home.py by path: the package itself is not importable while it is being built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_selora_cuda_home", ROOT / "selora_kernels" / "_cuda_home.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home


find_cuda_home = _load_find_cuda_home()
CPU_SOURCES = ["csrc/selora_ops.cpp"]
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "1"
    if value in ("0", "false", "no", "off"):
        return "0"
    raise SystemExit(f"{name}={value!r}: expected 0 or 1")


def _extensions():
    if _flag("SELORA_SKIP_EXTENSION") == "1":
        print("selora_kernels: SELORA_SKIP_EXTENSION=1, building the pure-Python package only")
        return [], {}
    try:
        import torch
    except ImportError as error:
        raise SystemExit(
            "selora_kernels: building the extension needs torch at build time; install torch first and use "
            "`pip install --no-build-isolation .` (or set SELORA_SKIP_EXTENSION=1)"
        ) from error

    build_cuda = _flag("SELORA_BUILD_CUDA")
    cuda_home = find_cuda_home()
    nvcc_found = cuda_home is not None and (Path(cuda_home) / "bin" / "nvcc").exists()
    if build_cuda == "1":
        if torch.version.cuda is None or not nvcc_found:
            raise SystemExit(
                f"SELORA_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and nvcc "
                f"{'found under ' + cuda_home if nvcc_found else 'not found'}")
        with_cuda = True
    elif build_cuda == "0":
        with_cuda = False
    else:
        with_cuda = torch.version.cuda is not None and nvcc_found and bool(CUDA_SOURCES)

    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch.utils.cpp_extension as cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case cpp_extension was imported before the env was set

    define_macros = [("SELORA_PYTHON_MODULE", None)]
    extra_compile_args = {"cxx": ["-O3"]}
    include_dirs = [str(ROOT / "csrc")]
    if with_cuda:
        define_macros.append(("SELORA_WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3"]
        extension = cpp_extension.CUDAExtension(
            "selora_kernels._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=include_dirs,
            define_macros=define_macros, extra_compile_args=extra_compile_args)
    else:
        extension = cpp_extension.CppExtension(
            "selora_kernels._C", CPU_SOURCES, include_dirs=include_dirs,
            define_macros=define_macros, extra_compile_args=extra_compile_args)
    print(f"selora_kernels: building selora_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU only'}"
          f"{', TORCH_CUDA_ARCH_LIST=' + os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else ''})")
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="selora_kernels",
    version="0.1.0",
    description="SeLoRA: LoRA adapters that grow rank at run time inside fixed capacity buffers",
    # the programs of python/ install as selora_kernels_programs, behind console scripts
    packages=find_packages(include=["selora_kernels", "selora_kernels.*"]) + ["selora_kernels_programs"],
    package_dir={"selora_kernels_programs": "python"},
    # one per program: selora-finetune, selora-generate, selora-evaluate, selora-compare, selora-demo, selora-demo-toy
    entry_points={"console_scripts": [
        f"selora-{name.replace('_', '-')}=selora_kernels_programs.{name}:main"
        for name in ("finetune", "generate", "evaluate", "compare", "demo", "demo_toy")]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
