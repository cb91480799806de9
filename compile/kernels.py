"""TensorIR kernels for sampling and exact speculative verification.

Every kernel takes a symbolic row count and a symbolic vocabulary size V, float32 probabilities or
logits and int32 token ids; outputs are passed last (destination-passing style):

    sampling_probs(logits[n,V], temperature[n], top_k[n], top_p[n], probs[n,V])
    sample_from_probs(probs[n,V], u[n], tokens[n])
    argmax(logits[n,V], tokens[n])
    verify_greedy(logits[Np,V], draft[Nq], indptr[B+1], accepted[B], next_token[B])
    verify_sampling(p[Np,V], q[Nq,V], draft[Nq], indptr[B+1], u_accept[Nq], u_sample[B],
                    accepted[B], next_token[B])

Sequence b of a verify batch owns target rows indptr[b] .. indptr[b+1]-1 (its k_b drafts plus one bonus
row) and draft slots indptr[b]-b .. indptr[b]-b+k_b-1, so Nq = Np - B. The numpy reference in
tests/test_kernels.py is the executable specification.

Each kernel is written once as block-based TIR (`kernel(name)`) and scheduled per target
(`scheduled_kernels(target)`): llvm gets rows in parallel with vectorised elementwise loops, every other
target gets one thread block per row (or sequence) with the vocabulary loop spread over its threads.
"""

import re

import tvm
from tvm import s_tir
from tvm.script import tirx as T

KERNEL_NAMES = ("sampling_probs", "sample_from_probs", "argmax", "verify_greedy", "verify_sampling")

# Softmax numerators exp((l - max) / t) lie in [0, 1], and non-negative floats order like their int32
# bit patterns, so a threshold is found by bisecting the integers 0 .. bits(1.0).
_ONE_BITS = 0x3F800000
_BISECT_STEPS = 30  # 2**30 > _ONE_BITS + 1: thirty halvings leave one bit pattern
# The inverse CDF first picks one of _CHUNKS contiguous buckets of a row, then a token inside it; on GPU
# each thread sums one bucket, so both sequential scans are about V / _CHUNKS + _CHUNKS long.
_CHUNKS = 256
_GPU_THREADS = 256
_CPU_LANES = 8


def _chunk_len(v):
    return T.ceildiv(v, T.int64(_CHUNKS))


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
            # Ties go to the lower index in any combining order, so a split reduction matches numpy.
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


def _weight(p, q, row, qrow, x):
    """p[row, x], or the residual max(0, p - q) where qrow >= 0 names the rejecting draft's q row."""
    if qrow is None:
        return p[row, x]
    return T.if_then_else(
        qrow >= 0, T.max(p[row, x] - q[_i64(qrow), x], T.float32(0)), p[row, x]
    )


def _row(rows, s):
    return s if rows is None else _i64(rows[s])


