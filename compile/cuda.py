"""Real CUDA device code on a machine without an NVIDIA driver.

TVM 0.27 compiles CUDA kernels only when its CUDA runtime library (libtvm_runtime_cuda.so) is loaded,
and that library links against the driver's libcuda.so.1. Without the driver, tvm.compile silently
returns a source-only module that fails when loaded on the GPU machine later. Here a stub libcuda
(every call answers CUDA_ERROR_NO_DEVICE) is built with the system C compiler and loaded first, so
the runtime library loads and nvcc produces the fatbins the artifact carries.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

from .config import CompileError

# The driver symbols libtvm_runtime_cuda.so imports (TVM 0.27).
_STUB_SOURCE = r"""
#define STUB(name) int name() { return 100; }
STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction)
STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
static const char* kMsg = "CUDA_ERROR_NO_DEVICE (mlc_spec build stub)";
int cuGetErrorName(int e, const char** s) { *s = kMsg; return 0; }
int cuGetErrorString(int e, const char** s) { *s = kMsg; return 0; }
"""


def require_device_codegen() -> None:
    """Make tvm.compile emit real CUDA binaries, or fail with one line saying what is missing."""
    if shutil.which("nvcc") is None:
        raise CompileError("--device cuda needs nvcc, the CUDA toolkit's compiler, on PATH; install the CUDA toolkit")
    # The wheel's default NVRTC path needs the cuda-bindings package; nvcc works everywhere.
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    from tvm.base import _LOADED_LIBS, load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    _load_driver_stub()
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as err:
        raise CompileError(f"TVM's CUDA runtime library did not load ({err}); install a TVM built with USE_CUDA=ON") from None


def _load_driver_stub() -> None:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver, if one is installed
        return
    except OSError:
        pass
    ctypes.CDLL(str(_build_stub()), mode=ctypes.RTLD_GLOBAL)


def _build_stub() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlc_spec" / "libcuda-stub"
    library = cache / "libcuda.so.1"
    if library.is_file():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CompileError("--device cuda without an NVIDIA driver needs a C compiler (cc) to build a libcuda stub")
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "libcuda_stub.c"
    source.write_text(_STUB_SOURCE)
    partial = cache / f"libcuda.so.1.{os.getpid()}"
    subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(partial), str(source)],
                   check=True, capture_output=True)
    os.replace(partial, library)
    return library


def cuda_modules(module) -> list:
    return [m for m in _modules(module) if m.kind == "cuda"]


def check_device_code(module) -> None:
    """Refuse a library whose CUDA kernels are source only: it would fail to load on the GPU machine.
    Both kinds of module say "cuda"; only one built by nvcc is runnable."""
    cuda = cuda_modules(module)
    if not cuda or not all(m.is_runnable() for m in cuda):
        raise CompileError("the CUDA build produced source only, no device binary; "
                           "check that nvcc works and TVM's CUDA runtime library loads")


def _modules(module) -> list:
    found = [module]
    for imported in module.imports:
        found += _modules(imported)
    return found
