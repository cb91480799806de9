"""TensorIR kernels for sampling and exact speculative verification.

Every kernel takes a symbolic row count and a symbolic vocabulary size V, float32 probabilities or
logits and int32 token ids; outputs are passed last (destination-passing style):

    sampling_probs(logits[n,V], temperature[n], top_k[n], top_p[n], probs[n,V])
    sample_from_probs(probs[n,V], u[n], tokens[n])
    argmax(logits[n,V], tokens[n])
    verify_greedy(logits[Np,V], draft[Nq], indptr[B+1], accepted[B], next_token[B])
    verify_sampling(p[Np,V], q[Nq,V], draft[Nq], indptr[B+1], u_accept[Nq], u_sample[B],
                    accepted[B], next_token[B])
    tree_verify_greedy(logits[N,V], tokens[N], parents[N], indptr[B+1], leaf[B], next_token[B])
    tree_verify_sampling(p[N,V], q[N,V], tokens[N], parents[N], indptr[B+1], u_accept[N], u_sample[B],
                         leaf[B], next_token[B])

Sequence b of a verify batch owns target rows indptr[b] .. indptr[b+1]-1 (its k_b drafts plus one bonus
row) and draft slots indptr[b]-b .. indptr[b]-b+k_b-1, so Nq = Np - B. The numpy reference in
tests/test_kernels.py is the executable specification. Inputs are assumed sane: temperature > 0 (greedy
decoding is argmax), 0 < top_p <= 1 (top_p <= 0 keeps just the most probable tokens), probability rows
with some positive entry (a row without one samples token 0), logit rows with some entry above -inf
(argmax of an all -inf row is -1). A draft id outside [0, V) is rejected.

The tree kernels verify a token tree per sequence: sequence b owns nodes indptr[b] .. indptr[b+1]-1, node 0
of each its root (the last committed token), parents[] local to the sequence (-1 at the root) and smaller
than the node's own index (TVM's tree attention order). Every array is indexed by node: logits/p are the
target's rows at each node, q the draft's distribution at each node (the one its children were drawn
from; unused at leaves), u_accept the acceptance uniform of each node (unused at roots). They return the
deepest accepted node (local index, 0 when nothing is accepted) and the token that follows it.

Each kernel is written once as block-based TIR (`kernel(name)`) and scheduled per target
(`scheduled_kernels(target)`): llvm gets rows in parallel with vectorised elementwise loops, every other
target gets one thread block per row (or sequence) with the vocabulary loop spread over its threads.
"""

import re

import tvm
from tvm import s_tir
from tvm.script import tirx as T

KERNEL_NAMES = ("sampling_probs", "sample_from_probs", "argmax", "verify_greedy", "verify_sampling",
                "tree_verify_greedy", "tree_verify_sampling")

# Softmax numerators exp((l - max) / t) lie in [0, 1], and non-negative floats order like their int32
# bit patterns, so a threshold is found by bisecting the integers 0 .. bits(1.0).
_ONE_BITS = 0x3F800000
_BISECT_STEPS = 30  # 2**30 > _ONE_BITS + 1: thirty halvings leave one bit pattern
_GPU_THREADS = 256
_CPU_VECTOR = 8
# Float sums over a row run in _LANES independent partials (one per GPU thread, vectors on CPU): a
# compiler may not reorder a single float accumulator, and V / _LANES terms per partial round less.
_LANES = _GPU_THREADS
# The inverse CDF first picks one of _CHUNKS contiguous buckets of a row, then a token inside it; each
# GPU thread sums one bucket, so the sequential scans are only _CHUNKS + V / _CHUNKS long.
_CHUNKS = _GPU_THREADS


def _chunk_len(v):
    return T.ceildiv(v, T.int64(_CHUNKS))


def _padded(v):
    return T.ceildiv(v, T.int64(_LANES)) * T.int64(_LANES)


def _as_float(bits):
    return T.reinterpret("float32", bits)


def _i64(value):
    return T.Cast("int64", value)


# ---------------------------------------------------------------------------------------------------
# Shared pieces of TIR


@T.macro
def _argmax_rows(logits, best_token, best_logit, r, v):
    for x in range(v):
        with T.sblock("row_argmax"):
            vr, vx = T.axis.remap("SR", [r, x])
            T.reads(logits[vr, vx], best_token[vr], best_logit[vr])
            T.writes(best_token[vr], best_logit[vr])
            with T.init():
                best_token[vr] = -1
                best_logit[vr] = T.min_value("float32")
            # Ties go to the lower index in any combining order, so a split reduction matches numpy;
            # this exact form (init -1 / min_value) is one TVM's cross-thread reducer matcher knows.
            token: T.let[T.int32] = T.Select(
                best_logit[vr] > logits[vr, vx]
                or (best_logit[vr] == logits[vr, vx] and best_token[vr] < T.Cast("int32", vx)),
                best_token[vr],
                T.Cast("int32", vx),
            )
            logit: T.let[T.float32] = T.Select(
                best_logit[vr] > logits[vr, vx], best_logit[vr], logits[vr, vx]
            )
            best_token[vr] = token
            best_logit[vr] = logit


@T.macro
def _mass_at_least(lanes_name, name, mass, lane_mass, numer, r, threshold, v):
    """mass[0] = the sum of the numerators numer[r, x] >= threshold, in _LANES independent partials."""
    for lane, step in T.grid(T.int64(_LANES), T.ceildiv(v, T.int64(_LANES))):
        with T.sblock(lanes_name):
            vl, vs = T.axis.remap("SR", [lane, step])
            with T.init():
                lane_mass[vl] = T.float32(0)
            lane_mass[vl] = lane_mass[vl] + T.Select(
                numer[r, vs * _LANES + vl] >= threshold, numer[r, vs * _LANES + vl], T.float32(0)
            )
    for lane in range(T.int64(_LANES)):
        with T.sblock(name):
            vl = T.axis.reduce(T.int64(_LANES), lane)
            with T.init():
                mass[0] = T.float32(0)
            mass[0] = mass[0] + lane_mass[vl]


