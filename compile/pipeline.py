"""Relax compilation pipelines per device kind, and the CPU matmul schedule they use.

TVM 0.27's default CPU pipeline leaves kernels single-threaded and unvectorized; its dlight
cpu.GEMV rule hangs LLVM codegen. The CPU pipeline here schedules every matmul with one rule: the
weight ([in, out], see model.py) is tiled over output features, each tile is parallel over cores and
walked once for all the rows of the call, with a vector of output features accumulated per row, so
a verify forward of k+1 tokens reads each weight once.
"""

from __future__ import annotations

import contextlib

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.ir.expr import TensorLoad
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width

from .targets import model_target

# Output features per tile: four vector registers of accumulators per row.
_VECTORS_PER_TILE = 4


def weight_tile(target: tvm.target.Target) -> int | None:
    """The packed weight layout's tile (model.Linear) for CPU targets; GPUs keep [in, out]."""
    if target.kind.name != "llvm":
        return None
    return _VECTORS_PER_TILE * max(1, llvm_get_vector_width(target) // 32)


class CPUStreamingMatmul(CPUScheduleRule):
    """y[rows, j, t] = sum_k x[rows, k] * W[j, k, t] (model.Linear's packed layout), with an
    elementwise epilogue: tiles j in parallel, rows, then k, with the t outputs of a row vectorized."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
        if len(reductions) != 1 or reductions[0] != 0 or not _is_packed_matmul(sch, infos[0]):
            return None
        block = infos[0].block_rv
        *rows, tiles, lanes, k = sch.get_loops(block)
        sch.reorder(tiles, *([sch.fuse(*rows)] if rows else []), k, lanes)
        epilogues = [info.block_rv for info in infos[1:]]
        for epilogue in epilogues:
            sch.reverse_compute_at(epilogue, tiles)
        # parallel and vectorize need the reduction still whole; its init is split off last.
        sch.parallel(tiles)
        sch.vectorize(lanes)
        for epilogue in epilogues:
            sch.vectorize(sch.get_loops(epilogue)[-1])
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def _is_packed_matmul(sch: s_tir.Schedule, info) -> bool:
    """One reduction iterator, last; a read indexed [j, k, t] by the last two spatial iterators and k."""
    kind = info.dom_kind()
    if not (kind.endswith("SSR") and kind.count("R") == 1 and kind.startswith("S")):
        return False
    iters = [iv.var for iv in sch.get(info.block_rv).iter_vars]
    j, t, k = iters[-3], iters[-2], iters[-1]
    for region in sch.get(info.block_rv).reads:
        idx = [r.min for r in region.region]
        if len(idx) == 3 and idx[0].same_as(j) and idx[1].same_as(k) and idx[2].same_as(t):
            return True
    return False


def cpu_pipeline(target: tvm.target.Target):
    from tvm.relax.backend.cpu_generic import pipeline as cp

    return _pipeline(
        target,
        [_one_element_loads_at_zero]
        + cp.library_dispatch_passes(target)
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


@tvm.transform.module_pass(opt_level=0, name="OneElementLoadsAtZero")
def _one_element_loads_at_zero(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Index 0 for every load from a one-element buffer, the only in-bounds index.

    TVM 0.27's CPU prefill and tree attention (the paged-KV ones) read scale_O[d_idx] from a
    one-element buffer. LLVM, entitled to assume the access is in bounds, reads scale_O[0]; a C
    compiler reads past the buffer, and verify logits come out wrong.
    """
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = tvm_ffi.structural_map(func, (TensorLoad, _load_at_zero))
    return mod


def _load_at_zero(load):
    shape = load.source.shape
    if len(shape) == 1 and isinstance(shape[0], tirx.IntImm) and shape[0].value == 1:
        return tirx.BufferLoad(load.source, [tirx.IntImm(load.indices[0].ty.dtype, 0)])
    return load


def _lower_c_exp2(call):
    """exp2 for the C source target, which TVM gives no lowering rule (LLVM has an intrinsic)."""
    dtype = call.ty.dtype
    return tirx.call_pure_extern(dtype, "exp2f" if dtype == "float32" else "exp2", *call.args)


tirx.register_intrin_lowering("tirx.exp2", target="c", f=_lower_c_exp2, level=99)


def pass_context(target: tvm.target.Target):
    """C has no vector types: the C source target builds its vectorized loops as plain loops."""
    if target.kind.name == "c":
        return tvm.transform.PassContext(config={"tirx.disable_vectorize": True})
    return contextlib.nullcontext()


def _pipeline(target: tvm.target.Target, passes: list):
    @tvm.transform.module_pass(opt_level=0, name="MlcSpecPipeline")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def pipeline_for(target: tvm.target.Target):
    return cpu_pipeline(model_target(target)) if "cpu" in target.keys else gpu_pipeline(target)
