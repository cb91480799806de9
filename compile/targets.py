"""--device names -> TVM targets, refusing early what the installed TVM cannot build."""

from __future__ import annotations

import tvm
from tvm.target import codegen

from .config import CompileError

DEVICES = ("cpu", "cuda", "vulkan", "metal", "opencl", "webgpu")

# The TVM build option that provides each GPU code generator.
_BUILD_OPTION = {"cuda": "USE_CUDA", "vulkan": "USE_VULKAN", "metal": "USE_METAL",
                 "opencl": "USE_OPENCL", "webgpu": "USE_LLVM"}


def host_target() -> dict:
    """LLVM for this CPU: its own mcpu, so vector width and float16 conversions are native."""
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


def resolve_target(device: str, cuda_arch: str = "sm_90") -> tvm.target.Target:
    if device not in DEVICES:
        raise CompileError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    host = host_target()
    if device == "cpu":
        return tvm.target.Target(host)
    _require_codegen(device)
    if device == "cuda":
        from .cuda import require_device_codegen

        require_device_codegen()
        return tvm.target.Target({"kind": "cuda", "arch": cuda_arch}, host=host)
    return tvm.target.Target({"kind": device}, host=host)


def _require_codegen(device: str) -> None:
    if tvm.get_global_func(f"target.build.{device}", allow_missing=True) is None:
        raise CompileError(
            f"this TVM cannot generate {device} code (its {device} code generator is not built in); "
            f"install a TVM built with {_BUILD_OPTION[device]}=ON (see README.md, 'Other backends')"
        )