@T.macro
def _compensated_add(total, err, index, value):
    """Kahan summation step: err carries the low-order bits that total + value rounded away."""
    term: T.let[T.float32] = value - err[index]
    rounded: T.let[T.float32] = total[index] + term
    err[index] = (rounded - total[index]) - term
    total[index] = rounded


def _weight(p, q, row, qrow, x):
    """p[row, x], or the residual max(0, p - q) where qrow >= 0 names the rejecting draft's q row."""
    if qrow is None:
        return p[row, x]
    return T.if_then_else(
        qrow >= 0, T.max(p[row, x] - q[_i64(qrow), x], T.float32(0)), p[row, x]
    )


def _row(rows, s):
    """The p row of slot s: rows[s], or s itself when the kernel has no row map."""
    return s if rows is None else _i64(rows[s])


def _draft_row(rows, s):
    """The q row of slot s (-1: none), or None when the weights are plain p rows."""
    return None if rows is None else rows[s]


@T.macro
def _chunk_masses(name, mass, p, q, prow, qrow, s, v):
    """mass[s, c] = the weight of bucket c; rows come from prow/qrow[s], or are s itself if None."""
    for c, i in T.grid(T.int64(_CHUNKS), _chunk_len(v)):
        with T.sblock(name):
            vs, vc, vi = T.axis.remap("SSR", [s, c, i])
            T.reads(p[0 : p.shape[0], 0:v], q[0 : q.shape[0], 0:v])
            T.writes(mass[vs, vc])
            with T.init():
                mass[vs, vc] = T.float32(0)
            x: T.let[T.int64] = vc * _chunk_len(v) + vi
            if x < v:
                mass[vs, vc] = mass[vs, vc] + _weight(
                    p, q, _row(prow, vs), _draft_row(qrow, vs), x
                )


@T.macro
def _inverse_cdf(p, q, row, qrow, mass, s, u, out, v):
    """out[s] = smallest x with cumsum(w)[x] > u * sum(w), w the weights summarised by mass[s, :].

    If rounding leaves no such x, the last x with w(x) > 0; a row without positive weight gives 0.
    Token and bucket scalars are int32: WebGPU narrows every index to 32 bits and refuses int64 ones.
    """
    total: T.float32 = T.float32(0)
    for c in range(T.int64(_CHUNKS)):
        total = total + mass[s, c]
    goal: T.float32 = u * total
    chunk: T.int32 = -1
    last_chunk: T.int32 = 0
    below: T.float32 = T.float32(0)
    for c in range(T.int64(_CHUNKS)):
        # Bound first: 0.27's thread-sync analysis rejects shared-memory loads inside if conditions.
        m: T.let[T.float32] = mass[s, c]
        if m > T.float32(0):
            last_chunk = T.Cast("int32", c)
        if chunk < 0:
            if below + m > goal:
                chunk = T.Cast("int32", c)
            else:
                below = below + m
    if chunk < 0:  # rounding put u * total past the last bucket: take its last positive token
        chunk = last_chunk
        goal = T.max_value("float32")
    run: T.float32 = below
    token: T.int32 = -1
    last_positive: T.int32 = 0
    for i in range(_chunk_len(v)):
        x: T.let[T.int64] = _i64(chunk) * _chunk_len(v) + i
        if token < 0:
            if x < v:
                w: T.let[T.float32] = _weight(p, q, row, qrow, x)
                if w > T.float32(0):
                    last_positive = T.Cast("int32", x)
                run = run + w
                if run > goal:
                    token = T.Cast("int32", x)
    out[s] = T.Select(token >= 0, token, last_positive)


@T.macro
def _law_from_p(law, p, s, row, v):
    for y in range(v):
        with T.sblock("law_from_p"):
            vy = T.axis.spatial(v, y)
            T.reads(p[0 : p.shape[0], vy])
            T.writes(law[s, vy])
            law[s, vy] = p[row, vy]


@T.macro
def _law_at(law_x, law, s, x, v):
    """law_x[0] = law[s, x], as a sum over the row: each GPU thread reads only the slice it wrote."""
    for y in range(v):
        with T.sblock("law_at_token"):
            vy = T.axis.reduce(v, y)
            T.reads(law[s, vy])
            T.writes(law_x[0])
            with T.init():
                law_x[0] = T.float32(0)
            law_x[0] = law_x[0] + T.Select(T.Cast("int32", vy) == x, law[s, vy], T.float32(0))


def _normalised(weight, total):
    return T.Select(total > T.float32(0), weight / total, T.float32(0))


def _next_residual(r, rest, q_y, total):
    """One residual step at one token, as _residual_step computes it."""
    return _normalised(T.max(r * rest - q_y, T.float32(0)), total)


@T.macro
def _residual_step(law, residual, q, total, rest, s, row, v):
    """law = norm(max(0, law * rest - q[row])), all zero if that is empty; total = its sum."""
    for y in range(v):
        with T.sblock("residual"):
            vy = T.axis.spatial(v, y)
            T.reads(law[s, vy], q[0 : q.shape[0], vy], rest[0])
            T.writes(residual[s, vy])
            residual[s, vy] = T.max(law[s, vy] * rest[0] - q[row, vy], T.float32(0))
    for y in range(v):
        with T.sblock("residual_total"):
            vy = T.axis.reduce(v, y)
            T.reads(residual[s, vy])
            T.writes(total[0])
            with T.init():
                total[0] = T.float32(0)
            total[0] = total[0] + residual[s, vy]
    for y in range(v):
        with T.sblock("law_from_residual"):
            vy = T.axis.spatial(v, y)
            T.reads(residual[s, vy], total[0])
            T.writes(law[s, vy])
            law[s, vy] = _normalised(residual[s, vy], total[0])


