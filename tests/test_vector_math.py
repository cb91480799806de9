"""The CPU's vectorised exp2 and SiLU (compile/vector_math.py) and the SwiGLU kernel built on them:
accurate over the whole range, extremes included."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from mlc_spec.compile.swiglu import swiglu_cpu
from mlc_spec.compile.vector_math import exp2, silu

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
EXTREMES = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.0, -88.0, 100.0, -100.0, 200.0, -200.0, 1e30, -1e30]


def _elementwise(fn, x: np.ndarray) -> np.ndarray:
    inp = te.placeholder(x.shape, "float32", "x")
    out = te.compute(x.shape, lambda i: fn(inp[i]), name="y")
    f = tvm.compile(te.create_prim_func([inp, out]), target=HOST)
    y = tvm.runtime.tensor(np.zeros_like(x))
    f(tvm.runtime.tensor(x), y)
    return y.numpy()


def test_exp2_is_exp2f_to_a_few_ulps_down_to_underflow():
    x = np.concatenate([np.linspace(-126, 0, 100_001), [-127.0, -150.0, -1e30]]).astype(np.float32)
    got, want = _elementwise(exp2, x).astype(np.float64), np.exp2(x.astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    assert np.all(np.abs(got[normal] - want[normal]) <= 3e-7 * want[normal])
    assert np.all(got[~normal] <= np.finfo(np.float32).tiny)  # at most the smallest normal, never garbage


def _silu(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-x))


def test_silu_is_accurate_everywhere_and_finite_at_the_extremes():
    """Relative error a few 1e-6 where silu is tiny (x * log2(e) rounds in float32, as the exponent of
    2^y), an absolute one below float32's smallest normal where it underflows."""
    x = np.concatenate([np.linspace(-30, 30, 100_001), EXTREMES]).astype(np.float32)
    got = _elementwise(silu, x).astype(np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _silu(x), rtol=4e-6, atol=1e-36)


def test_swiglu_kernel_is_silu_of_gate_times_up():
    intermediate = 72  # not a multiple of the 16-lane vector
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 2 * intermediate)) * 8).astype(np.float32)
    x[0, :len(EXTREMES)] = EXTREMES
    f = tvm.compile(swiglu_cpu(intermediate, "float32").with_attr("global_symbol", "swiglu"), target=HOST)
    y = tvm.runtime.tensor(np.zeros((5, intermediate), np.float32))
    f(tvm.runtime.tensor(x), y)
    want = _silu(x[:, :intermediate]) * x[:, intermediate:]
    np.testing.assert_allclose(y.numpy(), want, rtol=4e-6, atol=1e-30)
