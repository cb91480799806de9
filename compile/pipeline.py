"""Relax compilation pipelines per device kind, and the CPU matmul schedule they use.

TVM 0.27's default CPU pipeline leaves kernels single-threaded and unvectorized; its dlight
cpu.GEMV rule hangs LLVM codegen. The CPU pipeline here schedules every matmul with one rule: the
weight ([in, out], see model.py) is tiled over output features, each tile is parallel over cores and
walked once for all the rows of the call, with a vector of output features accumulated per row, so
a verify forward of k+1 tokens reads each weight once.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width

# Output features per tile: four vector registers of accumulators per row on AVX2 (eight float32 lanes).
_LANES_PER_TILE = 4


class CPUStreamingMatmul(CPUScheduleRule):
    """matmul(x[..., K], W[K, N]) with an elementwise epilogue, N innermost in W."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
        if len(reductions) != 1 or reductions[0] != 0 or not _is_matmul(infos[0].dom_kind()):
            return None
        block = infos[0].block_rv
        if not _streams_last_spatial_axis(sch, block):
            return None
        *rows, n, k = sch.get_loops(block)
        tile = _LANES_PER_TILE * max(1, llvm_get_vector_width(target) // 32)
        n_outer, n_inner = sch.split(n, factors=[None, tile])
        sch.reorder(n_outer, *([sch.fuse(*rows)] if rows else []), k, n_inner)
        epilogues = [info.block_rv for info in infos[1:]]
        for epilogue in epilogues:
            sch.reverse_compute_at(epilogue, n_outer)
        # parallel and vectorize need the reduction still whole; its init is split off last.
        sch.parallel(n_outer)
        sch.vectorize(n_inner)
        for epilogue in epilogues:
            sch.vectorize(sch.get_loops(epilogue)[-1])
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def _is_matmul(dom_kind: str) -> bool:
    return dom_kind.endswith("SR") and dom_kind.count("R") == 1 and dom_kind.startswith("S")


def _streams_last_spatial_axis(sch: s_tir.Schedule, block) -> bool:
    """The weight operand must be indexed [k, n]: its last index is the block's last spatial iterator."""
    iters = sch.get(block).iter_vars
    n_var, k_var = iters[-2].var, iters[-1].var
    for region in sch.get(block).reads:
        idx = [r.min for r in region.region]
        if len(idx) == 2 and idx[0].same_as(k_var) and idx[1].same_as(n_var):
            return True
    return False


def cpu_pipeline(target: tvm.target.Target):
    from tvm.relax.backend.cpu_generic import pipeline as cp

    return _pipeline(
        target,
        cp.library_dispatch_passes(target)
        + [relax.transform.FuseTransposeMatmul()]
        + cp.legalize_passes(target)
        + [dl.ApplyDefaultSchedule(CPUStreamingMatmul(), dl.cpu.Reduction())]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target),
    )


def gpu_pipeline(target: tvm.target.Target):
    """dlight's GPU rules; tensorize is switched off because Schedule.tensorize segfaults in 0.27
    (float16 tensor-core matmuls on CUDA). Metal's matmul rule tensorizes regardless of that switch,
    so Metal leaves matmuls to the GEMV and fallback rules."""
    from tvm.relax.backend.cuda import pipeline as cp

    legalize = cp.legalize_passes(target)
    matmul = [] if target.kind.name == "metal" else [dl.gpu.Matmul()]
    return _pipeline(
        target,
        cp.library_dispatch_passes(target)
        + [relax.transform.FuseTransposeMatmul()]
        + legalize[:-1]  # the last one is dlight's default schedule, replaced below
        + [_mark_do_not_tensorize,
           dl.ApplyDefaultSchedule(*matmul, dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
                                   dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target),
    )


@tvm.transform.module_pass(opt_level=0, name="MarkDoNotTensorize")
def _mark_do_not_tensorize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
    return mod


def _pipeline(target: tvm.target.Target, passes: list):
    @tvm.transform.module_pass(opt_level=0, name="MlcSpecPipeline")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def pipeline_for(target: tvm.target.Target):
    return cpu_pipeline(target) if target.kind.name == "llvm" else gpu_pipeline(target)