@T.macro
def _numerators(logits, temperature, row_max, numer, r, v):
    """numer[r, x] = exp((logits[r, x] - max) / temperature), zero in the padding past V."""
    for x in range(v):
        with T.sblock("row_max"):
            vr, vx = T.axis.remap("SR", [r, x])
            with T.init():
                row_max[vr] = T.min_value("float32")
            row_max[vr] = T.max(row_max[vr], logits[vr, vx])
    for x in range(_padded(v)):
        with T.sblock("numerator"):
            vr, vx = T.axis.remap("SS", [r, x])
            numer[vr, vx] = T.if_then_else(
                vx < v, T.exp((logits[vr, vx] - row_max[vr]) / temperature[vr]), T.float32(0)
            )


@T.macro
def _top_k_threshold(numer, top_k, top_k_bits, r, v):
    """Largest t with count{x: numer(x) >= t} >= top_k: the k-th largest value, ties included."""
    with T.sblock("top_k_threshold"):
        vr = T.axis.spatial(top_k.shape[0], r)
        T.reads(numer[vr, 0 : _padded(v)], top_k[vr])
        T.writes(top_k_bits[vr])
        # Per-thread state: on GPU every thread updates its own copy from the broadcast count.
        lo = T.sblock_alloc_buffer((1,), "int32", scope="local")
        hi = T.sblock_alloc_buffer((1,), "int32", scope="local")
        count = T.sblock_alloc_buffer((1,), "int32", scope="local")
        lo[0] = 0
        hi[0] = T.Select(0 < top_k[vr] and _i64(top_k[vr]) < v, _ONE_BITS + 1, 1)
        if lo[0] + 1 < hi[0]:  # else the filter is off: [lo, hi) already holds one pattern
            for step in range(_BISECT_STEPS):  # a named loop: WGSL refuses TVM's "__1" for "_"
                for x in range(v):
                    with T.sblock("count_at_least"):
                        vx = T.axis.reduce(v, x)
                        T.reads(numer[vr, vx], lo[0], hi[0])
                        T.writes(count[0])
                        with T.init():
                            count[0] = 0
                        count[0] = count[0] + T.Select(
                            numer[vr, vx] >= _as_float((lo[0] + hi[0]) // 2), 1, 0
                        )
                with T.sblock("top_k_step"):
                    if count[0] >= top_k[vr]:
                        lo[0] = (lo[0] + hi[0]) // 2
                    else:
                        hi[0] = (lo[0] + hi[0]) // 2
        top_k_bits[vr] = lo[0]


@T.macro
def _top_p_threshold(numer, top_p, top_k_bits, keep_bits, r, v):
    """Largest t >= the top-k threshold whose kept mass still reaches top_p of the top-k mass:
    exactly the tokens whose strictly-more-probable mass is below top_p, ties included."""
    with T.sblock("top_p_threshold"):
        vr = T.axis.spatial(top_p.shape[0], r)
        T.reads(numer[vr, 0 : _padded(v)], top_k_bits[vr], top_p[vr])
        T.writes(keep_bits[vr])
        lo = T.sblock_alloc_buffer((1,), "int32", scope="local")
        hi = T.sblock_alloc_buffer((1,), "int32", scope="local")
        top_k_mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
        mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
        top_k_lane_mass = T.sblock_alloc_buffer((_LANES,), "float32", scope="local")
        lane_mass = T.sblock_alloc_buffer((_LANES,), "float32", scope="local")
        lo[0] = top_k_bits[vr]
        hi[0] = T.Select(top_p[vr] < T.float32(1), _ONE_BITS + 1, top_k_bits[vr] + 1)
        if lo[0] + 1 < hi[0]:
            _mass_at_least(
                "top_k_lanes", "top_k_mass", top_k_mass, top_k_lane_mass, numer, vr,
                _as_float(top_k_bits[vr]), v,
            )  # fmt: skip
            for step in range(_BISECT_STEPS):  # a named loop: WGSL refuses TVM's "__1" for "_"
                _mass_at_least(
                    "lanes_at_least", "mass_at_least", mass, lane_mass, numer, vr,
                    _as_float((lo[0] + hi[0]) // 2), v,
                )  # fmt: skip
                with T.sblock("top_p_step"):
                    if mass[0] >= top_p[vr] * top_k_mass[0]:
                        lo[0] = (lo[0] + hi[0]) // 2
                    else:
                        hi[0] = (lo[0] + hi[0]) // 2
        keep_bits[vr] = lo[0]


@T.macro
def _kept_totals(numer, keep_bits, lane_sum, lane_err, kept_total, n, v):
    """kept_total[r] = the sum of the kept numerators, with compensation: it sets every probability's
    error, and a dominant token (numerator 1.0) would otherwise round away the small terms."""
    for r, lane, step in T.grid(n, T.int64(_LANES), T.ceildiv(v, T.int64(_LANES))):
        with T.sblock("kept_lanes"):
            vr, vl, vs = T.axis.remap("SSR", [r, lane, step])
            with T.init():
                lane_sum[vr, vl] = T.float32(0)
                lane_err[vr, vl] = T.float32(0)
            x: T.let[T.int64] = vs * _LANES + vl
            _compensated_add(
                lane_sum, lane_err, (vr, vl),
                T.Select(numer[vr, x] >= _as_float(keep_bits[vr]), numer[vr, x], T.float32(0)),
            )  # fmt: skip
    for r in range(n):
        with T.sblock("kept_total"):
            vr = T.axis.spatial(n, r)
            T.reads(lane_sum[vr, 0:_LANES], lane_err[vr, 0:_LANES])
            T.writes(kept_total[vr])
            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
            err = T.sblock_alloc_buffer((1,), "float32", scope="local")
            total[0] = T.float32(0)
            err[0] = T.float32(0)
            for lane in range(T.int64(_LANES)):
                _compensated_add(total, err, (0,), lane_sum[vr, lane] - lane_err[vr, lane])
            kept_total[vr] = total[0]


# ---------------------------------------------------------------------------------------------------
# Kernels


@T.prim_func(s_tir=True)
def sampling_probs(
    var_logits: T.handle,
    var_temperature: T.handle,
    var_top_k: T.handle,
    var_top_p: T.handle,
    var_probs: T.handle,
):
    T.func_attr({"tirx.noalias": True})
    n, v = T.int64(), T.int64()
    logits = T.match_buffer(var_logits, (n, v), "float32")
    temperature = T.match_buffer(var_temperature, (n,), "float32")
    top_k = T.match_buffer(var_top_k, (n,), "int32")
    top_p = T.match_buffer(var_top_p, (n,), "float32")
    probs = T.match_buffer(var_probs, (n, v), "float32")
    row_max = T.sblock_alloc_buffer((n,), "float32")
    # Kept apart from probs so that no block rewrites what it reads (schedulable dataflow), and
    # zero-padded to whole lanes so that lane sums need no bounds test (which blocks vectorising).
    numer = T.sblock_alloc_buffer((n, _padded(v)), "float32")
    top_k_bits = T.sblock_alloc_buffer((n,), "int32")
    keep_bits = T.sblock_alloc_buffer((n,), "int32")
    lane_sum = T.sblock_alloc_buffer((n, _LANES), "float32")
    lane_err = T.sblock_alloc_buffer((n, _LANES), "float32")
    kept_total = T.sblock_alloc_buffer((n,), "float32")
    for r in range(n):
        _numerators(logits, temperature, row_max, numer, r, v)
        _top_k_threshold(numer, top_k, top_k_bits, r, v)
        _top_p_threshold(numer, top_p, top_k_bits, keep_bits, r, v)
    _kept_totals(numer, keep_bits, lane_sum, lane_err, kept_total, n, v)
    for r, x in T.grid(n, v):
        with T.sblock("normalize"):
            vr, vx = T.axis.remap("SS", [r, x])
            # kept_total >= 1: the row maximum has numerator exp(0) and is always kept.
            probs[vr, vx] = T.Select(
                numer[vr, vx] >= _as_float(keep_bits[vr]),
                numer[vr, vx] / kept_total[vr],
                T.float32(0),
            )


@T.prim_func(s_tir=True)
def sample_from_probs(var_probs: T.handle, var_u: T.handle, var_tokens: T.handle):
    T.func_attr({"tirx.noalias": True})
    n, v = T.int64(), T.int64()
    probs = T.match_buffer(var_probs, (n, v), "float32")
    u = T.match_buffer(var_u, (n,), "float32")
    tokens = T.match_buffer(var_tokens, (n,), "int32")
    chunk_mass = T.sblock_alloc_buffer((n, _CHUNKS), "float32")
    for r in range(n):
        _chunk_masses("chunks", chunk_mass, probs, probs, None, None, r, v)
        with T.sblock("pick"):
            vr = T.axis.spatial(n, r)
            T.reads(probs[vr, 0:v], chunk_mass[vr, 0:_CHUNKS], u[vr])
            T.writes(tokens[vr])
            _inverse_cdf(probs, probs, vr, None, chunk_mass, vr, u[vr], tokens, v)


@T.prim_func(s_tir=True)
def argmax(var_logits: T.handle, var_tokens: T.handle):
    T.func_attr({"tirx.noalias": True})
    n, v = T.int64(), T.int64()
    logits = T.match_buffer(var_logits, (n, v), "float32")
    tokens = T.match_buffer(var_tokens, (n,), "int32")
    best_logit = T.sblock_alloc_buffer((n,), "float32")
    for r in range(n):
        _argmax_rows(logits, tokens, best_logit, r, v)


@T.prim_func(s_tir=True)
def verify_greedy(
    var_logits: T.handle,
    var_draft: T.handle,
    var_indptr: T.handle,
    var_accepted: T.handle,
    var_next_token: T.handle,
):
    T.func_attr({"tirx.noalias": True})
    num_rows, v, num_drafts, batch = T.int64(), T.int64(), T.int64(), T.int64()
    logits = T.match_buffer(var_logits, (num_rows, v), "float32")
    draft = T.match_buffer(var_draft, (num_drafts,), "int32")
    indptr = T.match_buffer(var_indptr, (batch + 1,), "int32")
    accepted = T.match_buffer(var_accepted, (batch,), "int32")
    next_token = T.match_buffer(var_next_token, (batch,), "int32")
    row_token = T.sblock_alloc_buffer((num_rows,), "int32")
    row_logit = T.sblock_alloc_buffer((num_rows,), "float32")
    for r in range(num_rows):
        _argmax_rows(logits, row_token, row_logit, r, v)
    for s in range(batch):
        with T.sblock("greedy_walk"):
            vs = T.axis.spatial(batch, s)
            T.reads(indptr[vs : vs + 2], draft[0:num_drafts], row_token[0:num_rows])
            T.writes(accepted[vs], next_token[vs])
            first_row: T.let[T.int32] = indptr[vs]
            first_draft: T.let[T.int32] = first_row - T.Cast("int32", vs)
            n: T.int32 = 0
            # No early exit in TIR: later positions are skipped once n falls behind j.
            for j in range(indptr[vs + 1] - first_row - 1):
                if n == j:
                    if draft[_i64(first_draft + j)] == row_token[_i64(first_row + j)]:
                        n = n + 1
            accepted[vs] = n
            next_token[vs] = row_token[_i64(first_row + n)]


@T.prim_func(s_tir=True)
def verify_sampling(
    var_p: T.handle,
    var_q: T.handle,
    var_draft: T.handle,
    var_indptr: T.handle,
    var_u_accept: T.handle,
    var_u_sample: T.handle,
    var_accepted: T.handle,
    var_next_token: T.handle,
):
    T.func_attr({"tirx.noalias": True})
    num_rows, v, num_drafts, batch = T.int64(), T.int64(), T.int64(), T.int64()
    p = T.match_buffer(var_p, (num_rows, v), "float32")
    q = T.match_buffer(var_q, (num_drafts, v), "float32")
    draft = T.match_buffer(var_draft, (num_drafts,), "int32")
    indptr = T.match_buffer(var_indptr, (batch + 1,), "int32")
    u_accept = T.match_buffer(var_u_accept, (num_drafts,), "float32")
    u_sample = T.match_buffer(var_u_sample, (batch,), "float32")
    accepted = T.match_buffer(var_accepted, (batch,), "int32")
    next_token = T.match_buffer(var_next_token, (batch,), "int32")
    # The row next_token is drawn from, and the q row whose residual applies (-1: all drafts accepted).
    sample_row = T.sblock_alloc_buffer((batch,), "int32")
    reject_row = T.sblock_alloc_buffer((batch,), "int32")
    residual_mass = T.sblock_alloc_buffer((batch, _CHUNKS), "float32")
    target_mass = T.sblock_alloc_buffer((batch, _CHUNKS), "float32")
    for s in range(batch):
        with T.sblock("accept_walk"):
            vs = T.axis.spatial(batch, s)
            T.reads(
                indptr[vs : vs + 2],
                draft[0:num_drafts],
                p[0:num_rows, 0:v],
                q[0:num_drafts, 0:v],
                u_accept[0:num_drafts],
            )
            T.writes(accepted[vs], sample_row[vs], reject_row[vs])
            first_row: T.let[T.int32] = indptr[vs]
            first_draft: T.let[T.int32] = first_row - T.Cast("int32", vs)
            num: T.let[T.int32] = indptr[vs + 1] - first_row - 1
            n: T.int32 = 0
            for j in range(num):
                if n == j:
                    x: T.let[T.int32] = draft[_i64(first_draft + j)]
                    # An id outside the vocabulary has target probability 0: rejected, never read.
                    if 0 <= x and _i64(x) < v:
                        p_x: T.let[T.float32] = p[_i64(first_row + j), _i64(x)]  # "target" is reserved in WGSL
                        q_x: T.let[T.float32] = q[_i64(first_draft + j), _i64(x)]
                        if p_x > T.float32(0):
                            if u_accept[_i64(first_draft + j)] * q_x <= p_x:
                                n = n + 1
            accepted[vs] = n
            sample_row[vs] = first_row + n
            reject_row[vs] = T.Select(n < num, first_draft + n, -1)
    for s in range(batch):
        _chunk_masses("residual_chunks", residual_mass, p, q, sample_row, reject_row, s, v)
        _chunk_masses("target_chunks", target_mass, p, q, sample_row, None, s, v)
        with T.sblock("pick"):
            vs = T.axis.spatial(batch, s)
            T.reads(
                p[0:num_rows, 0:v],
                q[0:num_drafts, 0:v],
                sample_row[vs],
                reject_row[vs],
                residual_mass[vs, 0:_CHUNKS],
                target_mass[vs, 0:_CHUNKS],
                u_sample[vs],
            )
            T.writes(next_token[vs])
            residual_total: T.float32 = T.float32(0)
            for c in range(T.int64(_CHUNKS)):
                residual_total = residual_total + residual_mass[vs, c]
            row: T.let[T.int64] = _i64(sample_row[vs])
            if residual_total > T.float32(0):
                _inverse_cdf(p, q, row, reject_row[vs], residual_mass, vs, u_sample[vs], next_token, v)
            else:
                # p == q up to rounding: the residual is empty, and p itself is the right law.
                _inverse_cdf(p, q, row, None, target_mass, vs, u_sample[vs], next_token, v)


@T.prim_func(s_tir=True)
def tree_verify_greedy(
    var_logits: T.handle,
    var_tokens: T.handle,
    var_parents: T.handle,
    var_indptr: T.handle,
    var_leaf: T.handle,
    var_next_token: T.handle,
):
    T.func_attr({"tirx.noalias": True})
    num_nodes, v, batch = T.int64(), T.int64(), T.int64()
    logits = T.match_buffer(var_logits, (num_nodes, v), "float32")
    tokens = T.match_buffer(var_tokens, (num_nodes,), "int32")
    parents = T.match_buffer(var_parents, (num_nodes,), "int32")
    indptr = T.match_buffer(var_indptr, (batch + 1,), "int32")
    leaf = T.match_buffer(var_leaf, (batch,), "int32")
    next_token = T.match_buffer(var_next_token, (batch,), "int32")
    row_token = T.sblock_alloc_buffer((num_nodes,), "int32")
    row_logit = T.sblock_alloc_buffer((num_nodes,), "float32")
    for r in range(num_nodes):
        _argmax_rows(logits, row_token, row_logit, r, v)
    for s in range(batch):
        with T.sblock("tree_greedy_walk"):
            vs = T.axis.spatial(batch, s)
            T.reads(indptr[vs : vs + 2], tokens[0:num_nodes], parents[0:num_nodes], row_token[0:num_nodes])
            T.writes(leaf[vs], next_token[vs])
            first: T.let[T.int32] = indptr[vs]
            node: T.int32 = 0
            # Parents precede children, so one pass in index order follows the path: once the walk
            # moves to a node, only that node's children (all later) can match.
            for j in range(indptr[vs + 1] - first):
                if parents[_i64(first + j)] == node and j > 0:
                    if tokens[_i64(first + j)] == row_token[_i64(first + node)]:
                        node = j
            leaf[vs] = node
            next_token[vs] = row_token[_i64(first + node)]


@T.prim_func(s_tir=True)
def tree_verify_sampling(
    var_p: T.handle,
    var_q: T.handle,
    var_tokens: T.handle,
    var_parents: T.handle,
    var_indptr: T.handle,
    var_u_accept: T.handle,
    var_u_sample: T.handle,
    var_leaf: T.handle,
    var_next_token: T.handle,
):
    """Recursive rejection sampling (Jeon et al. 2024) for siblings drawn without replacement from q.

    At a node with target law r (p at first) and remaining draft mass rest (1 at first), child x is
    accepted when u * q(x) <= r(x) * rest: u * q_i(x) <= p_i(x) with q_i = q without the earlier
    siblings, renormalised. On rejection r becomes norm(max(0, r * rest - q)) and rest loses q(x). An
    earlier sibling's r(x) is already 0 (it was rejected because r(x) < q_i(x)), so the whole q row
    stands in for q_i without masking. Accepting a child moves there with r = p and rest = 1; the
    emitted token is drawn from the final r, or from p where the residual emptied.
    """
    T.func_attr({"tirx.noalias": True})
    num_nodes, v, batch = T.int64(), T.int64(), T.int64()
    p = T.match_buffer(var_p, (num_nodes, v), "float32")
    q = T.match_buffer(var_q, (num_nodes, v), "float32")
    tokens = T.match_buffer(var_tokens, (num_nodes,), "int32")
    parents = T.match_buffer(var_parents, (num_nodes,), "int32")
    indptr = T.match_buffer(var_indptr, (batch + 1,), "int32")
    u_accept = T.match_buffer(var_u_accept, (num_nodes,), "float32")
    u_sample = T.match_buffer(var_u_sample, (batch,), "float32")
    leaf = T.match_buffer(var_leaf, (batch,), "int32")
    next_token = T.match_buffer(var_next_token, (batch,), "int32")
    # What the walk leaves for the emitted token's law, replayed by final_law: the rejections at the leaf
    # (0 where none, or where the residual emptied and p is the law) with each one's rest and total.
    rejections = T.sblock_alloc_buffer((batch,), "int32")
    rest_used = T.sblock_alloc_buffer((num_nodes,), "float32")
    total_got = T.sblock_alloc_buffer((num_nodes,), "float32")
    law = T.sblock_alloc_buffer((batch, v), "float32")
    law_mass = T.sblock_alloc_buffer((batch, _CHUNKS), "float32")
    for s in range(batch):
        with T.sblock("tree_walk"):
            vs = T.axis.spatial(batch, s)
            T.reads(
                indptr[vs : vs + 2],
                tokens[0:num_nodes],
                parents[0:num_nodes],
                p[0:num_nodes, 0:v],
                q[0:num_nodes, 0:v],
                u_accept[0:num_nodes],
            )
            T.writes(leaf[vs], rejections[vs], rest_used[0:num_nodes], total_got[0:num_nodes])
            # The law r at the current node (p, then the residuals) and the next unnormalised residual.
            current = T.sblock_alloc_buffer((batch, v), "float32")
            residual = T.sblock_alloc_buffer((batch, v), "float32")
            # The walk's state, per thread: on GPU every thread of the sequence's block takes the same
            # path, deciding from the same cross-thread sums, and touches only its own vocabulary slice.
            node = T.sblock_alloc_buffer((1,), "int32", scope="local")
            rest = T.sblock_alloc_buffer((1,), "float32", scope="local")
            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
            rejected = T.sblock_alloc_buffer((1,), "int32", scope="local")
            law_x = T.sblock_alloc_buffer((1,), "float32", scope="local")  # "target" is reserved in WGSL
            q_x = T.sblock_alloc_buffer((1,), "float32", scope="local")
            token = T.sblock_alloc_buffer((1,), "int32", scope="local")
            first: T.let[T.int32] = indptr[vs]
            node[0] = 0
            rest[0] = T.float32(1)
            total[0] = T.float32(1)
            rejected[0] = 0
            _law_from_p(current, p, vs, _i64(first), v)
            for j in range(indptr[vs + 1] - first):
                if parents[_i64(first + j)] == node[0] and j > 0:
                    token[0] = tokens[_i64(first + j)]
                    _law_at(law_x, current, vs, token[0], v)
                    # An id outside the vocabulary has law 0 (no y matched it): rejected, q never read.
                    q_x[0] = T.if_then_else(
                        0 <= token[0] and _i64(token[0]) < v,
                        q[_i64(first + node[0]), _i64(token[0])],
                        T.float32(0),
                    )
                    if law_x[0] > T.float32(0) and u_accept[_i64(first + j)] * q_x[0] <= law_x[0] * rest[0]:
                        node[0] = j
                        rest[0] = T.float32(1)
                        total[0] = T.float32(1)
                        rejected[0] = 0
                        _law_from_p(current, p, vs, _i64(first + node[0]), v)
                    else:
                        _residual_step(current, residual, q, total, rest, vs, _i64(first + node[0]), v)
                        rest_used[_i64(first + rejected[0])] = rest[0]
                        total_got[_i64(first + rejected[0])] = total[0]
                        rejected[0] = rejected[0] + 1
                        rest[0] = rest[0] - q_x[0]
            leaf[vs] = node[0]
            # p == q up to rounding emptied the residual: p itself is the right law, replayed from nothing.
            rejections[vs] = T.Select(total[0] > T.float32(0), rejected[0], 0)
    for s, y in T.grid(batch, v):
        with T.sblock("final_law"):
            vs, vy = T.axis.remap("SS", [s, y])
            T.reads(
                indptr[vs], leaf[vs], rejections[vs], p[0:num_nodes, vy], q[0:num_nodes, vy],
                rest_used[0:num_nodes], total_got[0:num_nodes],
            )  # fmt: skip
            T.writes(law[vs, vy])
            first: T.let[T.int32] = indptr[vs]
            row: T.let[T.int64] = _i64(first + leaf[vs])
            r: T.float32 = p[row, vy]
            # The walk's residual steps at the leaf again, the same float operations in the same order.
            for k in range(rejections[vs]):
                r = _next_residual(r, rest_used[_i64(first + k)], q[row, vy], total_got[_i64(first + k)])
            law[vs, vy] = r
    for s in range(batch):
        _chunk_masses("law_chunks", law_mass, law, law, None, None, s, v)
        with T.sblock("pick"):
            vs = T.axis.spatial(batch, s)
            T.reads(law[vs, 0:v], law_mass[vs, 0:_CHUNKS], u_sample[vs])
            T.writes(next_token[vs])
            _inverse_cdf(law, law, vs, None, law_mass, vs, u_sample[vs], next_token, v)


_KERNELS = {
    "sampling_probs": sampling_probs,
    "sample_from_probs": sample_from_probs,
    "argmax": argmax,
    "verify_greedy": verify_greedy,
    "verify_sampling": verify_sampling,
    "tree_verify_greedy": tree_verify_greedy,
    "tree_verify_sampling": tree_verify_sampling,
}


def kernel(name: str) -> tvm.tirx.PrimFunc:
    """The unscheduled block-based PrimFunc; the caller gives it its symbol."""
    # A fresh copy each time: 0.27's s_tir.Schedule rewrites the PrimFunc it is given in place.
    return s_tir.renew_defs(_KERNELS[name]).without_attr("global_symbol")


# ---------------------------------------------------------------------------------------------------
# Schedules


def _block(sch, name):
    (match,) = _blocks(sch, name)
    return match


def _blocks(sch, name):
    # TVMScript numbers the blocks of a macro's later expansions (row_argmax_1, ...).
    return [b for b in _all_blocks(sch) if re.fullmatch(name + r"(_\d+)?", sch.get(b).name_hint)]


def _all_blocks(sch):
    pending, found = [sch.get_sblock("root")], []
    while pending:
        children = list(sch.get_child_blocks(pending.pop()))
        found += children
        pending += children
    return found


def scheduled_kernels(target: tvm.target.Target) -> dict[str, tvm.tirx.PrimFunc]:
    """Every kernel scheduled for `target`: llvm gets the CPU schedule, anything else the GPU one.

    Marked scheduled so dlight leaves them alone ("tirx.is_scheduled" is what 0.27's dlight reads),
    and unnamed: the caller gives each its symbol.
    """
    schedules = _CPU_SCHEDULES if target.kind.name == "llvm" else _GPU_SCHEDULES
    scheduled = {}
    for name in KERNEL_NAMES:
        sch = s_tir.Schedule(tvm.IRModule({"main": kernel(name)}))
        schedules[name](sch)
        # "tir.is_scheduled" is the pre-0.27 spelling some callers still look for.
        scheduled[name] = sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})
    return scheduled


