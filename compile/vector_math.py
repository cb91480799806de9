"""Vectorisable exp2 and SiLU for the CPU kernels.

LLVM has no vector exp on x86 and calls expf lane by lane, slower than the matmuls around it; these
are polynomials that LLVM vectorises. Each lane's arithmetic is the same whatever the vector it sits
in, so a row's result does not depend on the rows computed with it.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

LOG2E = math.log2(math.e)
# 2^f on [-0.5, 0.5] as 1 + f * poly(f) (Cephes' exp2f): relative error below 1e-7, as exp2f's.
EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
             2.402264791363012e-1, 6.931472028550421e-1)


def exp2(x):
    """2^x for x <= 0: 2^round(x) from the exponent bits times 2^f by EXP2_POLY (x below -127 gives
    0, where 2^x is below the smallest normal float)."""
    x = T.max(x, T.float32(-127))
    n = T.floor(x + T.float32(0.5))
    f = x - n
    poly = T.float32(EXP2_POLY[0])
    for coefficient in EXP2_POLY[1:]:
        poly = poly * f + T.float32(coefficient)
    return T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23)) * (T.float32(1) + f * poly)


def silu(x):
    """x * sigmoid(x) in float32, from 2^(-|x| log2 e) so that exp2's argument is never positive
    (-|x| as min(x, -x): TVM's C source target has no lowering for a float abs)."""
    t = exp2(T.min(x, -x) * T.float32(LOG2E))
    return x * T.Select(x >= T.float32(0), T.float32(1), t) / (T.float32(1) + t)
