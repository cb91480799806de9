"""The CPU matmul over quantized weights (quantization.py's packed layout), scheduled here.

With w = code * scale + min per group of inputs (32, or a K-quant's 32 or 16, whose float scale and
min are its super-block's times its own integer ones), a group adds to each output
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

from .quantization import HIGH_BITS, INPUTS_PER_WORD, LAYOUTS, code_offset, high_bit_offset, packed_shapes, packed_tiles


def code_at(stored: dict, bits: int, j, k, t):
    """The integer code of input k, output lane t of tile j, from the stored tensors by their
    quantization.packed_shapes names (5- and 6-bit codes: "weight" and "high_bits")."""
    weight = stored["weight"]
    if bits == 8:
        return weight[j, k // INPUTS_PER_WORD[8], t, k % 4]
    nibble = tirx.bitwise_and(tirx.shift_right(weight[j, k // INPUTS_PER_WORD[4], t], code_offset(4, k).astype("uint32")),
                              tirx.const(15, "uint32"))
    if bits == 4:
        return nibble
    word = stored["high_bits"][j, k // HIGH_BITS[bits], t]
    high = tirx.bitwise_and(tirx.shift_right(word, high_bit_offset(bits, k).astype("uint32")),
                            tirx.const((1 << (bits - 4)) - 1, "uint32"))
    return tirx.bitwise_or(nibble, tirx.shift_left(high, tirx.const(4, "uint32")))


def group_scale_min(fmt: str, stored: dict, j, g, t):
    """The float32 scale and min (None without one) of group g, output lane t of tile j, from the
    stored "scales" (and a K-quant's "sub_scales"): Quantized.group_scales in TIR."""
    layout = LAYOUTS[fmt]
    scales, block = stored["scales"], g // (layout.block // layout.group)
    scale = scales[j, block, 0, t].astype("float32")
    low = scales[j, block, 1, t].astype("float32") if layout.has_min else None
    if layout.super_blocks:
        sub = stored["sub_scales"]
        scale = scale * sub[j, g, 0, t].astype("float32")
        low = None if low is None else -(low * sub[j, g, 1, t].astype("float32"))
    if layout.offset:
        low = scale * tirx.const(-layout.offset, "float32")
    return scale, low


def quantized_matmul(fmt: str, in_features: int, out_features: int, tile: int, row_block: int,
                     dtype: str) -> tirx.PrimFunc:
    """y[n, out] = x[n, in] @ W for n rows (symbolic), as a scheduled PrimFunc (x, weight, scales,
    [sub_scales,] y), with 5- and 6-bit codes' high_bits after the weight: packed_shapes' order."""
    layout = LAYOUTS[fmt]
    k_dim, size, r = in_features, layout.group, row_block
    groups, bits = k_dim // size, layout.bits
    tiles = packed_tiles(out_features, tile)
    shapes = packed_shapes(fmt, k_dim, tiles, tile)
    n = tirx.Var("n", "int64")
    x = te.placeholder((n, k_dim), dtype, "x")
    stored = {name: te.placeholder(*shape, name=name) for name, shape in shapes.items()}
    blocks = (n - 1) // r + 1

    def row(b, i):
        return tirx.min(b * r + i, n - 1)

    kk = te.reduce_axis((0, size), "kk")
    dot = te.compute((blocks, r, tiles, groups, tile), lambda b, i, j, g, t: te.sum(
        x[row(b, i), g * size + kk].astype("float32") * code_at(stored, bits, j, g * size + kk, t).astype("float32"),
        axis=kk),
        name="group_dot")
    if layout.has_min or layout.offset:
        kx = te.reduce_axis((0, size), "kx")
        x_sum = te.compute((n, groups), lambda s, g: te.sum(x[s, g * size + kx].astype("float32"), axis=kx),
                           name="group_sum")

    def term(b, i, j, g, t):
        scale, low = group_scale_min(fmt, stored, j, g, t)
        scaled = dot[b, i, j, g, t] * scale
        return scaled + x_sum[row(b, i), g] * low if low is not None else scaled

    g_axis = te.reduce_axis((0, groups), "g")
    acc = te.compute((blocks, r, tiles, tile), lambda b, i, j, t: te.sum(
        term(b, i, j, g_axis, t), axis=g_axis), name="matmul")
    y = te.compute((n, out_features), lambda s, c: acc[s // r, s % r, c // tile, c % tile].astype(dtype), name="unpack")
    func = te.create_prim_func([x, *stored.values(), y]).with_attr("tirx.noalias", True).without_attr("global_symbol")
    return _schedule(func).with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})


def _schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    matmul, dot = sch.get_sblock("matmul"), sch.get_sblock("group_dot")
    b, i, j, t, g = sch.get_loops(matmul)
    sch.reorder(j, b, g, i, t)
    sch.compute_at(dot, g)
    sch.set_scope(dot, 0, "local")  # one group's partial sums: registers, not a buffer the size of the output x groups
    *di, dt, dk = sch.get_loops(dot)[len(sch.get_loops(matmul)) - 2:]  # a one-row block has no row loop
    word, nibble = sch.split(dk, [None, 8])  # 8 inputs: a word of 4-bit codes, two of 8-bit ones
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
