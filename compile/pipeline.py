"""Relax compilation pipelines per device kind, and the CPU matmul schedule they use.

TVM 0.27's default CPU pipeline leaves kernels single-threaded and unvectorized; its dlight
cpu.GEMV rule hangs LLVM codegen. The CPU pipeline here schedules every matmul with one rule over
model.Linear's packed weights ([out/T, in, T]): tiles of T output features run in parallel, each
streaming its contiguous block of the weight once per block of rows, so a verify forward of up to
five tokens reads each weight once. Two passes repair TVM's own CPU attention kernels first.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.ir.expr import TensorLoad
from tvm.ir.prim.expr import Let, Max, Min
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
    """y[rows, j, t] = sum_k x[rows, k] * W[j, k, t] (model.Linear's packed layout) and its elementwise
    epilogue. Tiles j run in parallel; inside a tile the weight streams once per block of rows.

    Row-by-row (one row per block: decode), each row walks k with its t outputs in vector registers.
    With a static row block (multi-token forwards), k is outside the block's unrolled rows: one weight
    row serves every row of the block, whose accumulators LLVM keeps in registers."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
        tiled = _packed_matmul_tiled(sch, infos[0]) if len(reductions) == 1 and reductions[0] == 0 else None
        if tiled is None:
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        # A single tile's loop is normalised away: then there is nothing to run in parallel.
        *rows, tiles, lanes, k = loops if tiled else [*loops[:-2], None, *loops[-2:]]
        block_rows = rows[-1] if len(rows) > 1 and _static_extent(sch, rows[-1]) > 1 else None
        outer = [tiles] if tiles is not None else []
        if block_rows is None:
            sch.reorder(*outer, *([sch.fuse(*rows)] if rows else []), k, lanes)
        else:
            sch.reorder(*outer, *rows[:-1], k, block_rows, lanes)
            sch.unroll(block_rows)
        if tiles is not None:
            _place_epilogues(sch, [info.block_rv for info in infos[1:]], tiles)
            # parallel and vectorize need the reduction still whole; its init is split off last.
            sch.parallel(tiles)
        sch.vectorize(lanes)
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def _static_extent(sch: s_tir.Schedule, loop) -> int:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else 0


def _place_epilogues(sch: s_tir.Schedule, epilogues: list, tiles) -> None:
    """Run each epilogue inside the tile loop where its region follows from the tile; one whose
    indexing TVM cannot bound (the unpacking of rows and tiles) stays after, with those behind it."""
    for epilogue in epilogues:
        try:
            sch.reverse_compute_at(epilogue, tiles)
        except s_tir.ScheduleError:
            return
        sch.vectorize(sch.get_loops(epilogue)[-1])


def _packed_matmul_tiled(sch: s_tir.Schedule, info) -> bool | None:
    """None unless the block reads a weight indexed [j, k, t] by the tile, reduction and lane
    iterators (k the only reduction, last); True when the tile iterator is there, False when a
    single tile left the constant 0 in its place."""
    kind = info.dom_kind()
    if not (kind.endswith("SR") and kind.count("R") == 1):
        return None
    iters = [iv.var for iv in sch.get(info.block_rv).iter_vars]
    t, k = iters[-2], iters[-1]
    j = iters[-3] if len(iters) >= 3 else None
    for region in sch.get(info.block_rv).reads:
        idx = [r.min for r in region.region]
        if len(idx) != 3 or not (idx[1].same_as(k) and idx[2].same_as(t)):
            continue
        if j is not None and idx[0].same_as(j):
            return True
        if isinstance(idx[0], tirx.IntImm) and idx[0].value == 0:
            return False
    return None


def cpu_pipeline(target: tvm.target.Target):
    from tvm.relax.backend.cpu_generic import pipeline as cp

    return _pipeline(
        target,
        [_one_element_loads_at_zero, _loops_bounded_by_their_guard]
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


@tvm.transform.module_pass(opt_level=0, name="LoopsBoundedByTheirGuard")
def _loops_bounded_by_their_guard(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """`for i in range(n): if i < m: body` -> `for i in range(min(n, m)): body`.

    TVM 0.27's CPU paged prefill attention walks the whole page pool (max_num_pages * page_size rows)
    for every query and head, skipping the rows past the sequence with that guard: with a cache sized
    for 8 sequences of 2048 tokens, a 5-token verify of SmolLM2 spent more time skipping rows than
    attending. Rows the guard skips do nothing, so bounding the loop by it changes no result.
    """
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = tvm_ffi.structural_map(func, (tirx.For, _bound_by_guard))
    return mod


def _bound_by_guard(loop):
    guard = loop.body
    if not (isinstance(guard, tirx.IfThenElse) and guard.else_case is None and isinstance(guard.condition, tirx.LT)):
        return loop
    bound = guard.condition.b
    if not (guard.condition.a.same_as(loop.loop_var) and _is_zero(loop.min) and bound.ty.dtype == loop.extent.ty.dtype
            and not _depends_on(bound, loop.loop_var, _stored_buffers(guard.then_case))):
        return loop
    return tirx.For(loop.loop_var, loop.min, tirx.Min(loop.extent, bound), loop.kind, guard.then_case,
                    loop.thread_binding, loop.annotations)


def _is_zero(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == 0


def _stored_buffers(stmt) -> list:
    stored = []
    tvm_ffi.structural_walk(stmt, (tirx.BufferStore, lambda node: stored.append(node.buffer)))
    return stored


def _depends_on(expr, var, buffers: list) -> bool:
    """Whether the loop can change expr: it reads the loop variable or a buffer the loop writes."""
    found = []
    tvm_ffi.structural_walk(expr, [
        (tirx.Var, lambda node: found.append(node) if node.same_as(var) else None),
        (TensorLoad, lambda node: found.append(node) if any(node.source.same_as(b) for b in buffers) else None),
    ])
    return bool(found)


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

_C_TIR_PIPELINE = "mlc_spec_c_source"


def _c_tir_pipeline():
    """TVM's TIR pipeline for the C source target. Vectorized loops stay plain loops (C has no vector
    types). After LowerIntrin, let expressions are inlined and integer min/max become selects: TVM's
    C code generator prints a let, or an operand of min/max, as a statement of its own, which lands
    in the middle of a workspace allocation whose size holds one."""
    lower, finalize_host, finalize_device = tirx.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="MlcSpecCSourceLowering")
    def _lower(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        with tvm.transform.PassContext(opt_level=ctx.opt_level, config={**ctx.config, "tirx.disable_vectorize": True}):
            return lower(mod)

    return _lower, lambda: tvm.transform.Sequential([finalize_host(), _c_expressions]), finalize_device


tirx.register_tir_pipeline(_C_TIR_PIPELINE, _c_tir_pipeline)


@tvm.transform.module_pass(opt_level=0, name="CSourceExpressions")
def _c_expressions(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    rewrites = [(Let, _inline_let), (Max, _int_select(lambda a, b: a > b)), (Min, _int_select(lambda a, b: a < b))]
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = tvm_ffi.structural_map(func, rewrites)
    return mod


def _inline_let(let):
    return tvm_ffi.structural_map(let.body, (tirx.Var, lambda v: let.value if v.same_as(let.var) else v))


def _int_select(first_if):
    def rewrite(e):
        if not str(e.ty.dtype).startswith(("int", "uint")):
            return e
        return tirx.Select(first_if(e.a, e.b), e.a, e.b)

    return rewrite


def tir_pipeline_for(target: tvm.target.Target) -> str:
    return _C_TIR_PIPELINE if target.kind.name == "c" else "default"


def _pipeline(target: tvm.target.Target, passes: list):
    @tvm.transform.module_pass(opt_level=0, name="MlcSpecPipeline")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _run


def pipeline_for(target: tvm.target.Target):
    return cpu_pipeline(model_target(target)) if "cpu" in target.keys else gpu_pipeline(target)
