"""The one loader of the compiled ``selora_ext`` operator library.

Routes, tried lazily on first use (``SELORA_EXTENSION=auto``, the default):

1. ``aot``: ``import selora_kernels._C`` (built by ``pip install --no-build-isolation [-e] .``);
2. ``jit``: ``torch.utils.cpp_extension.load`` of ``csrc/selora_ops.cpp`` (+ the CUDA sources when a GPU,
   a CUDA build of torch and nvcc are present), cached under
   ``~/.cache/selora_kernels/jit-<torch version>-<hash of sources>``; only when ninja and a C++
   compiler are available;
3. ``fallback``: the pure-PyTorch implementations in ``selora_kernels.ops``, announced by ONE warning
   per process.

``SELORA_EXTENSION=aot|jit`` forces a route and raises (ImportError / RuntimeError) when it fails;
``SELORA_EXTENSION=off`` forces the fallback. Only one library is ever loaded per process, so the
``selora_ext`` namespace is never registered twice. Importing this module needs no compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from ._cuda_home import find_cuda_home

__all__ = ["extension_status", "has_extension", "load_extension", "EXTENSION_ENV", "JIT_LIBRARY_NAME"]

EXTENSION_ENV = "SELORA_EXTENSION"
JIT_LIBRARY_NAME = "selora_kernels_jit"
OP_NAMESPACE = "selora_ext"
_MODES = ("auto", "aot", "jit", "off")

_REPO_ROOT = Path(__file__).resolve().parent.parent
_CSRC = _REPO_ROOT / "csrc"

_lock = threading.Lock()
_status: str | None = None  # "aot" | "jit" | "fallback" once loaded
_failures: list[str] = []  # why earlier routes were not taken (shown in the fallback warning)
_warned = False


def _mode() -> str:
    mode = os.environ.get(EXTENSION_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{EXTENSION_ENV}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _namespace_registered() -> bool:
    try:
        torch.ops.selora_ext.adam_step_  # noqa: B018 (lookup raises when not registered)
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_aot() -> None:
    # optional compiled library, present only after `pip install`; importing it registers torch.ops.selora_ext
    import selora_kernels._C  # noqa: F401, PLC0415


def _jit_sources(with_cuda: bool) -> list[Path]:
    sources = [_CSRC / "selora_ops.cpp"]
    if with_cuda:
        sources += sorted((_CSRC / "cuda").glob("*.cu"))
    return sources


def _cache_root() -> Path:
    override = os.environ.get("SELORA_CACHE_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "selora_kernels"


def _try_jit() -> None:
    # heavy (pulls in setuptools) and needed only by the JIT route
    import torch.utils.cpp_extension as cpp_extension  # noqa: PLC0415

    if not (_CSRC / "selora_ops.cpp").exists():
        raise RuntimeError(f"C++ sources not found under {_CSRC} (installed without the repository?)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not available (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH)")
    cuda_home = find_cuda_home()
    with_cuda = bool(
        torch.version.cuda
        and torch.cuda.is_available()
        and cuda_home
        and (Path(cuda_home) / "bin" / "nvcc").exists()
    )
    if with_cuda and cpp_extension.CUDA_HOME != cuda_home:
        # torch guessed CUDA_HOME from the directory of an nvcc wrapper (e.g. /usr/local/bin).
        cpp_extension.CUDA_HOME = cuda_home
    sources = _jit_sources(with_cuda)
    digest = hashlib.sha256()
    for path in [*sources, *sorted(_CSRC.rglob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(b"cuda" if with_cuda else b"cpu")
    build_dir = _cache_root() / f"jit-{torch.__version__}-{digest.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=JIT_LIBRARY_NAME,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    why = "; ".join(_failures) if _failures else f"{EXTENSION_ENV}=off"
    warnings.warn(
        "selora_kernels: compiled extension not loaded, using the pure-PyTorch fallback for "
        f"torch.ops.{OP_NAMESPACE} ({why}). Build it with `pip install --no-build-isolation -e .` "
        "or install ninja and a C++ compiler for the JIT build.",
        RuntimeWarning,
        stacklevel=3,
    )


def load_extension() -> str:
    """Loads the extension once (thread-safe) and returns the route taken: aot, jit or fallback."""
    global _status
    if _status is not None:
        if _status == "fallback":
            _warn_fallback()
        return _status
    with _lock:
        if _status is None:
            _status = _load_locked()
    if _status == "fallback":
        _warn_fallback()
    return _status


def _load_locked() -> str:
    mode = _mode()
    if mode == "off":
        return "fallback"
    if mode in ("auto", "aot"):
        try:
            _try_aot()
            return "aot"
        except ImportError as error:
            if mode == "aot":
                raise ImportError(
                    f"{EXTENSION_ENV}=aot but selora_kernels._C could not be imported ({error}); build it "
                    "with `pip install --no-build-isolation -e .`"
                ) from error
            _failures.append(f"aot: {error}")
    if _namespace_registered():
        # Another copy (e.g. a CMake build loaded with torch.ops.load_library) already registered the ops.
        return "aot" if "selora_kernels._C" in sys.modules else "jit"
    try:
        _try_jit()
        return "jit"
    except Exception as error:  # noqa: BLE001 (any build failure means: no JIT route)
        if mode == "jit":
            raise RuntimeError(f"{EXTENSION_ENV}=jit but the JIT build failed: {error}") from error
        _failures.append(f"jit: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}")
    return "fallback"


def extension_status() -> str:
    """"aot", "jit" or "fallback" (loads the extension on first call)."""
    return load_extension()


def has_extension() -> bool:
    """True when torch.ops.selora_ext is backed by the compiled library."""
    return load_extension() != "fallback"
