"""Group-quantized weights: llama.cpp's blocks, kept from a GGUF file or made, and packed for the CPU.

Q4_0, Q4_1 and Q8_0 are codes with a float16 scale (and, for 4-bit, a float16 min) per group of 32
input features, w = code * scale + min. Q4_0's w = d * (code - 8) is the same with min = -8d, exactly:
d * code and 8d are exact in float32 (an 11-bit mantissa times a small integer), so is their sum.

The K-quants group inputs twice: a super-block of 256 has float16 scales d (and dmin), and each of its
groups (32 inputs for Q4_K and Q5_K, 16 for Q6_K) an integer scale sc (and min m), so that
    Q4_K, Q5_K: w = (d * sc) * code - dmin * m,  code 0..15 or 0..31      Q6_K: w = (d * sc) * (code - 32),  code 0..63
d * sc and dmin * m are exact in float32, so a group's float scale and min are as well.
GGUF blocks are decoded bit for bit and the quantizers follow ggml's reference ones, so a block
kept from a file and one made here from its float values are the same bytes. K-quants are only kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gguf
import numpy as np

from .config import CompileError

GROUP = 32  # inputs per scale of Q4_0, Q4_1 and Q8_0
SUPER_BLOCK = 256  # inputs per float16 scale of a K-quant


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a format stores a weight: codes of `bits` (4: nibbles 0..15; 5 and 6: those and one or two
    high bits, 0..31 or 0..63; 8: int8), a float scale (and min) per `group` inputs, held as float16 per
    `block` inputs times, when block > group (K-quants), an integer per group (int8 scales; uint8 scales
    and mins). An offset format's min is not stored: w = scale * (code - offset) (Q4_0's min stored
    made a decode read 11% more bytes; Q6_K's codes held as int8 made the 1.5B-shaped Q4_0 model's
    Q6_K head, a quarter of its bytes, read 6% more than the file's)."""
    bits: int
    group: int
    block: int
    has_min: bool
    offset: int = 0

    @property
    def super_blocks(self) -> bool:
        return self.block > self.group


LAYOUTS = {
    "q4_0": Layout(4, GROUP, GROUP, False, offset=8),
    "q4_1": Layout(4, GROUP, GROUP, True),
    "q8_0": Layout(8, GROUP, GROUP, False),
    "q4_k": Layout(4, 32, SUPER_BLOCK, True),
    "q5_k": Layout(5, 32, SUPER_BLOCK, True),
    "q6_k": Layout(6, 16, SUPER_BLOCK, False, offset=32),
}
FORMATS = ("q4_0", "q4_1", "q8_0")  # the formats --quantization makes
KEPT = tuple(LAYOUTS)  # the GGUF types kept as blocks
BITS = {fmt: layout.bits for fmt, layout in LAYOUTS.items()}


