"""The CPU matmul over quantized weights with integer dot products: llama.cpp's numerics on x86.

Each linear quantizes its input once (quantize_activations): per row and block of 32 inputs, int8
codes round(x * 127 / amax), halves to even, and the scale d_x = amax / 127 rounded to float16, as
ggml's x86 Q8_0 and Q8_1 quantizers do. A group of 32 inputs then adds to each output

    q8_0: (d_w * d_x) * isum
    q4_0: (d_w * d_x) * (isum - 8 * sum(x codes))
    q4_1: (d_w * d_x) * isum + m_w * s_x,    s_x = float16(amax / 127 * sum(x codes)) (Q8_1's sum)

where isum = sum(w code * x code) is exact in int32 (vpdpbusd, or pmaddubsw + pmaddwd).

K-quants take ggml's Q8_K activations instead: per row and super-block of 256 inputs, codes
min(127, round(x * -127 / m)) with m the input of largest magnitude (the positive one on a tie), halves
to even, a float32 scale d_x = 1 / (-127 / m), and the code sums of each group. A super-block then adds

    q4_k, q5_k: (d_w * d_x) * sum_g(sc_g * isum_g) - (dmin_w * d_x) * sum_g(m_g * sum_g(x codes))
    q6_k: (d_w * d_x) * sum_g(sc_g * (isum_g - 32 * sum_g(x codes)))

with both sums exact in int32, as ggml's vec_dot_q4_K_q8_K and vec_dot_q6_K_q8_K compute them (on
AVX2 the group's integer scale is the pmaddwd operand that widens the 16-bit pair sums). Each row
accumulates its groups (super-blocks) in order with fused multiply-adds, the same instructions whatever
the number of rows, so an output is bit-identical whether its row is computed alone or in a block of rows.

Loops: tiles of T outputs in parallel; in a tile, blocks of `row_block` rows (then the n % row_block
rows left as one smaller block), vectors of outputs, then groups; a group's weight codes are unpacked
once into registers and serve every row of the block, whose accumulators stay in registers.
"""

from __future__ import annotations

import dataclasses
import functools

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.target import codegen
from tvm.tirx.op import fma
from tvm.tirx.script import builder as T

from .quantization import BITS, GROUP, HIGH_BITS, INPUTS_PER_WORD, LAYOUTS, SUPER_BLOCK, packed_shapes, packed_tiles

INPUTS_PER_LANE = 4  # a dot product's byte operands cover four inputs per 32-bit lane