def _draft_row(rows, s):
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
    target: T.float32 = u * total
    chunk: T.int32 = -1
    last_chunk: T.int32 = 0
    below: T.float32 = T.float32(0)
    for c in range(T.int64(_CHUNKS)):
        # Bound first: 0.27's thread-sync analysis rejects shared-memory loads inside if conditions.
        m: T.let[T.float32] = mass[s, c]
        if m > T.float32(0):
            last_chunk = T.Cast("int32", c)
        if chunk < 0:
            if below + m > target:
                chunk = T.Cast("int32", c)
            else:
                below = below + m
    if chunk < 0:
        chunk = last_chunk
        target = T.max_value("float32")
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
                if run > target:
                    token = T.Cast("int32", x)
    out[s] = T.Select(token >= 0, token, last_positive)


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
    # Kept apart from probs so that no block rewrites what it reads (schedulable dataflow).
    numer = T.sblock_alloc_buffer((n, v), "float32")
    top_k_bits = T.sblock_alloc_buffer((n,), "int32")
    keep_bits = T.sblock_alloc_buffer((n,), "int32")
    kept_total = T.sblock_alloc_buffer((n,), "float32")
    for r in range(n):
        for x in range(v):
            with T.sblock("row_max"):
                vr, vx = T.axis.remap("SR", [r, x])
                with T.init():
                    row_max[vr] = T.min_value("float32")
                row_max[vr] = T.max(row_max[vr], logits[vr, vx])
        for x in range(v):
            with T.sblock("numerator"):
                vr, vx = T.axis.remap("SS", [r, x])
                numer[vr, vx] = T.exp((logits[vr, vx] - row_max[vr]) / temperature[vr])
        with T.sblock("top_k_threshold"):
            # Largest t with count{x: numer(x) >= t} >= top_k: the k-th largest value, ties included.
            vr = T.axis.spatial(n, r)
            T.reads(numer[vr, 0:v], top_k[vr])
            T.writes(top_k_bits[vr])
            # Per-thread state: on GPU every thread updates its own copy from the broadcast count.
            lo = T.sblock_alloc_buffer((1,), "int32", scope="local")
            hi = T.sblock_alloc_buffer((1,), "int32", scope="local")
            count = T.sblock_alloc_buffer((1,), "int32", scope="local")
            lo[0] = 0
            hi[0] = T.Select(0 < top_k[vr] and _i64(top_k[vr]) < v, _ONE_BITS + 1, 1)
            for _ in range(_BISECT_STEPS):
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
        with T.sblock("top_p_threshold"):
            # Largest t >= top-k threshold whose kept mass still reaches top_p of the top-k mass:
            # exactly the tokens whose strictly-more-probable mass is below top_p, ties included.
            vr = T.axis.spatial(n, r)
            T.reads(numer[vr, 0:v], top_k_bits[vr], top_p[vr])
            T.writes(keep_bits[vr])
            lo = T.sblock_alloc_buffer((1,), "int32", scope="local")
            hi = T.sblock_alloc_buffer((1,), "int32", scope="local")
            top_k_mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
            mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
            for x in range(v):
                with T.sblock("top_k_mass"):
                    vx = T.axis.reduce(v, x)
                    T.reads(numer[vr, vx], top_k_bits[vr])
                    T.writes(top_k_mass[0])
                    with T.init():
                        top_k_mass[0] = T.float32(0)
                    top_k_mass[0] = top_k_mass[0] + T.Select(
                        numer[vr, vx] >= _as_float(top_k_bits[vr]), numer[vr, vx], T.float32(0)
                    )
            lo[0] = top_k_bits[vr]
            hi[0] = T.Select(top_p[vr] < T.float32(1), _ONE_BITS + 1, top_k_bits[vr] + 1)
            for _ in range(_BISECT_STEPS):
                for x in range(v):
                    with T.sblock("mass_at_least"):
                        vx = T.axis.reduce(v, x)
                        T.reads(numer[vr, vx], lo[0], hi[0])
                        T.writes(mass[0])
                        with T.init():
                            mass[0] = T.float32(0)
                        mass[0] = mass[0] + T.Select(
                            numer[vr, vx] >= _as_float((lo[0] + hi[0]) // 2),
                            numer[vr, vx],
                            T.float32(0),
                        )
                with T.sblock("top_p_step"):
                    if mass[0] >= top_p[vr] * top_k_mass[0]:
                        lo[0] = (lo[0] + hi[0]) // 2
                    else:
                        hi[0] = (lo[0] + hi[0]) // 2
            keep_bits[vr] = lo[0]
    for r, x in T.grid(n, v):
        with T.sblock("kept_total"):
            vr, vx = T.axis.remap("SR", [r, x])
            with T.init():
                kept_total[vr] = T.float32(0)
            kept_total[vr] = kept_total[vr] + T.Select(
                numer[vr, vx] >= _as_float(keep_bits[vr]), numer[vr, vx], T.float32(0)
            )
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
                        target: T.let[T.float32] = p[_i64(first_row + j), _i64(x)]
                        if target > T.float32(0):
                            if u_accept[_i64(first_draft + j)] * q[_i64(first_draft + j), _i64(x)] <= target:
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


_KERNELS = {
    "sampling_probs": sampling_probs,
    "sample_from_probs": sample_from_probs,
    "argmax": argmax,
    "verify_greedy": verify_greedy,
    "verify_sampling": verify_sampling,
}


def kernel(name: str) -> tvm.tirx.PrimFunc:
    """The unscheduled block-based PrimFunc; the caller gives it its symbol."""
    # A fresh copy each time: 0.27's s_tir.Schedule rewrites the PrimFunc it is given in place.
    return s_tir.renew_defs(_KERNELS[name]).without_attr("global_symbol")


# ---------------------------------------------------------------------------------------------------
# Schedules


def _block(sch, name):
    # TVMScript numbers the blocks of a macro's later expansions (row_argmax_1, ...).
    (match,) = [b for b in _all_blocks(sch) if re.fullmatch(name + r"(_\d+)?", sch.get(b).name_hint)]
    return match


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
        scheduled[name] = sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})
    return scheduled


