"""TIR shared by the kernels: constants, index helpers, row argmax and inverse-CDF sampling."""

from tvm.script import tirx as T

GPU_THREADS = 256
CPU_VECTOR = 8
# Float sums over a row run in LANES independent partials (one per GPU thread, vectors on CPU): a
# compiler may not reorder a single float accumulator, and V / LANES terms per partial round less.
LANES = GPU_THREADS
# The inverse CDF first picks one of CHUNKS contiguous buckets of a row, then a token inside it; each
# GPU thread sums one bucket, so the sequential scans are only CHUNKS + V / CHUNKS long.
CHUNKS = GPU_THREADS


def chunk_len(v):
    return T.ceildiv(v, T.int64(CHUNKS))


def padded(v):
    return T.ceildiv(v, T.int64(LANES)) * T.int64(LANES)


def as_float(bits):
    return T.reinterpret("float32", bits)


def i64(value):
    return T.Cast("int64", value)



@T.macro
def argmax_rows(logits, best_token, best_logit, r, v):
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



def _weight(p, q, row, qrow, x):
    """p[row, x], or the residual max(0, p - q) where qrow >= 0 names the rejecting draft's q row."""
    if qrow is None:
        return p[row, x]
    return T.if_then_else(
        qrow >= 0, T.max(p[row, x] - q[i64(qrow), x], T.float32(0)), p[row, x]
    )


def _row(rows, s):
    """The p row of slot s: rows[s], or s itself when the kernel has no row map."""
    return s if rows is None else i64(rows[s])


def _draft_row(rows, s):
    """The q row of slot s (-1: none), or None when the weights are plain p rows."""
    return None if rows is None else rows[s]


@T.macro
def chunk_masses(name, mass, p, q, prow, qrow, s, v):
    """mass[s, c] = the weight of bucket c; rows come from prow/qrow[s], or are s itself if None."""
    for c, i in T.grid(T.int64(CHUNKS), chunk_len(v)):
        with T.sblock(name):
            vs, vc, vi = T.axis.remap("SSR", [s, c, i])
            T.reads(p[0 : p.shape[0], 0:v], q[0 : q.shape[0], 0:v])
            T.writes(mass[vs, vc])
            with T.init():
                mass[vs, vc] = T.float32(0)
            x: T.let[T.int64] = vc * chunk_len(v) + vi
            if x < v:
                mass[vs, vc] = mass[vs, vc] + _weight(
                    p, q, _row(prow, vs), _draft_row(qrow, vs), x
                )


@T.macro
def inverse_cdf(p, q, row, qrow, mass, s, u, out, v):
    """out[s] = smallest x with cumsum(w)[x] > u * sum(w), w the weights summarised by mass[s, :].

    If rounding leaves no such x, the last x with w(x) > 0; a row without positive weight gives 0.
    Token and bucket scalars are int32: WebGPU narrows every index to 32 bits and refuses int64 ones.
    """
    total: T.float32 = T.float32(0)
    for c in range(T.int64(CHUNKS)):
        total = total + mass[s, c]
    goal: T.float32 = u * total
    chunk: T.int32 = -1
    last_chunk: T.int32 = 0
    below: T.float32 = T.float32(0)
    for c in range(T.int64(CHUNKS)):
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
    for i in range(chunk_len(v)):
        x: T.let[T.int64] = i64(chunk) * chunk_len(v) + i
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
def draw_row(chunks_name, probs, mass, u, out, s, rows, v):
    """out[s] = a draw from row s of probs by its uniform u[s] (the inverse CDF over its buckets)."""
    chunk_masses(chunks_name, mass, probs, probs, None, None, s, v)
    with T.sblock("pick"):
        vs = T.axis.spatial(rows, s)
        T.reads(probs[vs, 0:v], mass[vs, 0:CHUNKS], u[vs])
        T.writes(out[vs])
        inverse_cdf(probs, probs, vs, None, mass, vs, u[vs], out, v)
