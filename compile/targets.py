"""--device names -> TVM targets, refusing early what the installed TVM cannot build."""

from __future__ import annotations

import tvm
from numpy._core._multiarray_umath import __cpu_features__ as NUMPY_CPU_FEATURES
from tvm.target import codegen

from ..interface.artifact import DEVICES
from .config import CompileError


# The TVM build option that provides each GPU code generator.
_BUILD_OPTION = {"cuda": "USE_CUDA", "vulkan": "USE_VULKAN", "metal": "USE_METAL",
                 "opencl": "USE_OPENCL", "webgpu": "USE_LLVM"}


def host_target() -> dict:
    """LLVM for this CPU: its own mcpu, so vector width and float16 conversions are native."""
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


# Code generators whose output runs on the CPU, selectable for device cpu with a cpu_target.
CPU_TARGET_KINDS = ("llvm", "c")


def resolve_target(device: str, cuda_arch: str = "sm_90", cpu_target: dict | None = None) -> tvm.target.Target:
    if device not in DEVICES:
        raise CompileError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if cpu_target is not None:
        return _cpu_target(device, cpu_target)
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


def _cpu_target(device: str, target: dict) -> tvm.target.Target:
    if device != "cpu" or target.get("kind") not in CPU_TARGET_KINDS:
        raise CompileError(f"cpu_target is for device cpu, with kind {' or '.join(CPU_TARGET_KINDS)}; "
                           f"got device {device!r} and target {target!r}")
    return tvm.target.Target(target)


def model_target(target: tvm.target.Target) -> tvm.target.Target:
    """The target the model's kernels are chosen and scheduled for. TVM's paged KV cache and dlight pick
    their CPU variants only for kind llvm, so the C source target takes generic LLVM's kernels and
    schedules; only the code generator differs."""
    return tvm.target.Target({"kind": "llvm"}) if target.kind.name == "c" else target


# LLVM's names for the CPU features whose numpy name is not simply the upper case without dots.
_NUMPY_NAMES = {"fma": "FMA3"}


def required_cpu_features(target: tvm.target.Target) -> tuple[str, ...]:
    """The host CPU features the target's code may use, in numpy's names (numpy reads them with cpuid
    at run time, so the runtime can check a host without TVM's compiler): what an artifact compiled
    for one CPU needs of the CPU it loads on, where it would otherwise die of an illegal instruction."""
    host = target if target.kind.name in CPU_TARGET_KINDS else target.host
    if host is None or host.kind.name != "llvm":
        return ()
    names = {_NUMPY_NAMES.get(f, f.upper().replace(".", "")) for f in codegen.llvm_get_cpu_features(host)}
    return tuple(sorted(names & set(NUMPY_CPU_FEATURES)))