def _rows(sch, block):
    return sch.get_loops(block)[0]


def _vectorize_vocab(sch, block):
    _, lanes = sch.split(sch.get_loops(block)[-1], [None, _CPU_VECTOR])
    sch.vectorize(lanes)


def _hoist_init(sch, block, loop):
    # Zero the accumulators before `loop` instead of testing for its first iteration inside it. Only
    # after the loops above are parallel: the split-off init leaves them unschedulable.
    sch.decompose_reduction(block, loop)


def _vectorize_lanes(sch, block):
    lanes, steps = sch.get_loops(block)[-2:]
    sch.reorder(steps, lanes)  # lanes innermost: each step adds one contiguous vector
    _vectorize_vocab(sch, block)
    _hoist_init(sch, block, steps)


def _cpu_sampling_probs(sch):
    sch.parallel(_rows(sch, _block(sch, "row_max")))  # numerators and thresholds, a row per task
    _vectorize_vocab(sch, _block(sch, "numerator"))
    for name in ("top_k_lanes", "lanes_at_least"):
        _vectorize_lanes(sch, _block(sch, name))
    kept_lanes = _block(sch, "kept_lanes")
    sch.parallel(_rows(sch, kept_lanes))
    _vectorize_lanes(sch, kept_lanes)
    sch.parallel(_rows(sch, _block(sch, "kept_total")))
    normalize = _block(sch, "normalize")
    sch.parallel(_rows(sch, normalize))
    _vectorize_vocab(sch, normalize)


