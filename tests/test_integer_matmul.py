"""The integer dot-product matmul (compile/integer_matmul.py) on its own: llama.cpp's numerics, the
same bits for a row whatever the row block, the path each CPU gets, and the instructions it emits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import tvm

from gguf_files import random_blocks
from mlc_spec.compile.integer_matmul import (INTEGER_DOTS, activation_scales_shape, biased_activations, integer_dot,
                                             integer_matmul, quantize_activations)
from mlc_spec.compile.quantization import (FORMATS, GROUP, KEPT, SUPER_BLOCK, Quantized, from_gguf_blocks, pack,
                                           quantize)

IN, OUT, TILE = 512, 136, 64  # two K-quant super-blocks, sixteen groups of 32; a last tile of 8 real outputs out of 64
HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
RUNNABLE = [d for d in INTEGER_DOTS if all(tvm.target.codegen.target_has_features(f, HOST) for f in d.features)]


def dot_params():
    """Every integer path, skipped where this CPU cannot run it."""
    return [pytest.param(d, marks=() if d in RUNNABLE else pytest.mark.skip(f"this CPU has no {d.name}"), id=d.name)
            for d in INTEGER_DOTS]


def quantized_input(x: np.ndarray):
    """ggml's x86 Q8_0/Q8_1 quantizer: codes, float16-rounded scales, code sums and the exact scales."""
    blocks = x.reshape(len(x), -1, GROUP)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.rint(blocks * inverse[..., None]).astype(np.int64)
    d = (amax / np.float32(127)).astype(np.float32)
    return codes, d.astype(np.float16).astype(np.float32), codes.sum(axis=2), d


