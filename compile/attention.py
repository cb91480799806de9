"""CPU attention for the paged KV cache: flash-style, parallel and vectorised, one pass over all keys.

TVM 0.27's CPU attention kernels are scalar loop nests on one thread, and it computes a multi-token
forward's attention in two parts (the new tokens among themselves, then against the cached pages)
merged in float: a rounding apart from a decode's, which attends to all its keys in one pass. With
int8-quantized activations such a rounding moves an input across a rounding boundary now and then,
the logits move by tenths, and a speculative verify picks a token the target alone would not have.
So both kinds of forward run one kernel here over the same page-aligned blocks of keys, and a token's
attention is bit for bit the same whether it is decoded or verified: paged_decode_cpu takes TVM's decode
slot (workarounds.CPUPagedKVCache installs it); chunk_attention_cpu is run by cpu_attention.c, linked
into the library, in place of TVM's two prefill parts, which cannot see each other's keys.

Each parallel task takes one KV head, the query heads that share it and a tile of QUERIES queries
(`rows` in all; a decode's tile is its one query), and walks the keys a block of KEYS at a time (a
page of the cache) with an online softmax: scores for the block, a running max and sum per row, the
output rescaled and accumulated. Scores are kept transposed, [key, row], so the softmax's max and sum
over keys run down columns, vectorised over rows (each row's arithmetic is the same whatever the tile);
they are in log2 units (queries scaled by sm_scale * log2(e)), as in TVM's kernels.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import tvm_ffi.libinfo
from tvm.script import tirx as T

from ..interface.artifact import CPU_PAGE_SIZE
from .config import CompileError
from .vector_math import LOG2E, exp2

KEYS = CPU_PAGE_SIZE  # keys per block: one page of the cache
EMPTY_LSE = -5e4  # the log2-sum-exp of a row with no keys, as TVM's kernels report it: its merge weighs it zero
# The library's chunk kernels: the first for prefill chunks, the second, in small tiles of queries, when
# no sequence has more than FEW_QUERIES new tokens (verifies, token trees).
CHUNK_ATTENTION_KERNELS = ("mlc_spec_chunk_attention", "mlc_spec_chunk_attention_few")
FEW_QUERIES = 8
# cpu_attention.c's functions for TVM's two parts of a multi-token forward's attention: the new tokens'
# own (of a chain, of a token tree), then the cached pages'
ATTENTION_NEW_TOKENS = "mlc_spec_attention_new_tokens"
ATTENTION_NEW_TREE = "mlc_spec_attention_new_tree"
ATTENTION_CACHED_PAGES = "mlc_spec_attention_cached_pages"
GLUE_SOURCE = Path(__file__).with_name("cpu_attention.c")
QUERIES = 8  # queries per prefill task
KEY_PASS = 4  # score rows computed together: each query vector loaded serves four keys
LANES = 8  # float32 lanes of an AVX2 register
NONE = T.min_value("float32")  # the score of a key a row does not see


def paged_decode_cpu(h_kv: int, h_q: int, d: int, dtype: str):
    """tir_attention_decode_cpu: each sequence's one new token against all its cached pages (its own
    key and value among them: TVM appends a decode's before its attention)."""
    attend_sequence = _sequence_attention(h_kv, h_q, d, 1)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        var_q: T.handle,  # [batch_size, h_q, d]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch_size]: tokens in each sequence's last page
        var_k_rope_pos_offset: T.handle,  # [batch_size]
        var_q_rope_position: T.handle,  # [batch_size]
        var_output: T.handle,  # [batch_size, h_q, d]
        var_lse: T.handle,  # [batch_size, h_q]
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, KEYS, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")
        T.Assert(rotary_mode == 0, "RoPE inside attention is not supported: the model applies it before the cache")

        for b in range(batch_size):
            cached: T.let[T.int32] = _cached_length(page_indptr, length_info, b)
            # no new keys to read (q and page_values stand in for them): TVM has put the token's in its pages
            attend_sequence(pages, page_values, page_indptr[b], cached, q, q, page_values, 0, cached, q, b, 1, 0,
                            sm_scale * LOG2E, output, lse)

    return batch_decode_paged_kv_cpu