def _rows(sch, block):
    return sch.get_loops(block)[0]


def _vectorize_vocab(sch, block):
    _, lanes = sch.split(sch.get_loops(block)[-1], [None, _CPU_LANES])
    sch.vectorize(lanes)


def _sum_in_lanes(sch, block):
    # Lane-wise partial sums: each float32 partial adds V / lanes terms instead of V, which keeps the
    # normaliser as accurate as the GPU's per-thread partials.
    _, lanes = sch.split(sch.get_loops(block)[-1], [None, _GPU_THREADS])
    partial = sch.rfactor(lanes, 1)
    rows, steps = sch.get_loops(partial)[:2]
    sch.parallel(rows)
    _vectorize_vocab(sch, partial)
    # 0.27's rfactor initialises a lane under the split's tail predicate, leaving lanes past V unset.
    sch.decompose_reduction(partial, steps)
    sch.parallel(_rows(sch, block))


def _cpu_sampling_probs(sch):
    sch.parallel(_rows(sch, _block(sch, "row_max")))
    _vectorize_vocab(sch, _block(sch, "numerator"))
    _sum_in_lanes(sch, _block(sch, "kept_total"))
    normalize = _block(sch, "normalize")
    sch.parallel(_rows(sch, normalize))
    _vectorize_vocab(sch, normalize)


def _cpu_rows_parallel(*block_names):
    def schedule(sch):
        for name in block_names:
            sch.parallel(_rows(sch, _block(sch, name)))

    return schedule


_CPU_SCHEDULES = {
    "sampling_probs": _cpu_sampling_probs,
    "sample_from_probs": _cpu_rows_parallel("chunks"),
    "argmax": _cpu_rows_parallel("row_argmax"),
    "verify_greedy": _cpu_rows_parallel("row_argmax", "greedy_walk"),
    "verify_sampling": _cpu_rows_parallel("accept_walk", "pick"),
}


def _spread_vocab(sch, block):
    _, threads = sch.split(sch.get_loops(block)[-1], [None, _GPU_THREADS])
    sch.bind(threads, "threadIdx.x")


def _gpu_sampling_probs(sch):
    for name in ("row_max", "numerator", "count_at_least", "top_k_mass", "mass_at_least"):
        _spread_vocab(sch, _block(sch, name))
    sch.bind(_rows(sch, _block(sch, "row_max")), "blockIdx.x")
    # Row scalars stay per thread; only the thresholds and numerators cross to the second kernel.
    sch.set_scope(_block(sch, "row_max"), 0, "local")
    sch.set_scope(_block(sch, "top_k_threshold"), 0, "local")
    kept_total, normalize = _block(sch, "kept_total"), _block(sch, "normalize")
    sch.compute_at(kept_total, _rows(sch, normalize))
    sch.set_scope(kept_total, 0, "local")
    _spread_vocab(sch, kept_total)
    _spread_vocab(sch, normalize)
    sch.bind(_rows(sch, normalize), "blockIdx.x")


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


_GPU_SCHEDULES = {
    "sampling_probs": _gpu_sampling_probs,
    "sample_from_probs": lambda sch: _gpu_chunked_pick(sch, "chunks"),
    "argmax": _gpu_argmax_rows,
    "verify_greedy": _gpu_verify_greedy,
    "verify_sampling": _gpu_verify_sampling,
}