@dataclasses.dataclass(frozen=True)
class IntegerDot:
    """An x86 integer dot product: lanes int32 outputs per vector, from bytes u8 x s8."""
    name: str
    lanes: int
    features: tuple[str, ...]

    @property
    def byte_type(self) -> str:
        return f"int8x{4 * self.lanes}"

    @property
    def int_type(self) -> str:
        return f"int32x{self.lanes}"

    @property
    def biases_int8_activations(self) -> bool:
        """Whether int8 weights meet activations + 128: vpdpbusd adds its u8 x s8 products in int32, so
        the weights can be its signed operand as they are, and sum(x w) = sum((x + 128) w) - 128 sum(w)
        with 128 sum(w) shared by every row. pmaddubsw saturates its pair sums at 2^15, which
        255 * 128 * 2 exceeds: AVX2 gives the activations the weights' signs instead (sign_by)."""
        return self.name != "avx2"

    def dot(self, unsigned: list, signed: list, pairs_fit_int16: bool, start=None, chains: int = 1):
        """start + sum_m unsigned[m] . signed[m] per 32-bit lane, as int32 (start: VNNI only). pairs_fit_int16:
        the 16-bit sums of adjacent products over all m cannot overflow (4-bit codes times int8:
        16 * 15 * 128 < 2^15). chains: VNNI accumulators the products alternate between, summed at the
        end; int32 sums are exact, so any number gives the same bits."""
        if self.name == "avx2":
            products = [_pmaddubsw(u, s) for u, s in zip(unsigned, signed)]
            if pairs_fit_int16:
                return _pmaddwd_ones(_sum(products))
            return _sum([_pmaddwd_ones(p) for p in products])
        zero = tirx.Broadcast(tirx.const(0, "int32"), self.lanes)
        sums = [zero if start is None else start] + [zero] * (min(chains, len(unsigned)) - 1)
        for m, (u, s) in enumerate(zip(unsigned, signed)):
            sums[m % len(sums)] = tirx.call_llvm_pure_intrin(
                self.int_type, f"llvm.x86.avx512.vpdpbusd.{32 * self.lanes}", sums[m % len(sums)], u, s)
        return _sum(sums)

    def scaled_dot(self, unsigned: list, signed: list, scale, pairs_fit_int16: bool, start=None, chains: int = 1):
        """dot(unsigned, signed) times each lane's int32 scale (|scale| < 2^15): on AVX2 the scale,
        repeated in both halves of its lane, is the pmaddwd operand that widens the 16-bit pair sums, as
        ggml's K-quant dot products do, once for all of them when their sum fits int16 (see dot)."""
        if self.name != "avx2":
            return self.dot(unsigned, signed, pairs_fit_int16, start, chains) * scale
        halves = tirx.reinterpret("int16x16", tirx.bitwise_or(
            tirx.shift_left(scale, tirx.Broadcast(tirx.const(16, "int32"), self.lanes)),
            tirx.bitwise_and(scale, tirx.Broadcast(tirx.const(0xFFFF, "int32"), self.lanes))))
        products = [_pmaddubsw(u, s) for u, s in zip(unsigned, signed)]
        if pairs_fit_int16:
            return _pmaddwd(_sum(products), halves)
        return _sum([_pmaddwd(p, halves) for p in products])

    def sign_by(self, x, w):
        """x with the sign of w applied (0 where w is 0), bytewise: signed(x) . |w| = x . w."""
        if self.lanes == 8:  # psignb: AVX2, and so on every AVX-VNNI CPU
            return tirx.call_llvm_pure_intrin(self.byte_type, "llvm.x86.avx2.psign.b", x, w)
        zero = tirx.Broadcast(tirx.const(0, "int8"), 4 * self.lanes)
        return tirx.Select(w < zero, zero - x, x)


# Fastest first; the first one a target has is used. AVX-VNNI's vpdpbusd is the 256-bit form of
# AVX512-VNNI's intrinsic, encoded with VEX when the CPU has no AVX-512.
INTEGER_DOTS = (
    IntegerDot("avx512_vnni", 16, ("avx512vnni", "avx512bw")),
    IntegerDot("avx_vnni", 8, ("avxvnni", "avx2", "fma")),
    IntegerDot("avx2", 8, ("avx2", "fma")),
)


def integer_dot(target: tvm.target.Target) -> IntegerDot | None:
    """The integer dot product this CPU target has; None (the float path) for targets without one,
    such as the generic {"kind": "llvm"}."""
    if target.kind.name != "llvm":
        return None
    for dot in INTEGER_DOTS:
        if all(codegen.target_has_features(f, target) for f in dot.features):
            return dot
    return None


def _pmaddubsw(u, s):
    return tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u, s)


def _pmaddwd(pairs, words):
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, words)


def _pmaddwd_ones(pairs):
    return _pmaddwd(pairs, tirx.Broadcast(tirx.const(1, "int16"), 16))


def _sum(terms: list):
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def activation_scales_shape(fmt: str, in_features: int) -> tuple[int, int]:
    """Per row, blocks of inputs and their float32 scales: per group of 32, d_x then (4-bit) the block
    sum term, Q4_0's -8 * sum(codes) or Q4_1's s_x; for K-quants, per super-block (Q8_K), d_x then
    (with mins or an offset) the code sums of its groups."""
    layout = LAYOUTS[fmt]
    if layout.super_blocks:
        return in_features // SUPER_BLOCK, 1 + (SUPER_BLOCK // layout.group if _group_sums(layout) else 0)
    return in_features // GROUP, 2 if layout.bits == 4 else 1


def _group_sums(layout) -> bool:
    """Whether a K-quant's terms need each group's sum of activation codes: for its mins, or its offset."""
    return layout.has_min or layout.offset != 0


# -- activations ------------------------------------------------------------------------------------
def biased_activations(fmt: str, dot: IntegerDot) -> bool:
    """Whether fmt's activation codes are stored + 128 for this dot product (biases_int8_activations)."""
    return LAYOUTS[fmt].bits == 8 and dot.biases_int8_activations


