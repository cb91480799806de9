"""CPU attention for the paged KV cache: flash-style, parallel and vectorised.

TVM 0.27's CPU attention kernels (tir_attention_prefill_cpu over the cached pages,
tir_attention_prefill_ragged_cpu over the chunk's own tokens, tir_attention_decode_cpu for one token
per sequence) are scalar loop nests on one thread, so every prefill chunk after the first, which
attends to all the pages cached before it, grew slower by seconds per cached chunk, and a decode at
2000 tokens of context spent most of its time in attention. These take their place
(workarounds.CPUPagedKVCache installs them) with the same arguments and results: the output, and the
log2-sum-exp TVM's merge kernel combines partial attentions with.

Each parallel task takes one KV head, the query heads that share it and a tile of QUERIES queries
(`rows` in all; a decode's tile is its one query), and walks the keys a block of KEYS at a time (a page of the cache) with an online
softmax: scores for the block, a running max and sum per row, the output rescaled and accumulated.
Scores are kept transposed, [key, row], so the softmax's max and sum over keys run down columns,
vectorised over rows; they are in log2 units (queries scaled by sm_scale * log2(e)), as in TVM's kernels.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

KEYS = 16  # keys per block: one page of the cache (TVM's CPU kernels fix the page size at 16)
QUERIES = 8  # queries per prefill task
KEY_PASS = 4  # score rows computed together: each query vector loaded serves four keys
LANES = 8  # float32 lanes of an AVX2 register
EMPTY_LSE = -5e4  # what TVM's kernels report for a row with no keys: the merge weighs it zero
LOG2E = math.log2(math.e)
NONE = T.min_value("float32")  # the score of a key a row does not see
# 2^f on [-0.5, 0.5] as 1 + f * poly(f) (Cephes' exp2f): relative error below 1e-7, as exp2f's;
# LLVM has no vector exp2 on x86 and calls exp2f lane by lane, slower than the matmuls here.
EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
             2.402264791363012e-1, 6.931472028550421e-1)


def paged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str):
    """tir_attention_prefill_cpu: queries against the pages cached for their sequence."""
    attend_sequence = _sequence_attention(h_kv, h_q, d, QUERIES)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle,  # [total_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_pages: T.handle,  # [max_num_pages, 2, h_kv, page_size, d]
        var_page_indptr: T.handle,  # [batch_size + 1]
        var_page_values: T.handle,  # [nnz_pages]
        var_length_info: T.handle,  # [batch_size]: tokens in each sequence's last page
        var_k_rope_pos_offset: T.handle,  # [batch_size]
        var_q_rope_position: T.handle,  # [total_len]
        var_output: T.handle,  # [total_len, h_q, d]
        var_lse: T.handle,  # [total_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, total_len, nnz_pages, max_num_pages = T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, KEYS, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        T.Assert(rotary_mode == 0, "RoPE inside attention is not supported: the model applies it before the cache")

        for b in range(batch_size):
            n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
            kv_len: T.let[T.int32] = T.Select(n_pages > 0, (n_pages - 1) * KEYS + length_info[b], 0)
            attend_sequence(_load_page, pages, page_values, page_indptr[b], kv_len, q, q_indptr[b],
                            q_indptr[b + 1] - q_indptr[b], causal, sm_scale * LOG2E, output, lse)

    return batch_prefill_paged_kv_cpu


def paged_decode_cpu(h_kv: int, h_q: int, d: int, dtype: str):
    """tir_attention_decode_cpu: each sequence's one new token against all its cached pages (its own
    key and value among them)."""
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
            n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
            kv_len: T.let[T.int32] = T.Select(n_pages > 0, (n_pages - 1) * KEYS + length_info[b], 0)
            attend_sequence(_load_page, pages, page_values, page_indptr[b], kv_len, q, b, 1, 0, sm_scale * LOG2E,
                            output, lse)

    return batch_decode_paged_kv_cpu


def ragged_prefill_cpu(h_kv: int, h_q: int, d: int, dtype: str):
    """tir_attention_prefill_ragged_cpu: queries against the keys and values of the same forward."""
    attend_sequence = _sequence_attention(h_kv, h_q, d, QUERIES)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv_cpu(
        var_q: T.handle,  # [qo_len, h_q, d]
        var_q_indptr: T.handle,  # [batch_size + 1]
        var_k: T.handle,  # [kv_len, h_kv, d]
        var_v: T.handle,  # [kv_len, h_kv, d]
        var_kv_indptr: T.handle,  # [batch_size + 1]
        var_q_rope_position: T.handle,  # [qo_len]
        var_k_rope_pos_offset: T.handle,  # [batch_size]
        var_output: T.handle,  # [qo_len, h_q, d]
        var_lse: T.handle,  # [qo_len, h_q]
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        batch_size, qo_len, kv_len_total = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        k = T.match_buffer(var_k, (kv_len_total, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len_total, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=T.int32())  # binds batch_size
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        T.Assert(rotary_mode == 0, "RoPE inside attention is not supported: the model applies it before the cache")

        for b in range(batch_size):
            attend_sequence(_load_rows, k, v, kv_indptr[b], kv_indptr[b + 1] - kv_indptr[b], q, q_indptr[b],
                            q_indptr[b + 1] - q_indptr[b], causal, sm_scale * LOG2E, output, lse)

    return batch_prefill_ragged_kv_cpu


@T.macro
def _load_page(K, V, block, kv_head, kv_len, pages, page_values, first_page):
    """K and V [KEYS, d] = page `block` of the sequence, zero past its keys."""
    page: T.let[T.int32] = page_values[first_page + block]
    for j in range(KEYS):
        for c in T.vectorized(K.shape[1]):
            # a page's free slots are uninitialised, and zero times NaN is NaN
            K[j, c] = T.Select(block * KEYS + j < kv_len, T.Cast("float32", pages[page, 0, kv_head, j, c]),
                               T.float32(0))
            V[j, c] = T.Select(block * KEYS + j < kv_len, T.Cast("float32", pages[page, 1, kv_head, j, c]),
                               T.float32(0))


@T.macro
def _load_rows(K, V, block, kv_head, kv_len, k, v, first_row):
    """K and V [KEYS, d] = rows block * KEYS.. of the sequence's keys and values, zero past its keys."""
    for j in range(KEYS):
        for c in T.vectorized(K.shape[1]):
            K[j, c] = T.if_then_else(block * KEYS + j < kv_len,
                                     T.Cast("float32", k[first_row + block * KEYS + j, kv_head, c]), T.float32(0))
            V[j, c] = T.if_then_else(block * KEYS + j < kv_len,
                                     T.Cast("float32", v[first_row + block * KEYS + j, kv_head, c]), T.float32(0))


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
    def attend(Qt, K, V, S, acc, seen, state, out, key0):
        """Fold keys key0 .. key0 + KEYS into the running state."""
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
            state[3, r] = _exp2(state[0, r] - state[2, r])
            state[0, r] = state[2, r]
            state[1, r] = state[1, r] * state[3, r]
        for j in range(KEYS):
            for r in T.vectorized(rows):
                S[j, r] = T.Select(S[j, r] > NONE, _exp2(S[j, r] - state[0, r]), T.float32(0))
                state[1, r] = state[1, r] + S[j, r]
        for r in range(rows):
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
    def attend_sequence(load_block, keys, values, first, kv_len, q, q_start, n_q, causal, scale, output, lse):
        """One sequence's queries against its keys, which load_block(K, V, block, kv_head, kv_len,
        keys, values, first) brings a block at a time."""
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
                    load_block(K, V, block, kv_head, kv_len, keys, values, first)
                    attend(Qt, K, V, S, acc, seen, state, out, block * KEYS)
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


def _exp2(x):
    """2^x for x <= 0, vectorisable: 2^round(x) from the exponent bits times 2^f by EXP2_POLY
    (x below -127 gives 0, where 2^x is below the smallest normal float)."""
    x = T.max(x, T.float32(-127))
    n = T.floor(x + T.float32(0.5))
    f = x - n
    poly = T.float32(EXP2_POLY[0])
    for coefficient in EXP2_POLY[1:]:
        poly = poly * f + T.float32(coefficient)
    return T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23)) * (T.float32(1) + f * poly)