def _cpu_rows_parallel(*block_names):
    def schedule(sch):
        blocks = [_block(sch, name) for name in block_names]
        for block in blocks:
            sch.parallel(_rows(sch, block))
        for block in blocks:
            if sch.get(block).init is not None:
                _hoist_init(sch, block, sch.get_loops(block)[-1])

    return schedule


_CPU_SCHEDULES = {
    "sampling_probs": _cpu_sampling_probs,
    "sample_from_probs": _cpu_rows_parallel("chunks"),
    "argmax": _cpu_rows_parallel("row_argmax"),
    "verify_greedy": _cpu_rows_parallel("row_argmax", "greedy_walk"),
    "verify_sampling": _cpu_rows_parallel("accept_walk", "residual_chunks", "target_chunks"),
    "tree_verify_greedy": _cpu_rows_parallel("row_argmax", "tree_greedy_walk"),
    "tree_verify_sampling": _cpu_rows_parallel("tree_walk", "final_law", "law_chunks"),
}


def _spread_vocab(sch, block):
    _, threads = sch.split(sch.get_loops(block)[-1], [None, _GPU_THREADS])
    sch.bind(threads, "threadIdx.x")


def _gpu_sampling_probs(sch):
    _gpu_row_thresholds(sch)
    _gpu_normalize(sch)