QUANTIZE_LANES = 16  # float32 inputs a quantizer reads at once (one AVX-512 vector, two AVX2 ones)


def quantize_activations(fmt: str, in_features: int, dtype: str, biased: bool = False) -> tirx.PrimFunc:
    """x[n, in] -> int8 codes [n, in] (biased: code + 128, as the bytes of a uint8) and float32 scales
    [n, *activation_scales_shape(fmt)]. Written with explicit vectors: TVM vectorised a scheduled
    compute of it into gathers and byte-by-byte stores, 3.5-5x slower (a 5-row verify's four quantizers
    took as long as a decode's attention)."""
    layout = LAYOUTS[fmt]
    block = SUPER_BLOCK if layout.super_blocks else GROUP
    n = tirx.Var("n", "int64")
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "tir.is_scheduled": True})
            x = T.arg("x", T.Buffer((n, in_features), dtype))
            codes = T.arg("codes", T.Buffer((n, in_features), "int8"))
            scales = T.arg("scales", T.Buffer((n, *activation_scales_shape(fmt, in_features)), "float32"))
            # a root block: relax's RewriteDataflowReshape inspects one-input functions and expects one
            with T.sblock("root"), T.serial(0, n) as s, T.serial(0, in_features // block) as b:
                quantize = _quantize_super_block if layout.super_blocks else _quantize_group
                quantize(fmt, _Inputs(x, codes, s, b * block, biased), scales, b)
    return builder.get()


@dataclasses.dataclass
class _Inputs:
    """A block of a row's inputs, read and written QUANTIZE_LANES at a time."""
    x: object
    codes: object
    row: object
    k0: object
    biased: bool

    def vector(self, k: int):
        lanes = QUANTIZE_LANES
        return T.Bind(self.x.vload([self.row, self.k0 + k], f"{self.x.dtype}x{lanes}").astype(f"float32x{lanes}"))

    def store_codes(self, k: int, code):
        """Store integral float codes in -127..127 as int8, + 128 (wrapping) when biased; returns their
        int32 values."""
        lanes = QUANTIZE_LANES
        value = T.Bind(code.astype(f"int32x{lanes}"))
        stored = value + tirx.Broadcast(tirx.const(128, "int32"), lanes) if self.biased else value
        T.buffer_store(self.codes, stored.astype(f"int8x{lanes}"), [self.row, tirx.Ramp(self.k0 + k, 1, lanes)])
        return value


def _quantize_group(fmt: str, inputs: _Inputs, scales, g) -> None:
    """ggml's Q8_0 (and Q8_1's sum) of one group of 32 inputs: module docstring."""
    vectors = [inputs.vector(k) for k in range(0, GROUP, QUANTIZE_LANES)]
    amax = T.Bind(_horizontal(tirx.Max, _tree(tirx.Max, [tirx.abs(v) for v in vectors]), "float32"))
    inverse = T.Bind(tirx.Select(amax != 0, tirx.const(127, "float32") / amax, tirx.const(0, "float32")))
    values = [inputs.store_codes(m * QUANTIZE_LANES, tirx.nearbyint(v * tirx.Broadcast(inverse, QUANTIZE_LANES)))
              for m, v in enumerate(vectors)]
    d = T.Bind(amax / tirx.const(127, "float32"))
    T.buffer_store(scales, _float16(d), [inputs.row, g, 0])
    if fmt == "q8_0":
        return
    total = _horizontal(tirx.Add, _sum(values), "int32")
    term = (total * -8).astype("float32") if fmt == "q4_0" else _float16(d * total.astype("float32"))
    T.buffer_store(scales, term, [inputs.row, g, 1])


def _quantize_super_block(fmt: str, inputs: _Inputs, scales, b) -> None:
    """ggml's Q8_K of one super-block of 256 inputs, with its groups' code sums: module docstring."""
    layout = LAYOUTS[fmt]
    vectors = [inputs.vector(k) for k in range(0, SUPER_BLOCK, QUANTIZE_LANES)]
    hi = T.Bind(_horizontal(tirx.Max, _tree(tirx.Max, vectors), "float32"))
    lo = T.Bind(_horizontal(tirx.Min, _tree(tirx.Min, vectors), "float32"))
    m = T.Bind(tirx.Select(hi >= -lo, hi, lo))  # the input of largest magnitude, the positive one on a tie
    inverse = T.Bind(tirx.Select(m != 0, tirx.const(-127, "float32") / m, tirx.const(0, "float32")))
    per_group = layout.group // QUANTIZE_LANES
    for part in range(SUPER_BLOCK // layout.group):
        values = []
        for v in range(part * per_group, (part + 1) * per_group):
            code = tirx.Min(tirx.nearbyint(vectors[v] * tirx.Broadcast(inverse, QUANTIZE_LANES)),
                            tirx.Broadcast(tirx.const(127, "float32"), QUANTIZE_LANES))
            values.append(inputs.store_codes(v * QUANTIZE_LANES, code))
        if _group_sums(layout):
            total = _horizontal(tirx.Add, _sum(values), "int32")
            T.buffer_store(scales, total.astype("float32"), [inputs.row, b, 1 + part])
    d = tirx.Select(inverse != 0, tirx.const(1, "float32") / inverse, tirx.const(0, "float32"))
    T.buffer_store(scales, d, [inputs.row, b, 0])


def _float16(value):
    """A float32 rounded to float16 and back: a scale as ggml stores it."""
    return value.astype("float16").astype("float32")


def _tree(op, terms: list):
    """op over terms as a balanced tree (independent operations in flight; max, min and int sums are exact)."""
    while len(terms) > 1:
        terms = [op(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _horizontal(op, vector, dtype: str):
    """op over the QUANTIZE_LANES lanes of a vector, through a stack slot (a "global" scope buffer: see _zeros)."""
    slot = T.alloc_buffer((QUANTIZE_LANES,), dtype, scope="global")
    T.buffer_store(slot, vector, [tirx.Ramp(0, 1, QUANTIZE_LANES)])
    return _tree(op, [slot[i] for i in range(QUANTIZE_LANES)])


# -- the matmul -------------------------------------------------------------------------------------
def integer_matmul(fmt: str, in_features: int, out_features: int, tile: int, row_block: int, dtype: str,
                   dot: IntegerDot) -> tirx.PrimFunc:
    """y[n, out] from quantize_activations' codes and scales and a packed weight, as a scheduled
    PrimFunc (x codes, x scales, weight, scales, y)."""
    r = row_block
    tiles = packed_tiles(out_features, tile)
    shapes = packed_shapes(fmt, in_features, tiles, tile)
    n = tirx.Var("n", "int64")
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "tir.is_scheduled": True})
            xq = T.arg("x_codes", T.Buffer((n, in_features), "int8"))
            xs = T.arg("x_scales", T.Buffer((n, *activation_scales_shape(fmt, in_features)), "float32"))
            stored = {name: T.arg(name, T.Buffer(*shape)) for name, shape in shapes.items()}
            y = T.arg("y", T.Buffer((n, out_features), dtype))
            with T.parallel(0, tiles) as j:
                pass_kind = _super_block_rows_pass if LAYOUTS[fmt].super_blocks else _rows_pass
                rows_pass = functools.partial(pass_kind, fmt, dot, xq, xs, stored, y, j, tile)
                with T.serial(0, n // r) as b:
                    rows_pass([b * r + i for i in range(r)])
                for tail in range(1, r):  # the last n % r rows as a block of their own, not a padded one
                    with T.If(n % r == tail), T.Then():
                        rows_pass([n - tail + i for i in range(tail)])
    return builder.get()


def _chains(rows: list) -> int:
    """VNNI accumulators per row's group sum: two in a block of rows, whose back-to-back dependent
    vpdpbusds otherwise set the pace (measured on the 1.5B-shaped Q4_0 model: verify(1)/decode 1.11 ->
    1.07); one in a decode, which waits on memory and was 3% slower with two."""
    return 2 if len(rows) > 1 else 1


def _rows_pass(fmt: str, dot: IntegerDot, xq, xs, stored: dict, y, j, tile: int, rows: list) -> None:
    """These rows' outputs of tile j: per vector of outputs, a pass over the groups with one
    accumulator per row in registers and each group's codes unpacked once for all rows."""
    bits, lanes, weight, scales = BITS[fmt], dot.lanes, stored["weight"], stored["scales"]
    with T.serial(0, tile // lanes) as c:
        acc = _zeros(len(rows), lanes, "float32")
        with T.serial(0, xs.shape[1]) as g:
            _prefetch(j, g, [(weight, GROUP // INPUTS_PER_WORD[bits]), (scales, 1)])
            codes = _unpack(dot, bits, GROUP, weight, j, g, c * lanes)
            w_scale = T.Bind(_lanes_f32(scales, j, g, 0, c * lanes, lanes))
            w_min = T.Bind(_lanes_f32(scales, j, g, 1, c * lanes, lanes)) if fmt == "q4_1" else None
            for i, row in enumerate(rows):
                isum = dot.dot(*codes.operands(dot, xq, row, g * GROUP), pairs_fit_int16=bits == 4, start=codes.start,
                               chains=_chains(rows))
                old = acc.vload([i, 0], f"float32x{lanes}")
                T.buffer_store(acc, _accumulate(fmt, old, isum, w_scale, w_min, xs, row, g, lanes),
                               [i, tirx.Ramp(0, 1, lanes)])
        for i, row in enumerate(rows):
            _store(y, acc, i, row, j * tile + c * lanes, lanes, int(y.shape[1]), tile)


def _super_block_rows_pass(fmt: str, dot: IntegerDot, xq, xs, stored: dict, y, j, tile: int,
                           rows: list) -> None:
    """_rows_pass for K-quants: per super-block, each row sums its groups' scaled integer dot products
    (and min or offset terms) exactly in int32, then adds them to its float accumulator (the module
    docstring)."""
    layout, lanes = LAYOUTS[fmt], dot.lanes
    weight, high, scales, sub = (stored.get(name) for name in ("weight", "high_bits", "scales", "sub_scales"))
    size, per_block = layout.group, layout.block // layout.group
    # 16 products of 4-bit codes with |x| <= 127; not 16 of 5-bit codes, nor 8 of 6-bit ones
    pairs_fit_int16 = layout.bits == 4
    int_lanes, ramp = f"int32x{lanes}", tirx.Ramp(0, 1, lanes)
    with T.serial(0, tile // lanes) as c:
        lane0 = c * lanes
        acc = _zeros(len(rows), lanes, "float32")
        with T.serial(0, xs.shape[1]) as block:
            # per row: sum_g sc_g * isum_g, then (with mins) -sum_g m_g * sum_g(x codes)
            sums = _zeros(len(rows) * (2 if layout.has_min else 1), lanes, "int32")
            with T.serial(0, per_block) as part:
                g = block * per_block + part
                _prefetch(j, g, [(weight, size // INPUTS_PER_WORD[layout.bits]), (sub, 1)]
                          + ([(high, 1)] if high is not None else []))
                codes = _unpack(dot, layout.bits, size, weight, j, g, lane0, high)
                sc = T.Bind(sub.vload([j, g, 0, lane0], f"{sub.dtype}x{lanes}").astype(int_lanes))
                m = T.Bind(sub.vload([j, g, 1, lane0], f"{sub.dtype}x{lanes}").astype(int_lanes)) \
                    if layout.has_min else None
                for i, row in enumerate(rows):
                    isum = dot.scaled_dot(*codes.operands(dot, xq, row, g * size), sc, pairs_fit_int16, codes.start,
                                          _chains(rows))
                    if layout.offset:  # sc * (isum - offset * sum(x codes)), exact in int32
                        x_sum = tirx.Broadcast(xs[row, block, 1 + part].astype("int32") * -layout.offset, lanes)
                        isum = isum + sc * x_sum
                    T.buffer_store(sums, sums.vload([i, 0], int_lanes) + isum, [i, ramp])
                    if m is not None:
                        x_sum = tirx.Broadcast(xs[row, block, 1 + part].astype("int32"), lanes)
                        at = len(rows) + i
                        T.buffer_store(sums, sums.vload([at, 0], int_lanes) - m * x_sum, [at, ramp])
            d_w = T.Bind(_lanes_f32(scales, j, block, 0, lane0, lanes))
            dmin_w = T.Bind(_lanes_f32(scales, j, block, 1, lane0, lanes)) if layout.has_min else None
            for i, row in enumerate(rows):
                d_x = tirx.Broadcast(xs[row, block, 0], lanes)
                total = fma(d_w * d_x, sums.vload([i, 0], int_lanes).astype(f"float32x{lanes}"),
                            acc.vload([i, 0], f"float32x{lanes}"))
                if dmin_w is not None:
                    total = fma(dmin_w * d_x, sums.vload([len(rows) + i, 0], int_lanes).astype(f"float32x{lanes}"),
                                total)
                T.buffer_store(acc, total, [i, ramp])
        for i, row in enumerate(rows):
            _store(y, acc, i, row, j * tile + lane0, lanes, int(y.shape[1]), tile)


# How far ahead of its loads a tile prefetches its codes (and, as many groups ahead, its scales): the
# loads of a memory-bound matmul otherwise stall the integer products behind them (measured on the 1.5B
# Q4_0 model: decode 69.0 -> 62.9 ms at 16 KB, no gain at 4 KB; on SmolLM2, in cache, 8.80 -> 8.39 ms).
# Into L2 (locality 1): the rows of a block read a line within a few hundred cycles of each other.
# Every cache line of a group is prefetched: a group's codes span several lines (4 for Q4_0's 16
# outputs), and prefetching only the first left the rest to the hardware prefetcher (measured side by
# side on SmolLM2 Q4_1: decode 8.17 -> 7.12 ms, verify(1)/decode 1.16 -> 1.12, verify(4) 1.45 -> 1.37).
PREFETCH_BYTES = 16384
CACHE_LINE = 64


def _prefetch(j, g, streams: list) -> None:
    """Prefetch what tile j reads PREFETCH_BYTES of codes after group g, every line of it, from each
    (buffer, entries per group) stream, codes first; past the tile's end the address runs on into the
    next tile's, which the thread reads next."""
    codes, per_group = streams[0]
    ahead = max(1, PREFETCH_BYTES // (per_group * _entry_bytes(codes)))
    for buffer, per_group in streams:
        entry = _entry_bytes(buffer)
        for offset in range(0, per_group * entry, CACHE_LINE):
            index = (j, (g + ahead) * per_group + offset // entry) + _inner_index(buffer, offset % entry)
            T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch", T.address_of(buffer[index]), 0, 1, 1))


def _inner_index(buffer, byte: int) -> tuple[int, ...]:
    """The index past a packed buffer's first two axes of the element at this byte of an entry."""
    element = byte // _element_bytes(buffer)
    index = []
    for extent in reversed([int(e) for e in buffer.shape[2:]]):
        element, rest = divmod(element, extent)
        index.append(rest)
    return tuple(reversed(index))


def _element_bytes(buffer) -> int:
    return tvm.DataType(buffer.dtype).bits // 8


def _entry_bytes(buffer) -> int:
    """Bytes of one index of a packed buffer's second axis (its lanes, and bytes per lane)."""
    size = _element_bytes(buffer)
    for extent in buffer.shape[2:]:
        size *= int(extent)
    return size


def _zeros(rows: int, lanes: int, dtype: str):
    """Per-row vector accumulators in registers, zeroed. In "global" scope: TVM gives a small constant
    allocation of that scope a stack slot, which LLVM keeps in registers; a "local" one became a
    workspace allocation and a store per task (LowerTVMBuiltin), a third of a 5-row block's time."""
    buffer = T.alloc_buffer((rows, lanes), dtype, scope="global")
    for i in range(rows):
        T.buffer_store(buffer, tirx.Broadcast(tirx.const(0, dtype), lanes), [i, tirx.Ramp(0, 1, lanes)])
    return buffer


@dataclasses.dataclass
class _GroupCodes:
    """A group's weight codes of one vector of outputs as dot-product operands, unpacked once for all
    rows: unsigned (4- and 5-bit codes, or |w| of int8 ones whose signs the activations take) or signed
    (int8 codes, against activations + 128, from `start` = -128 * sum(w))."""
    size: int
    unsigned: list | None
    signed: list | None = None
    start: object = None

    def operands(self, dot: IntegerDot, xq, row, k0) -> tuple[list, list]:
        """(unsigned, signed) for this row's activation codes k0..k0 + size."""
        x_words = [_x_word(dot, xq, row, k0 + INPUTS_PER_LANE * m) for m in range(self.size // INPUTS_PER_LANE)]
        if self.unsigned is None:
            return x_words, self.signed
        if self.signed is None:
            return self.unsigned, x_words
        return self.unsigned, [dot.sign_by(x, w) for x, w in zip(x_words, self.signed)]


def _unpack(dot: IntegerDot, bits: int, size: int, weight, j, g, lane0, high=None) -> _GroupCodes:
    """Group g's codes (of `size` inputs) of one vector of outputs (_GroupCodes). high: 5- and 6-bit
    codes' words of high bits (a group is one word)."""
    words = size // INPUTS_PER_WORD[bits]
    if bits < 8:
        uint = f"uint32x{dot.lanes}"
        splat = lambda value: tirx.Broadcast(tirx.const(value, "uint32"), dot.lanes)  # noqa: E731
        high_word = T.Bind(high.vload([j, g, lane0], uint)) if bits in HIGH_BITS else None
        width = bits - 4  # high bits per input
        high_mask = ((1 << width) - 1) * 0x10101010  # bits 4.. of every byte
        unsigned = []
        for word in range(words):
            lanes = T.Bind(weight.vload([j, g * words + word, lane0], uint))
            for half, codes in enumerate((lanes, tirx.shift_right(lanes, splat(4)))):  # inputs 0-3, then 4-7
                codes = tirx.bitwise_and(codes, splat(0x0F0F0F0F))
                if high_word is not None:  # quantization.high_bit_offset: inputs 4 v .. 4 v + 3, v = 2 word + half
                    at = width * (2 * word + half)
                    shifted = (tirx.shift_left(high_word, splat(4 - at)) if at <= 4
                               else tirx.shift_right(high_word, splat(at - 4)))
                    codes = tirx.bitwise_or(codes, tirx.bitwise_and(shifted, splat(high_mask)))
                unsigned.append(T.Bind(tirx.reinterpret(dot.byte_type, codes)))
        return _GroupCodes(size, unsigned)
    signed = [T.Bind(weight.vload([j, g * words + m, lane0, 0], dot.byte_type)) for m in range(words)]
    if not dot.biases_int8_activations:
        return _GroupCodes(size, [T.Bind(tirx.abs(w)) for w in signed], signed)
    ones = [tirx.Broadcast(tirx.const(1, "int8"), 4 * dot.lanes)] * words
    start = T.Bind(dot.dot(ones, signed, pairs_fit_int16=False) * tirx.Broadcast(tirx.const(-128, "int32"), dot.lanes))
    return _GroupCodes(size, None, signed, start)


def _x_word(dot: IntegerDot, xq, row, k):
    """Activation codes k..k+3 of a row, repeated in every 32-bit lane."""
    word = tirx.reinterpret("int32", xq.vload([row, k], "int8x4"))
    return tirx.reinterpret(dot.byte_type, tirx.Broadcast(word, dot.lanes))


def _lanes_f32(scales, j, g, which: int, lane0, lanes: int):
    return scales.vload([j, g, which, lane0], f"float16x{lanes}").astype(f"float32x{lanes}")


def _accumulate(fmt: str, acc, isum, w_scale, w_min, xs, row, g, lanes: int):
    """acc + this group's term (the module docstring), with explicit fused multiply-adds so that
    LLVM's contraction choices cannot differ between kernels of different row blocks."""
    per_row = lambda c: tirx.Broadcast(xs[row, g, c], lanes)  # noqa: E731
    products = isum.astype(f"float32x{lanes}")
    if fmt == "q4_0":  # isum and -8 * sum(x codes) are integers below 2^24: their float sum is exact
        products = products + per_row(1)
    acc = fma(w_scale * per_row(0), products, acc)
    return fma(w_min, per_row(1), acc) if fmt == "q4_1" else acc


def _store(y, acc, i: int, row, col0, lanes: int, out_features: int, tile: int):
    values = acc.vload([i, 0], f"float32x{lanes}").astype(f"{y.dtype}x{lanes}")
    if out_features % tile == 0:
        T.buffer_store(y, values, [row, tirx.Ramp(col0, 1, lanes)])
        return
    with T.If(col0 + lanes <= out_features):
        with T.Then():
            T.buffer_store(y, values, [row, tirx.Ramp(col0, 1, lanes)])
        with T.Else():  # the last tile's padding lanes
            for lane in range(lanes):
                with T.If(col0 + lane < out_features), T.Then():
                    T.buffer_store(y, acc[i, lane].astype(y.dtype), [row, col0 + lane])
