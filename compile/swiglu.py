"""SwiGLU on CPU: silu(gate) * up over the fused gate_up projection's output, vectorised.

TVM's own silu calls expf lane by lane and runs unvectorised, which made it cost as much as a
quantized matmul of a verify's extra rows; vector_math.silu is a polynomial LLVM vectorises.
"""

from __future__ import annotations

import math

from tvm import s_tir, te, tirx

from .vector_math import silu

VECTOR = 16  # float32 lanes of an AVX-512 register; LLVM splits it on narrower CPUs


def swiglu_cpu(intermediate: int, dtype: str) -> tirx.PrimFunc:
    """gate_up [n, 2 * intermediate] (gate, then up) -> [n, intermediate]."""
    n = tirx.Var("n", "int64")
    gate_up = te.placeholder((n, 2 * intermediate), dtype, "gate_up")
    y = te.compute((n, intermediate), lambda i, j: (silu(gate_up[i, j].astype("float32"))
                                                     * gate_up[i, intermediate + j].astype("float32")).astype(dtype),
                   name="swiglu")
    sch = s_tir.Schedule(te.create_prim_func([gate_up, y]).with_attr("tirx.noalias", True).without_attr("global_symbol"))
    _, j = sch.get_loops(sch.get_sblock("swiglu"))
    sch.vectorize(sch.split(j, [None, math.gcd(intermediate, VECTOR)])[1])
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})
