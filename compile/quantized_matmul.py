"""The CPU matmul over quantized weights (quantization.py's packed layout), scheduled here.

With w = code * scale + min per group of 32 inputs, a group adds to each output
    scale * sum(x * code) + min * sum(x),
so the inner loop only turns codes into floats (shift, mask, convert) and multiply-adds them; a group's
scale and min are applied once per row. A 4-bit decode is compute-bound on CPUs (it reads a fifth of
the float bytes), and this is a fifth fewer vector instructions per weight than dequantizing each
weight first. Sums accumulate in float32 whatever the model's dtype.

Loops: tiles of T outputs in parallel; in a tile, blocks of `row_block` rows (1 for decode, 2-5 for
multi-token forwards); per group, the codes of each input are converted once and serve every row of
the block, whose partial sums stay in vector registers.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from .quantization import GROUP, INPUTS_PER_WORD, code_offset, packed_shapes, packed_tiles


def code_at(weight: te.Tensor, bits: int, j, k, t):
    """The integer code of input k, output lane t of tile j (quantization.packed_shapes' layout)."""
    if bits == 8:
        return weight[j, k // INPUTS_PER_WORD[8], t, k % 4]
    shift = code_offset(4, k).astype("uint32")
    return tirx.bitwise_and(tirx.shift_right(weight[j, k // INPUTS_PER_WORD[4], t], shift), tirx.const(15, "uint32"))


def quantized_matmul(bits: int, in_features: int, out_features: int, tile: int, row_block: int,
                     dtype: str) -> tirx.PrimFunc:
    """y[n, out] = x[n, in] @ W for n rows (symbolic), as a scheduled PrimFunc (x, weight, scales, y)."""
    k_dim, groups, r = in_features, in_features // GROUP, row_block
    tiles = packed_tiles(out_features, tile)
    shapes = packed_shapes(bits, k_dim, tiles, tile)
    n = tirx.Var("n", "int64")
    x = te.placeholder((n, k_dim), dtype, "x")
    weight = te.placeholder(*shapes["weight"], name="weight")
    scales = te.placeholder(*shapes["scales"], name="scales")
    blocks = (n - 1) // r + 1

    def row(b, i):
        return tirx.min(b * r + i, n - 1)

    kk = te.reduce_axis((0, GROUP), "kk")
    dot = te.compute((blocks, r, tiles, groups, tile), lambda b, i, j, g, t: te.sum(
        x[row(b, i), g * GROUP + kk].astype("float32") * code_at(weight, bits, j, g * GROUP + kk, t).astype("float32"),
        axis=kk),
        name="group_dot")
    if bits == 4:
        kx = te.reduce_axis((0, GROUP), "kx")
        x_sum = te.compute((n, groups), lambda s, g: te.sum(x[s, g * GROUP + kx].astype("float32"), axis=kx),
                           name="group_sum")

    def term(b, i, j, g, t):
        scaled = dot[b, i, j, g, t] * scales[j, g, 0, t].astype("float32")
        return scaled + x_sum[row(b, i), g] * scales[j, g, 1, t].astype("float32") if bits == 4 else scaled

    g_axis = te.reduce_axis((0, groups), "g")
    acc = te.compute((blocks, r, tiles, tile), lambda b, i, j, t: te.sum(
        term(b, i, j, g_axis, t), axis=g_axis), name="matmul")
    y = te.compute((n, out_features), lambda s, c: acc[s // r, s % r, c // tile, c % tile].astype(dtype), name="unpack")
    func = te.create_prim_func([x, weight, scales, y]).with_attr("tirx.noalias", True).without_attr("global_symbol")
    return _schedule(func).with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})


def _schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    matmul, dot = sch.get_sblock("matmul"), sch.get_sblock("group_dot")
    b, i, j, t, g = sch.get_loops(matmul)
    sch.reorder(j, b, g, i, t)
    sch.compute_at(dot, g)
    sch.set_scope(dot, 0, "local")  # one group's partial sums: registers, not a buffer the size of the output x groups
    *di, dt, dk = sch.get_loops(dot)[len(sch.get_loops(matmul)) - 2:]  # a one-row block has no row loop
    word, nibble = sch.split(dk, [None, 8])
    sch.reorder(word, nibble, *di, dt)
    sch.unroll(nibble)
    for loop in di + [i]:
        sch.unroll(loop)
    sch.vectorize(dt)
    sch.vectorize(t)
    sch.parallel(j)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(dot, word))[-1])
    sch.vectorize(sch.get_loops(sch.decompose_reduction(matmul, g))[-1])
    return sch.mod["main"]