def q8_k_input(x: np.ndarray):
    """ggml's Q8_K quantizer: per 256 inputs, codes of -127 / (the input of largest magnitude) and d."""
    blocks = x.reshape(len(x), -1, SUPER_BLOCK)
    hi, lo = blocks.max(axis=2), blocks.min(axis=2)
    m = np.where(hi >= -lo, hi, lo)
    with np.errstate(divide="ignore"):
        iscale = np.where(m != 0, np.float32(-127) / m, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return np.minimum(127, np.rint(blocks * iscale[..., None])).astype(np.int64).reshape(len(x), -1), d


def k_quant_numerics(x: np.ndarray, q: Quantized) -> np.ndarray:
    """y per the module docstring of integer_matmul for K-quants, super-blocks summed in order in float32."""
    codes, d = q8_k_input(x)
    size = q.layout.group
    per_block = SUPER_BLOCK // size
    signed = q.codes.astype(np.int64) - q.layout.offset  # Q6_K's codes -32..31, as ggml multiplies them
    isum = np.einsum("ogk,ngk->nog", signed.reshape(OUT, -1, size), codes.reshape(len(x), -1, size))
    scaled = isum * q.sub[None, :, :, 0].astype(np.int64)
    x_sums = codes.reshape(len(x), -1, size).sum(axis=2)
    y = np.zeros((len(x), OUT), np.float32)
    for b in range(IN // SUPER_BLOCK):
        part = slice(b * per_block, (b + 1) * per_block)
        y += (q.scale[:, b].astype(np.float32)[None] * d[:, b, None]) * scaled[..., part].sum(axis=2).astype(np.float32)
        if q.min is not None:
            mins = (q.sub[None, :, part, 1].astype(np.int64) * x_sums[:, None, part]).sum(axis=2)
            y -= (q.min[:, b].astype(np.float32)[None] * d[:, b, None]) * mins.astype(np.float32)
    return y


def llama_cpp_numerics(x: np.ndarray, q: Quantized) -> np.ndarray:
    """y per the module docstring of integer_matmul, groups summed in order in float32."""
    if q.layout.super_blocks:
        return k_quant_numerics(x, q)
    codes, dx, sums, d = quantized_input(x)
    wcodes = q.codes.astype(np.int64).reshape(OUT, -1, GROUP)
    isum = np.einsum("ogk,ngk->nog", wcodes, codes)
    dw = q.scale.astype(np.float32)
    y = np.zeros((len(x), OUT), np.float32)
    for g in range(IN // GROUP):
        dd = dw[None, :, g] * dx[:, None, g]
        if q.format == "q4_0":
            y += dd * (isum[..., g] - 8 * sums[:, None, g]).astype(np.float32)
        elif q.format == "q4_1":
            s = (d[:, g] * sums[:, g].astype(np.float32)).astype(np.float16).astype(np.float32)
            y += dd * isum[..., g].astype(np.float32) + q.min[:, g].astype(np.float32)[None] * s[:, None]
        else:
            y += dd * isum[..., g].astype(np.float32)
    return y


def weights(fmt: str) -> Quantized:
    """Our quantizer's blocks, or random K-quant blocks (K-quants are only kept from files)."""
    if fmt in FORMATS:
        return quantize(np.random.default_rng(0).standard_normal((OUT, IN)).astype(np.float32), fmt)
    return from_gguf_blocks(random_blocks(gguf.GGMLQuantizationType[fmt.upper()], OUT, IN), fmt.upper(), (OUT, IN))


def activations(rows: int = 11):
    x = np.random.default_rng(1).standard_normal((rows, IN)).astype(np.float32)
    x[0, :GROUP] = 0  # an all-zero block: scale 0, no division by it
    x[1, GROUP:2 * GROUP] = 2.5  # a constant block
    x[2, :SUPER_BLOCK] = 0  # an all-zero super-block
    return x


def compile_pair(fmt: str, row_block: int, dot, target=HOST):
    quantize = quantize_activations(fmt, IN, "float32", biased_activations(fmt, dot))
    mod = tvm.IRModule({"quantize": quantize.with_attr("global_symbol", "quantize"),
                        "matmul": integer_matmul(fmt, IN, OUT, TILE, row_block, "float32", dot)
                        .with_attr("global_symbol", "matmul")})
    return tvm.compile(mod, target=target)


def run(lib, fmt: str, x: np.ndarray, packed: dict) -> np.ndarray:
    rows = len(x)
    codes = tvm.runtime.tensor(np.zeros((rows, IN), np.int8))
    scales = tvm.runtime.tensor(np.zeros((rows, *activation_scales_shape(fmt, IN)), np.float32))
    lib["quantize"](tvm.runtime.tensor(x), codes, scales)
    y = tvm.runtime.tensor(np.zeros((rows, OUT), np.float32))
    lib["matmul"](codes, scales, *(tvm.runtime.tensor(a) for a in packed.values()), y)
    return y.numpy()


@pytest.mark.parametrize("dot", dot_params())
@pytest.mark.parametrize("fmt", KEPT)
def test_computes_llama_cpp_numerics(fmt, dot):
    """Equal to a numpy model of the numerics up to float32 rounding of the per-group products, and
    within activation quantization's error of the float model on the dequantized weights."""
    x, q = activations(), weights(fmt)
    want = llama_cpp_numerics(x, q)
    got = run(compile_pair(fmt, 5, dot), fmt, x, pack(q, TILE))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    float_model = x @ q.dequantize().T
    assert np.abs(got - float_model).max() < 0.02 * np.abs(float_model).max()


@pytest.mark.parametrize("dot", dot_params())
@pytest.mark.parametrize("fmt", KEPT)
def test_a_row_gets_the_same_bits_in_any_row_block(fmt, dot):
    """Decode (one row alone), verify blocks of 2-8 rows and longer runs in blocks: identical outputs."""
    x = activations()
    packed = pack(weights(fmt), TILE)
    alone = np.concatenate([run(compile_pair(fmt, 1, dot), fmt, x[i:i + 1], packed) for i in range(len(x))])
    for row_block in (2, 3, 5, 8):
        np.testing.assert_array_equal(run(compile_pair(fmt, row_block, dot), fmt, x, packed), alone,
                                      err_msg=f"row block {row_block}")


@pytest.mark.parametrize("cpu, path", [("znver4", "avx512_vnni"), ("sapphirerapids", "avx512_vnni"),
                                       ("alderlake", "avx_vnni"), ("znver2", "avx2"), ("haswell", "avx2"),
                                       ("x86-64", None)])
def test_each_cpu_gets_its_best_integer_dot(cpu, path):
    dot = integer_dot(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    assert (dot and dot.name) == path
    assert integer_dot(tvm.target.Target({"kind": "llvm"})) is None  # the cross-backend tests' generic CPU


@pytest.mark.parametrize("fmt", ["q4_1", "q4_k"])
@pytest.mark.parametrize("cpu, instruction", [("znver4", "\tvpdpbusd\t"), ("alderlake", "{vex}\tvpdpbusd\t"),
                                              ("znver2", "\tvpmaddubsw\t")])
def test_emits_the_integer_dot_instruction(cpu, instruction, fmt):
    """LLVM does not form these by itself: the kernel calls them, for CPUs this one may not be."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    asm = compile_pair(fmt, 5, integer_dot(target), target).mod.inspect_source("asm")
    assert instruction in asm
