"""Token-tree verification.

Sequence b owns nodes indptr[b] .. indptr[b+1]-1, node 0 of each its root (the last committed token),
parents[] local to the sequence (-1 at the root) and smaller than the node's own index (TVM's tree
attention order). Every array is indexed by node: logits/p are the target's rows at each node, q the
draft's distribution at each node (the one its children were drawn from; unused at leaves), u_accept the
acceptance uniform of each node (unused at roots). Both kernels return the deepest accepted node (local
index, 0 when nothing is accepted) and the token that follows it.
"""

from tvm.script import tirx as T

from .common import CHUNKS, argmax_rows, draw_row, i64

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
        argmax_rows(logits, row_token, row_logit, r, v)
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
                if parents[i64(first + j)] == node and j > 0:
                    if tokens[i64(first + j)] == row_token[i64(first + node)]:
                        node = j
            leaf[vs] = node
            next_token[vs] = row_token[i64(first + node)]


@T.macro
def _walk_tree(p, q, tokens, parents, indptr, u_accept, leaf, rejections, rest_used, total_got, s, num_nodes, batch, v):
    """Sequence s's walk down its tree: leaf[s] = the deepest accepted node, and what the emitted
    token's law needs, for _final_law to replay: the rejections at the leaf (0 where none, or where the
    residual emptied and p is the law) with each one's rest and total."""
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
        _law_from_p(current, p, vs, i64(first), v)
        for j in range(indptr[vs + 1] - first):
            if parents[i64(first + j)] == node[0] and j > 0:
                token[0] = tokens[i64(first + j)]
                _law_at(law_x, current, vs, token[0], v)
                # An id outside the vocabulary has law 0 (no y matched it): rejected, q never read.
                q_x[0] = T.if_then_else(
                    0 <= token[0] and i64(token[0]) < v,
                    q[i64(first + node[0]), i64(token[0])],
                    T.float32(0),
                )
                if law_x[0] > T.float32(0) and u_accept[i64(first + j)] * q_x[0] <= law_x[0] * rest[0]:
                    node[0] = j
                    rest[0] = T.float32(1)
                    total[0] = T.float32(1)
                    rejected[0] = 0
                    _law_from_p(current, p, vs, i64(first + node[0]), v)
                else:
                    _residual_step(current, residual, q, total, rest, vs, i64(first + node[0]), v)
                    rest_used[i64(first + rejected[0])] = rest[0]
                    total_got[i64(first + rejected[0])] = total[0]
                    rejected[0] = rejected[0] + 1
                    rest[0] = rest[0] - q_x[0]
        leaf[vs] = node[0]
        # p == q up to rounding emptied the residual: p itself is the right law, replayed from nothing.
        rejections[vs] = T.Select(total[0] > T.float32(0), rejected[0], 0)


@T.macro
def _final_law(law, p, q, indptr, leaf, rejections, rest_used, total_got, s, y, num_nodes, batch, v):
    """law[s] = the emitted token's law: the walk's residual steps at the leaf again, the same float
    operations in the same order, one vocabulary entry per iteration."""
    with T.sblock("final_law"):
        vs, vy = T.axis.remap("SS", [s, y])
        T.reads(
            indptr[vs], leaf[vs], rejections[vs], p[0:num_nodes, vy], q[0:num_nodes, vy],
            rest_used[0:num_nodes], total_got[0:num_nodes],
        )  # fmt: skip
        T.writes(law[vs, vy])
        first: T.let[T.int32] = indptr[vs]
        row: T.let[T.int64] = i64(first + leaf[vs])
        r: T.float32 = p[row, vy]
        for k in range(rejections[vs]):
            r = _next_residual(r, rest_used[i64(first + k)], q[row, vy], total_got[i64(first + k)])
        law[vs, vy] = r


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
    rejections = T.sblock_alloc_buffer((batch,), "int32")
    rest_used = T.sblock_alloc_buffer((num_nodes,), "float32")
    total_got = T.sblock_alloc_buffer((num_nodes,), "float32")
    law = T.sblock_alloc_buffer((batch, v), "float32")
    law_mass = T.sblock_alloc_buffer((batch, CHUNKS), "float32")
    for s in range(batch):
        _walk_tree(p, q, tokens, parents, indptr, u_accept, leaf, rejections, rest_used, total_got, s, num_nodes,
                   batch, v)  # fmt: skip
    for s, y in T.grid(batch, v):
        _final_law(law, p, q, indptr, leaf, rejections, rest_used, total_got, s, y, num_nodes, batch, v)
    for s in range(batch):
        draw_row("law_chunks", law, law_mass, u_sample, next_token, s, batch, v)
