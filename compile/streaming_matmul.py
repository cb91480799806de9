"""The CPU schedule rule for every float matmul over model.Linear's packed weights ([out/T, in, T]).

TVM 0.27's default CPU pipeline leaves kernels single-threaded and unvectorized, and its dlight cpu.GEMV
rule hangs LLVM codegen. Here tiles of T output features run in parallel, each streaming its contiguous
block of the weight once per block of rows, so a verify forward of up to five tokens reads each weight once.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width

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