def _gpu_row_thresholds(sch):
    """First kernel: a row per thread block computes its numerators and both thresholds."""
    for name in ("row_max", "numerator", "count_at_least"):
        _spread_vocab(sch, _block(sch, name))
    # One lane per thread, then a cross-thread sum of the lanes.
    for lanes, total in (("top_k_lanes", "top_k_mass"), ("lanes_at_least", "mass_at_least")):
        sch.bind(sch.get_loops(_block(sch, lanes))[-2], "threadIdx.x")
        sch.bind(sch.get_loops(_block(sch, total))[-1], "threadIdx.x")
    sch.bind(_rows(sch, _block(sch, "row_max")), "blockIdx.x")
    # Row scalars stay per thread; only the numerators and keep thresholds reach the second kernel.
    sch.set_scope(_block(sch, "row_max"), 0, "local")
    sch.set_scope(_block(sch, "top_k_threshold"), 0, "local")


def _gpu_normalize(sch):
    """Second kernel: a row per thread block sums what it keeps and writes the probabilities."""
    kept_lanes, kept_total, normalize = (_block(sch, b) for b in ("kept_lanes", "kept_total", "normalize"))
    rows = _rows(sch, normalize)
    sch.compute_at(kept_total, rows)
    sch.compute_at(kept_lanes, rows)
    sch.bind(sch.get_loops(kept_lanes)[-2], "threadIdx.x")
    sch.set_scope(kept_lanes, 0, "shared")
    sch.set_scope(kept_lanes, 1, "shared")
    sch.set_scope(kept_total, 0, "local")
    _spread_vocab(sch, normalize)
    sch.bind(rows, "blockIdx.x")


