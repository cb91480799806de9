"""Relax and TIR compilation pipelines per device kind.

The CPU pipeline schedules every float matmul with streaming_matmul's rule and repairs TVM's own CPU
attention kernels first (workarounds.py); GPUs get dlight's rules.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from . import workarounds
from .streaming_matmul import CPUStreamingMatmul
from .targets import model_target


def cpu_pipeline(target: tvm.target.Target):
    from tvm.relax.backend.cpu_generic import pipeline as cp

    return _pipeline(
        target,
        [workarounds.one_element_loads_at_zero, workarounds.loops_bounded_by_their_guard]
        + cp.library_dispatch_passes(target)
        + [relax.transform.FuseTransposeMatmul()]
        + cp.legalize_passes(target)
        + [dl.ApplyDefaultSchedule(CPUStreamingMatmul(), dl.cpu.Reduction())]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target),
    )


def gpu_pipeline(target: tvm.target.Target):
    """dlight's GPU rules, tensorize off (workarounds.mark_do_not_tensorize). Metal's matmul rule
    tensorizes regardless of that switch, so Metal leaves matmuls to the GEMV and fallback rules."""
    from tvm.relax.backend.cuda import pipeline as cp

    legalize = cp.legalize_passes(target)
    matmul = [] if target.kind.name == "metal" else [dl.gpu.Matmul()]
    return _pipeline(
        target,
        cp.library_dispatch_passes(target)
        + [relax.transform.FuseTransposeMatmul()]
        + legalize[:-1]  # the last one is dlight's default schedule, replaced below
        + [workarounds.mark_do_not_tensorize,
           dl.ApplyDefaultSchedule(*matmul, dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                   dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target),
    )


def _pipeline(target: tvm.target.Target, passes: list):
    @tvm.transform.module_pass(opt_level=0, name="MlcSpecPipeline")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def pipeline_for(target: tvm.target.Target):
    return cpu_pipeline(model_target(target)) if "cpu" in target.keys else gpu_pipeline(target)


def tir_pipeline_for(target: tvm.target.Target) -> str:
    """The TIR pipeline's registered name; workarounds.register() must have run for the C source one."""
    return workarounds.C_TIR_PIPELINE if target.kind.name == "c" else "default"
