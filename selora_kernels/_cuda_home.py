"""Where the CUDA toolkit is: shared by setup.py (loaded by path, before the package is importable) and the
JIT loader in _extension.py. Standard library only."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional


def find_cuda_home() -> Optional[str]:
    """CUDA_HOME as torch finds it, except that an nvcc wrapper script or symlink (e.g. /usr/local/bin/nvcc)
    is resolved to a toolkit directory that really holds include/cuda_runtime.h and lib64/libcudart."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return str(Path(nvcc).parent.parent) if nvcc else None