def _gpu_argmax_rows(sch):
    row_argmax = _block(sch, "row_argmax")
    _spread_vocab(sch, row_argmax)
    sch.bind(_rows(sch, row_argmax), "blockIdx.x")
    # Its best-logit partner must share the token's (non-local) scope for the cross-thread reduction.
    sch.set_scope(row_argmax, 1, "shared")


def _gpu_sequences(sch, walk_name):
    blocks, threads = sch.split(_rows(sch, _block(sch, walk_name)), [None, _GPU_THREADS])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")


def _gpu_chunked_pick(sch, *chunk_names):
    pick = _block(sch, "pick")
    sch.bind(_rows(sch, pick), "blockIdx.x")
    for name in chunk_names:
        chunks = _block(sch, name)
        sch.bind(sch.get_loops(chunks)[1], "threadIdx.x")
        sch.set_scope(chunks, 0, "shared")
    # The pick stays unbound: every thread of the row repeats the short bucket scan in lockstep and
    # stores the same token (0.27 drops an extent-1 threadIdx binding without guarding the others).


def _gpu_verify_greedy(sch):
    _gpu_argmax_rows(sch)
    _gpu_sequences(sch, "greedy_walk")


def _gpu_verify_sampling(sch):
    _gpu_sequences(sch, "accept_walk")
    _gpu_chunked_pick(sch, "residual_chunks", "target_chunks")


