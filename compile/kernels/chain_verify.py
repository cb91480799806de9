"""Chain verification: the longest accepted prefix of each sequence's drafts, then the target's next token."""

from tvm.script import tirx as T

from .common import CHUNKS, argmax_rows, chunk_masses, i64, inverse_cdf

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
        argmax_rows(logits, row_token, row_logit, r, v)
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
                    if draft[i64(first_draft + j)] == row_token[i64(first_row + j)]:
                        n = n + 1
            accepted[vs] = n
            next_token[vs] = row_token[i64(first_row + n)]


@T.macro
def _accept_walk(p, q, draft, indptr, u_accept, accepted, sample_row, reject_row, s, num_rows, num_drafts, batch, v):
    """Sequence s accepts its drafts in order while u * q(x) <= p(x); then the row the next token is drawn
    from, and the q row whose residual applies (-1: all drafts accepted)."""
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
                x: T.let[T.int32] = draft[i64(first_draft + j)]
                # An id outside the vocabulary has target probability 0: rejected, never read.
                if 0 <= x and i64(x) < v:
                    p_x: T.let[T.float32] = p[i64(first_row + j), i64(x)]  # "target" is reserved in WGSL
                    q_x: T.let[T.float32] = q[i64(first_draft + j), i64(x)]
                    if p_x > T.float32(0):
                        if u_accept[i64(first_draft + j)] * q_x <= p_x:
                            n = n + 1
        accepted[vs] = n
        sample_row[vs] = first_row + n
        reject_row[vs] = T.Select(n < num, first_draft + n, -1)


@T.macro
def _pick_next(p, q, sample_row, reject_row, residual_mass, target_mass, u_sample, next_token, s, num_rows,
               num_drafts, batch, v):
    """next_token[s] drawn from the residual norm(max(0, p - q)) after a rejection, else from p."""
    with T.sblock("pick"):
        vs = T.axis.spatial(batch, s)
        T.reads(
            p[0:num_rows, 0:v],
            q[0:num_drafts, 0:v],
            sample_row[vs],
            reject_row[vs],
            residual_mass[vs, 0:CHUNKS],
            target_mass[vs, 0:CHUNKS],
            u_sample[vs],
        )
        T.writes(next_token[vs])
        residual_total: T.float32 = T.float32(0)
        for c in range(T.int64(CHUNKS)):
            residual_total = residual_total + residual_mass[vs, c]
        row: T.let[T.int64] = i64(sample_row[vs])
        if residual_total > T.float32(0):
            inverse_cdf(p, q, row, reject_row[vs], residual_mass, vs, u_sample[vs], next_token, v)
        else:
            # p == q up to rounding: the residual is empty, and p itself is the right law.
            inverse_cdf(p, q, row, None, target_mass, vs, u_sample[vs], next_token, v)


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
    sample_row = T.sblock_alloc_buffer((batch,), "int32")
    reject_row = T.sblock_alloc_buffer((batch,), "int32")
    residual_mass = T.sblock_alloc_buffer((batch, CHUNKS), "float32")
    target_mass = T.sblock_alloc_buffer((batch, CHUNKS), "float32")
    for s in range(batch):
        _accept_walk(p, q, draft, indptr, u_accept, accepted, sample_row, reject_row, s, num_rows, num_drafts,
                     batch, v)  # fmt: skip
    for s in range(batch):
        chunk_masses("residual_chunks", residual_mass, p, q, sample_row, reject_row, s, v)
        chunk_masses("target_chunks", target_mass, p, q, sample_row, None, s, v)
        _pick_next(p, q, sample_row, reject_row, residual_mass, target_mass, u_sample, next_token, s, num_rows,
                   num_drafts, batch, v)  # fmt: skip