def chunk_attention_cpu(h_kv: int, h_q: int, d: int, dtype: str, queries: int = QUERIES):
    """Each sequence's new queries against all its keys in one pass: first those cached in its pages,
    then its new ones (rows kv_rows[kv_indptr[b]..] of k and v), causal with the last query seeing every key.
    TVM splits a multi-token forward's attention into these two parts and merges them in float, a
    rounding apart from a decode's single pass; cpu_attention.c runs this kernel in their place, so
    that each new token's attention is bit for bit a decode's (both walk the same page-aligned blocks
    of keys). A token tree's node is a sequence of one query whose new keys are its ancestors'.
    Tiles of `queries` queries; few_queries(h_kv, h_q) fills one vector of rows, for verifies."""
    attend_sequence = _sequence_attention(h_kv, h_q, d, queries)

    @T.prim_func(s_tir=True)
    def chunk_attention_cpu(
        var_q: T.handle,  # [total_q, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch_size]: cached tokens in each sequence's last page
        var_k: T.handle,  # [total_kv, h_kv, d]: the new keys
        var_v: T.handle,  # [total_kv, h_kv, d]
        var_kv_rows: T.handle,  # [n_kv]: the row of k and v of each sequence's new keys in turn
        var_kv_indptr: T.handle,  # [batch_size + 1], into kv_rows
        var_output: T.handle,  # [total_q, h_q, d]
        var_lse: T.handle,  # [total_q, h_q]
        sm_scale: T.float32,
    ):
        batch_size, total_q, total_kv, n_kv, nnz_pages, max_num_pages = (T.int32(), T.int32(), T.int32(), T.int32(),
                                                                          T.int32(), T.int32())
        q = T.match_buffer(var_q, (total_q, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, KEYS, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=T.int32())
        k = T.match_buffer(var_k, (total_kv, h_kv, d), dtype)
        v = T.match_buffer(var_v, (total_kv, h_kv, d), dtype)
        kv_rows = T.match_buffer(var_kv_rows, (n_kv,), "int32", elem_offset=T.int32())
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (total_q, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_q, h_q), "float32")

        for b in range(batch_size):
            cached: T.let[T.int32] = _cached_length(page_indptr, length_info, b)
            attend_sequence(pages, page_values, page_indptr[b], cached, k, v, kv_rows, kv_indptr[b],
                            cached + kv_indptr[b + 1] - kv_indptr[b], q, q_indptr[b], q_indptr[b + 1] - q_indptr[b], 1,
                            sm_scale * LOG2E, output, lse)

    return chunk_attention_cpu