def _gpu_tree_verify_greedy(sch):
    _gpu_argmax_rows(sch)
    _gpu_sequences(sch, "tree_greedy_walk")


def _gpu_tree_verify_sampling(sch):
    """A thread block per sequence walks its tree, every thread alike; each vocabulary loop is spread
    over the threads with the same split, so a thread reads only the law entries it wrote."""
    for name in ("law_from_p", "law_at_token", "residual", "residual_total", "law_from_residual"):
        for block in _blocks(sch, name):
            _spread_vocab(sch, block)
    sch.bind(_rows(sch, _block(sch, "tree_walk")), "blockIdx.x")
    final_law = _block(sch, "final_law")
    _spread_vocab(sch, final_law)
    sch.bind(_rows(sch, final_law), "blockIdx.x")
    _gpu_chunked_pick(sch, "law_chunks")


_GPU_SCHEDULES = {
    "sampling_probs": _gpu_sampling_probs,
    "sample_from_probs": lambda sch: _gpu_chunked_pick(sch, "chunks"),
    "argmax": _gpu_argmax_rows,
    "verify_greedy": _gpu_verify_greedy,
    "verify_sampling": _gpu_verify_sampling,
    "tree_verify_greedy": _gpu_tree_verify_greedy,
    "tree_verify_sampling": _gpu_tree_verify_sampling,
}