@dataclasses.dataclass
class Quantized:
    """A weight [out, in] (Hugging Face orientation) as codes, float16 scales/mins per block and, for
    K-quants, integer scales/mins per group."""
    format: str
    codes: np.ndarray  # [out, in]: uint8 0..2^bits - 1 (4, 5 and 6 bits), or int8
    scale: np.ndarray  # [out, in / block] float16
    min: np.ndarray | None  # [out, in / block] float16: the mins, or a K-quant's dmin (None: Layout.offset)
    sub: np.ndarray | None = None  # K-quants: [out, in / group, 1 or 2] int8 scales, or uint8 scales and mins

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.format]

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> "Quantized":
        """The same row operation (a permutation, a slice) on codes, scales and mins alike."""
        maybe = lambda a: None if a is None else fn(a)  # noqa: E731
        return Quantized(self.format, fn(self.codes), fn(self.scale), maybe(self.min), maybe(self.sub))

    def group_scales(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The float32 scale and min of every group [out, in / group] (see the module docstring)."""
        per_block = self.layout.block // self.layout.group
        scale = np.repeat(self.scale.astype(np.float32), per_block, axis=1)
        low = None if self.min is None else np.repeat(self.min.astype(np.float32), per_block, axis=1)
        if self.sub is not None:
            scale = scale * self.sub[..., 0].astype(np.float32)
            low = None if low is None else -(low * self.sub[..., 1].astype(np.float32))
        if self.layout.offset:
            low = scale * np.float32(-self.layout.offset)
        return scale, low

    def dequantize(self) -> np.ndarray:
        """The float weights, exactly: an offset format's as scale * (code - offset), whose factors are
        exact in float32 (scale * code is not for Q6_K's 6-bit codes and 19-bit scales)."""
        scale, low = (np.repeat(a, self.layout.group, axis=1) if a is not None else None for a in self.group_scales())
        if self.layout.offset:
            return scale * (self.codes.astype(np.float32) - np.float32(self.layout.offset))
        w = scale * self.codes.astype(np.float32)
        return w + low if low is not None else w


def concat_rows(parts: list[Quantized]) -> Quantized:
    """Fused projections (q/k/v, gate/up) in one format as one weight."""
    cat = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return Quantized(parts[0].format, cat("codes"), cat("scale"), cat("min"), cat("sub"))


def format_runs(formats: list[str]) -> list[tuple[str, list[int]]]:
    """The runs of consecutive parts of a fused weight in the same format: (format, the parts' indices)."""
    runs: list[tuple[str, list[int]]] = []
    for index, fmt in enumerate(formats):
        if runs and runs[-1][0] == fmt:
            runs[-1][1].append(index)
        else:
            runs.append((fmt, [index]))
    return runs


def check_groups(in_features: int, fmt: str, what: str) -> None:
    if in_features % GROUP:
        raise CompileError(f"{what}: {in_features} input features are not a multiple of {GROUP}, which {fmt} "
                           "needs; compile with --quantization none")


# -- quantizing float weights (ggml's reference quantizers) ----------------------------------------
def quantize(weights: np.ndarray, fmt: str) -> Quantized:
    out, k = weights.shape
    groups = np.asarray(weights, np.float32).reshape(out, k // GROUP, GROUP)
    return {"q4_0": _quantize_q4_0, "q4_1": _quantize_q4_1, "q8_0": _quantize_q8_0}[fmt](groups, out, k)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _quantize_q4_0(groups, out, k):
    # ggml: the signed value of largest magnitude maps to code 0 (d = max / -8)
    at = np.abs(groups).argmax(axis=2)[..., None]
    d = (np.take_along_axis(groups, at, axis=2)[..., 0] / np.float32(-8)).astype(np.float32)
    codes = np.minimum(15, (groups * _inverse(d)[..., None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    return Quantized("q4_0", codes.reshape(out, k), d.astype(np.float16), None)


def _quantize_q4_1(groups, out, k):
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    d = ((hi - lo) / np.float32(15)).astype(np.float32)
    codes = np.minimum(15, ((groups - lo[..., None]) * _inverse(d)[..., None] + np.float32(0.5)).astype(np.int8))
    return Quantized("q4_1", codes.astype(np.uint8).reshape(out, k), d.astype(np.float16), lo.astype(np.float16))


def _quantize_q8_0(groups, out, k):
    d = (np.abs(groups).max(axis=2) / np.float32(127)).astype(np.float32)
    scaled = (groups * _inverse(d)[..., None]).astype(np.float64)  # roundf: halves away from zero, exactly
    codes = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)
    return Quantized("q8_0", codes.reshape(out, k), d.astype(np.float16), None)


# -- GGUF blocks ------------------------------------------------------------------------------------
def from_gguf_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Quantized:
    """Decode llama.cpp blocks (a uint8 array: 32 weights per 18, 20 or 34 bytes, 256 per 144 or 210)."""
    fmt = type_name.lower()
    out, k = shape
    if LAYOUTS[fmt].super_blocks:
        return _from_k_blocks(np.ascontiguousarray(raw).reshape(out * k // SUPER_BLOCK, -1), fmt, out, k)
    blocks = np.ascontiguousarray(raw).reshape(out * k // GROUP, -1)
    d = blocks[:, :2].copy().view(np.float16).reshape(out, k // GROUP)
    if fmt == "q8_0":
        return Quantized(fmt, blocks[:, 2:].copy().view(np.int8).reshape(out, k), d, None)
    packed = blocks[:, 4:] if fmt == "q4_1" else blocks[:, 2:]
    # the low nibbles of a block's 16 bytes are weights 0..15, the high ones 16..31
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=1).reshape(out, k)
    mins = blocks[:, 2:4].copy().view(np.float16).reshape(out, k // GROUP) if fmt == "q4_1" else None
    return Quantized(fmt, codes, d, mins)


def _from_k_blocks(blocks: np.ndarray, fmt: str, out: int, k: int) -> Quantized:
    """ggml's block_q4_K (d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles: each 64
    weights' first 32 in the low nibbles of 32 bytes, the next 32 in the high ones), block_q5_K (the
    same with 32 bytes of high bits before the nibbles: bit i of byte l is weight 32 i + l's) and
    block_q6_K (128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d)."""
    n = len(blocks)
    half = lambda a: a.copy().view(np.float16).reshape(out, k // SUPER_BLOCK)  # noqa: E731
    if fmt in ("q4_k", "q5_k"):
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        nibbles = blocks[:, -128:]
        codes = (nibbles.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        if fmt == "q5_k":
            high = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 0x01
            codes = codes.reshape(n, 8, 32) | (high << 4)
        sub = np.stack([sc, m], axis=-1).astype(np.uint8).reshape(out, k // 32, 2)
        return Quantized(fmt, codes.reshape(out, k), half(blocks[:, :2]), half(blocks[:, 2:4]), sub)
    low = (blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    codes = low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)
    sub = blocks[:, 192:208].copy().view(np.int8).reshape(out, k // 16, 1)
    return Quantized(fmt, codes.reshape(out, k), half(blocks[:, 208:210]), None, sub)


# -- the CPU layout (model.Linear) ------------------------------------------------------------------
# Inputs per 32-bit lane of the packed codes: eight 4-bit codes or four int8 codes of one output. 5- and
# 6-bit codes are stored as their low nibbles in the 4-bit layout and words of their high bits.
INPUTS_PER_WORD = {4: 8, 5: 8, 6: 8, 8: 4}
HIGH_BITS = {5: 32, 6: 16}  # inputs per word of high bits: a group of Q5_K, a group of Q6_K
# Output features per tile of packed codes, whatever the float weights' tile: a word of a tile's 4-bit
# codes is one 64-byte cache line, so each tile streams from memory in order (measured on AVX2 against
# tiles of 64: 25% less time for a 1-row matmul over 18 MB of codes).
CODE_TILE = 16


def packed_shapes(fmt: str, in_features: int, tiles: int, tile: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parameter shapes and dtypes of a quantized Linear with this tile: for each word of inputs (see
    code_offset), the tile's T output features are contiguous 32-bit lanes, each holding that word's
    codes of one output, so a lane is an operand of an integer dot product (vpdpbusd, pmaddubsw); per
    block of inputs, the tile's float16 scales then (stored ones only) mins; for K-quants, per group,
    its integer ones."""
    layout = LAYOUTS[fmt]
    words = in_features // INPUTS_PER_WORD[layout.bits]
    codes = ((tiles, words, tile), "uint32") if layout.bits < 8 else ((tiles, words, tile, 4), "int8")
    pairs = 2 if layout.has_min else 1
    shapes = {"weight": codes}
    if layout.bits in HIGH_BITS:
        shapes["high_bits"] = ((tiles, in_features // HIGH_BITS[layout.bits], tile), "uint32")
    shapes["scales"] = ((tiles, in_features // layout.block, pairs, tile), "float16")
    if layout.super_blocks:
        shapes["sub_scales"] = ((tiles, in_features // layout.group, pairs, tile), "uint8" if layout.has_min else "int8")
    return shapes


def code_offset(bits: int, k: int):
    """Where input k's code sits in its lane, in bits: byte k % 4, and for 4-bit codes the low nibble
    for inputs 0-3 of the word, the high one for 4-7, so that masking a lane with 0x0F0F0F0F (and
    shifting it right by 4 first) yields four consecutive inputs' codes as bytes."""
    return 8 * (k % 4) + (4 * (k % 8 // 4) if bits < 8 else 0)


def high_bit_offset(bits: int, k: int):
    """Where input k's high bits (bits - 4 of them) sit in their word: byte k % 4 as in code_offset,
    bits from (bits - 4) * v, v = k % HIGH_BITS[bits] // 4, so that shifting the word left by
    4 - (bits - 4) v (or right) and masking each byte's bits 4.. yields the high bits of inputs
    4 v .. 4 v + 3 in place over their nibbles."""
    return 8 * (k % 4) + (bits - 4) * (k % HIGH_BITS[bits] // 4)


def pack(q: Quantized, tile: int = CODE_TILE) -> dict[str, np.ndarray]:
    """[out, in] codes and groups -> packed_shapes' arrays, output features padded to whole tiles with
    zero codes, scales and mins (padding columns compute to 0 and are sliced off)."""
    out, k = q.shape
    groups = [q.scale] if q.min is None else [q.scale, q.min]
    packed = {"scales": np.ascontiguousarray(np.stack([tile_rows(g, tile) for g in groups], axis=2))}
    if q.sub is not None:
        packed["sub_scales"] = np.ascontiguousarray(np.stack([tile_rows(s, tile) for s in np.moveaxis(q.sub, 2, 0)], axis=2))
    if q.bits < 8:
        shifts = code_offset(4, np.arange(8)).astype(np.uint32)
        nibbles = q.codes.astype(np.uint32) & 0x0F
        words = np.bitwise_or.reduce(nibbles.reshape(out, k // 8, 8) << shifts, axis=2)
        if q.bits == 4:
            return {"weight": tile_rows(words, tile), **packed}
        per_word = HIGH_BITS[q.bits]
        high = (q.codes.astype(np.uint32) >> 4).reshape(out, k // per_word, per_word)
        offsets = high_bit_offset(q.bits, np.arange(per_word)).astype(np.uint32)
        high_words = np.bitwise_or.reduce(high << offsets, axis=2)
        return {"weight": tile_rows(words, tile), "high_bits": tile_rows(high_words, tile), **packed}
    tiled = tile_rows(q.codes, tile).reshape(-1, k // 4, 4, tile).transpose(0, 1, 3, 2)
    return {"weight": np.ascontiguousarray(tiled), **packed}


def packed_tiles(out_features: int, tile: int) -> int:
    """Tiles of T output features in the packed CPU layout, the last one zero-padded."""
    return -(-out_features // tile)


def tile_rows(a: np.ndarray, tile: int) -> np.ndarray:
    """[out, n] -> [ceil(out / tile), n, tile], the rows (output features) zero-padded to whole tiles:
    the CPU layout of model.Linear, for float weights and for codes, scales and mins alike."""
    out = a.shape[0]
    tiles = packed_tiles(out, tile)
    padded = np.zeros((tiles * tile, a.shape[1]), a.dtype)
    padded[:out] = a
    return np.ascontiguousarray(padded.reshape(tiles, tile, -1).transpose(0, 2, 1))