def glue_object(directory: Path) -> Path:
    """cpu_attention.c compiled, with this module's constants, for linking into a CPU library."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CompileError("--device cpu needs a C compiler (cc) to link its library; install gcc or clang")
    defines = {"FEW_QUERIES": FEW_QUERIES, "PAGE_SIZE": KEYS, "EMPTY_LSE": EMPTY_LSE,
               "CHUNK_KERNEL": f"__tvm_ffi_{CHUNK_ATTENTION_KERNELS[0]}",
               "CHUNK_KERNEL_FEW": f"__tvm_ffi_{CHUNK_ATTENTION_KERNELS[1]}"}
    out = directory / "cpu_attention.o"
    command = [compiler, "-std=c11", "-O2", "-fPIC", "-c", str(GLUE_SOURCE), "-o", str(out),
               f"-I{tvm_ffi.libinfo.find_include_path()}", *(f"-D{k}={v}" for k, v in defines.items())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"{compiler} exited with {done.returncode}"])[-1]
        raise CompileError(f"{GLUE_SOURCE.name} did not compile: {last}")
    return out


def few_queries(h_kv: int, h_q: int) -> int:
    """The tile of queries whose rows fill one vector (a tile of 8 verifying 2 tokens computes 4x the rows)."""
    return max(1, LANES // (h_q // h_kv))


def _cached_length(page_indptr, length_info, b):
    n_pages = page_indptr[b + 1] - page_indptr[b]
    return T.Select(n_pages > 0, (n_pages - 1) * KEYS + length_info[b], 0)


@T.macro
def _load_block(K, V, block, kv_head, kv_len, pages, page_values, first_page, cached, k, v, kv_rows, first_new):
    """K and V [KEYS, d] = keys block * KEYS.. of the sequence: below `cached` from its pages, then
    its new ones (rows kv_rows[first_new..] of k and v), zero past kv_len."""
    for j in range(KEYS):
        if block * KEYS + j < cached:
            for c in T.vectorized(K.shape[1]):
                K[j, c] = T.Cast("float32", pages[page_values[first_page + block], 0, kv_head, j, c])
                V[j, c] = T.Cast("float32", pages[page_values[first_page + block], 1, kv_head, j, c])
        elif block * KEYS + j < kv_len:
            for c in T.vectorized(K.shape[1]):
                K[j, c] = T.Cast("float32", k[kv_rows[first_new + block * KEYS + j - cached], kv_head, c])
                V[j, c] = T.Cast("float32", v[kv_rows[first_new + block * KEYS + j - cached], kv_head, c])
        else:
            # a page's free slots are uninitialised, and zero times NaN is NaN
            for c in T.vectorized(K.shape[1]):
                K[j, c] = T.float32(0)
                V[j, c] = T.float32(0)


def _sequence_attention(h_kv: int, h_q: int, d: int, queries: int):
    """The macro the kernels run per sequence, in tiles of `queries` queries; only loading a block of
    keys and values differs.

    Per task: Qt [d, rows] the scaled queries transposed, K and V [KEYS, d] the block (zero past the
    keys), S [KEYS, rows] its scores then weights, seen [rows] how many keys each row sees, state
    [4, rows] the running max (0) and sum (1) and this block's max (2) and rescale factor (3), acc the
    score accumulators, out [rows, d] the unnormalised output. Row r is query q0 + r // group of
    query head kv_head * group + r % group; rows past queries * group (whole vectors) are padding.
    """
    group = h_q // h_kv
    rows = -(-queries * group // LANES) * LANES

    @T.macro
    def start(q, q_start, q0, n_q, kv_head, scale, causal, kv_len, Qt, seen, state, out):
        for c, r in T.grid(d, rows):
            Qt[c, r] = T.float32(0)
        for i in range(T.min(queries, n_q - q0)):
            for g, c in T.grid(group, d):
                Qt[c, i * group + g] = T.Cast("float32", q[q_start + q0 + i, kv_head * group + g, c]) * scale
        for r in range(rows):
            seen[r] = T.if_then_else(causal > 0, kv_len - n_q + q0 + r // group + 1, kv_len)
            state[0, r] = NONE
            state[1, r] = T.float32(0)
            for c in T.vectorized(d):
                out[r, c] = T.float32(0)

    @T.macro
    def attend(Qt, K, V, S, acc, seen, state, out, key0, real_rows):
        """Fold keys key0 .. key0 + KEYS into the running state. The scores are computed for whole
        vectors of rows, the outputs only for the tile's real rows (a decode has group of its rows)."""
        for j0 in range(KEYS // KEY_PASS):
            # LANES-wide pieces with constant offsets, which LLVM keeps in registers across c
            for j1, r0 in T.grid(KEY_PASS, rows // LANES):
                for r1 in T.vectorized(LANES):
                    acc[j1, r0 * LANES + r1] = T.float32(0)
            for c in range(d):
                for j1 in T.unroll(KEY_PASS):
                    for r0 in T.unroll(rows // LANES):
                        for r1 in T.vectorized(LANES):
                            acc[j1, r0 * LANES + r1] = (acc[j1, r0 * LANES + r1]
                                                        + K[j0 * KEY_PASS + j1, c] * Qt[c, r0 * LANES + r1])
            for j1 in T.unroll(KEY_PASS):
                for r in T.vectorized(rows):
                    S[j0 * KEY_PASS + j1, r] = T.Select(key0 + j0 * KEY_PASS + j1 < seen[r], acc[j1, r], NONE)
        for r in T.vectorized(rows):
            state[2, r] = T.max(state[0, r], S[0, r])
        for j in range(1, KEYS):
            for r in T.vectorized(rows):
                state[2, r] = T.max(state[2, r], S[j, r])
        for r in T.vectorized(rows):
            state[3, r] = exp2(state[0, r] - state[2, r])
            state[0, r] = state[2, r]
            state[1, r] = state[1, r] * state[3, r]
        for j in range(KEYS):
            for r in T.vectorized(rows):
                S[j, r] = T.Select(S[j, r] > NONE, exp2(S[j, r] - state[0, r]), T.float32(0))
                state[1, r] = state[1, r] + S[j, r]
        for r in range(real_rows):
            for c in T.vectorized(d):
                out[r, c] = out[r, c] * state[3, r]
            for j in range(KEYS):
                for c in T.vectorized(d):
                    out[r, c] = out[r, c] + S[j, r] * V[j, c]

    @T.macro
    def finish(output, lse, q_start, q0, n_q, kv_head, state, out):
        for i in range(T.min(queries, n_q - q0)):
            for g in range(group):
                for c in T.vectorized(d):
                    output[q_start + q0 + i, kv_head * group + g, c] = T.Cast(output.dtype, T.Select(
                        state[1, i * group + g] > T.float32(0), out[i * group + g, c] / state[1, i * group + g],
                        T.float32(0)))
                lse[q_start + q0 + i, kv_head * group + g] = T.Select(
                    state[1, i * group + g] > T.float32(0),
                    state[0, i * group + g] + T.log2(state[1, i * group + g]), T.float32(EMPTY_LSE))

    @T.macro
    def attend_sequence(pages, page_values, first_page, cached, k, v, kv_rows, first_new, kv_len, q, q_start, n_q,
                        causal, scale, output, lse):
        """One sequence's queries against its kv_len keys: `cached` in its pages, the rest in rows
        kv_rows[first_new..] of k and v."""
        for task in T.parallel(h_kv * T.ceildiv(n_q, queries)):
            kv_head: T.let[T.int32] = task % h_kv
            q0: T.let[T.int32] = _first_query(task // h_kv, n_q, queries)
            with T.sblock("tile"):
                Qt = T.sblock_alloc_buffer((d, rows), "float32")
                K = T.sblock_alloc_buffer((KEYS, d), "float32")
                V = T.sblock_alloc_buffer((KEYS, d), "float32")
                S = T.sblock_alloc_buffer((KEYS, rows), "float32")
                state = T.sblock_alloc_buffer((4, rows), "float32")
                seen = T.sblock_alloc_buffer((rows,), "int32")
                acc = T.sblock_alloc_buffer((KEY_PASS, rows), "float32")
                out = T.sblock_alloc_buffer((rows, d), "float32")
                start(q, q_start, q0, n_q, kv_head, scale, causal, kv_len, Qt, seen, state, out)
                for block in range(T.ceildiv(_keys_seen(causal, kv_len, n_q, q0, queries), KEYS)):
                    _load_block(K, V, block, kv_head, kv_len, pages, page_values, first_page, cached, k, v, kv_rows,
                                first_new)
                    attend(Qt, K, V, S, acc, seen, state, out, block * KEYS, T.min(queries, n_q - q0) * group)
                finish(output, lse, q_start, q0, n_q, kv_head, state, out)

    return attend_sequence


def _keys_seen(causal, kv_len, n_q, q0, queries: int):
    """Keys the tile's last query sees: under causal masking, query i sees kv_len - n_q + i + 1."""
    return T.if_then_else(causal > 0, T.min(kv_len, kv_len - n_q + T.min(q0 + queries, n_q)), kv_len)


def _first_query(tile_index, n_q, queries: int):
    """Tiles in the order 0, n-1, 1, n-2, ...: the threads split the tasks into contiguous ranges,
    and under causal masking a later tile sees more keys."""
    half = tile_index // 2
    return T.Select(tile_index % 2 == 0, half, T.ceildiv(n_q, queries) - 1 - half) * queries
