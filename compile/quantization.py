"""Group-quantized weights: llama.cpp's Q4_0, Q4_1 and Q8_0 blocks, kept or made, and packed for the CPU.

Every format is codes with a float16 scale (and, for 4-bit, a float16 min) per group of 32 input
features, w = code * scale + min. Q4_0's w = d * (code - 8) is the same with min = -8d, exactly:
d * code and 8d are exact in float32 (an 11-bit mantissa times a small integer), so is their sum.
GGUF blocks are decoded bit for bit and the quantizers follow ggml's reference ones, so a block
kept from a file and one made here from its float values are the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .config import CompileError

GROUP = 32
FORMATS = ("q4_0", "q4_1", "q8_0")
# The compute kind of each format: 4-bit codes with scale and min, or int8 codes with a scale.
BITS = {"q4_0": 4, "q4_1": 4, "q8_0": 8}


@dataclasses.dataclass
class Quantized:
    """A weight [out, in] (Hugging Face orientation) as codes and float16 scales/mins per group."""
    format: str
    codes: np.ndarray  # [out, in]: uint8 0..15 (4-bit) or int8
    scale: np.ndarray  # [out, in / 32] float16
    min: np.ndarray | None  # [out, in / 32] float16, 4-bit only

    @property
    def bits(self) -> int:
        return BITS[self.format]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> "Quantized":
        """The same row operation (a permutation, a slice) on codes, scales and mins alike."""
        return Quantized(self.format, fn(self.codes), fn(self.scale), None if self.min is None else fn(self.min))

    def dequantize(self) -> np.ndarray:
        w = _expand(self.scale.astype(np.float32)) * self.codes.astype(np.float32)
        return w + _expand(self.min.astype(np.float32)) if self.min is not None else w


def _expand(per_group: np.ndarray) -> np.ndarray:
    return np.repeat(per_group, GROUP, axis=1)


def concat_rows(parts: list[Quantized]) -> Quantized | None:
    """Fused projections (q/k/v, gate/up) as one weight; None when the parts' formats differ."""
    if len({p.format for p in parts}) != 1:
        return None
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return Quantized(parts[0].format, cat("codes"), cat("scale"), None if parts[0].min is None else cat("min"))


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
    scale = d.astype(np.float16)
    return Quantized("q4_0", codes.reshape(out, k), scale, (scale.astype(np.float32) * -8).astype(np.float16))


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
    """Decode llama.cpp blocks (a uint8 array, a block of 32 weights per 18, 20 or 34 bytes)."""
    fmt = type_name.lower()
    out, k = shape
    blocks = np.ascontiguousarray(raw).reshape(out * k // GROUP, -1)
    d = blocks[:, :2].copy().view(np.float16).reshape(out, k // GROUP)
    if fmt == "q8_0":
        return Quantized(fmt, blocks[:, 2:].copy().view(np.int8).reshape(out, k), d, None)
    packed = blocks[:, 4:] if fmt == "q4_1" else blocks[:, 2:]
    # the low nibbles of a block's 16 bytes are weights 0..15, the high ones 16..31
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=1).reshape(out, k)
    if fmt == "q4_1":
        return Quantized(fmt, codes, d, blocks[:, 2:4].copy().view(np.float16).reshape(out, k // GROUP))
    return Quantized(fmt, codes, d, (d.astype(np.float32) * -8).astype(np.float16))


# -- the CPU layout (model.Linear) ------------------------------------------------------------------
# Inputs per 32-bit lane of the packed codes: eight 4-bit codes or four int8 codes of one output.
INPUTS_PER_WORD = {4: 8, 8: 4}
# Output features per tile of packed codes, whatever the float weights' tile: a word of a tile's 4-bit
# codes is one 64-byte cache line, so each tile streams from memory in order (measured on AVX2 against
# tiles of 64: 25% less time for a 1-row matmul over 18 MB of codes).
CODE_TILE = 16


def packed_shapes(bits: int, in_features: int, tiles: int, tile: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parameter shapes and dtypes of a quantized Linear with this tile: for each word of inputs (see
    code_offset), the tile's T output features are contiguous 32-bit lanes, each holding that word's
    codes of one output, so a lane is an operand of an integer dot product (vpdpbusd, pmaddubsw); per
    group of 32 inputs, the tile's scales then (4-bit) its mins."""
    words = in_features // INPUTS_PER_WORD[bits]
    codes = ((tiles, words, tile), "uint32") if bits == 4 else ((tiles, words, tile, 4), "int8")
    return {"weight": codes, "scales": ((tiles, in_features // GROUP, 2 if bits == 4 else 1, tile), "float16")}


def code_offset(bits: int, k: int):
    """Where input k's code sits in its lane, in bits: byte k % 4, and for 4-bit codes the low nibble
    for inputs 0-3 of the word, the high one for 4-7, so that masking a lane with 0x0F0F0F0F (and
    shifting it right by 4 first) yields four consecutive inputs' codes as bytes."""
    return 8 * (k % 4) + (4 * (k % 8 // 4) if bits == 4 else 0)


def pack(q: Quantized, tile: int = CODE_TILE) -> dict[str, np.ndarray]:
    """[out, in] codes and groups -> packed_shapes' arrays, output features padded to whole tiles with
    zero codes, scales and mins (padding columns compute to 0 and are sliced off)."""
    out, k = q.shape
    groups = [q.scale] if q.min is None else [q.scale, q.min]
    scales = np.ascontiguousarray(np.stack([tile_rows(g, tile) for g in groups], axis=2))
    if q.bits == 4:
        shifts = code_offset(4, np.arange(8)).astype(np.uint32)
        words = np.bitwise_or.reduce(q.codes.astype(np.uint32).reshape(out, k // 8, 8) << shifts, axis=2)
        return {"weight": tile_rows(words, tile), "scales": scales}
    tiled = tile_rows(q.codes, tile).reshape(-1, k // 4, 4, tile).transpose(0, 1, 3, 2)
    return {"weight": np.ascontiguousarray(tiled), "scales": scales}


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
