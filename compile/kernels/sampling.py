"""Sampling kernels: temperature, top-k and top-p applied to logits, inverse-CDF draws, argmax."""

from tvm.script import tirx as T

from .common import CHUNKS, LANES, argmax_rows, as_float, draw_row, i64, padded

# Softmax numerators exp((l - max) / t) lie in [0, 1], and non-negative floats order like their int32
# bit patterns, so a threshold is found by bisecting the integers 0 .. bits(1.0).
ONE_BITS = 0x3F800000
BISECT_STEPS = 30  # 2**30 > ONE_BITS + 1: thirty halvings leave one bit pattern


@T.macro
def _mass_at_least(lanes_name, name, mass, lane_mass, numer, r, threshold, v):
    """mass[0] = the sum of the numerators numer[r, x] >= threshold, in LANES independent partials."""
    for lane, step in T.grid(T.int64(LANES), T.ceildiv(v, T.int64(LANES))):
        with T.sblock(lanes_name):
            vl, vs = T.axis.remap("SR", [lane, step])
            with T.init():
                lane_mass[vl] = T.float32(0)
            lane_mass[vl] = lane_mass[vl] + T.Select(
                numer[r, vs * LANES + vl] >= threshold, numer[r, vs * LANES + vl], T.float32(0)
            )
    for lane in range(T.int64(LANES)):
        with T.sblock(name):
            vl = T.axis.reduce(T.int64(LANES), lane)
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



@T.macro
def _numerators(logits, temperature, row_max, numer, r, v):
    """numer[r, x] = exp((logits[r, x] - max) / temperature), zero in the padding past V."""
    for x in range(v):
        with T.sblock("row_max"):
            vr, vx = T.axis.remap("SR", [r, x])
            with T.init():
                row_max[vr] = T.min_value("float32")
            row_max[vr] = T.max(row_max[vr], logits[vr, vx])
    for x in range(padded(v)):
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
        T.reads(numer[vr, 0 : padded(v)], top_k[vr])
        T.writes(top_k_bits[vr])
        # Per-thread state: on GPU every thread updates its own copy from the broadcast count.
        lo = T.sblock_alloc_buffer((1,), "int32", scope="local")
        hi = T.sblock_alloc_buffer((1,), "int32", scope="local")
        count = T.sblock_alloc_buffer((1,), "int32", scope="local")
        lo[0] = 0
        hi[0] = T.Select(0 < top_k[vr] and i64(top_k[vr]) < v, ONE_BITS + 1, 1)
        if lo[0] + 1 < hi[0]:  # else the filter is off: [lo, hi) already holds one pattern
            for step in range(BISECT_STEPS):  # a named loop: WGSL refuses TVM's "__1" for "_"
                for x in range(v):
                    with T.sblock("count_at_least"):
                        vx = T.axis.reduce(v, x)
                        T.reads(numer[vr, vx], lo[0], hi[0])
                        T.writes(count[0])
                        with T.init():
                            count[0] = 0
                        count[0] = count[0] + T.Select(
                            numer[vr, vx] >= as_float((lo[0] + hi[0]) // 2), 1, 0
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
        T.reads(numer[vr, 0 : padded(v)], top_k_bits[vr], top_p[vr])
        T.writes(keep_bits[vr])
        lo = T.sblock_alloc_buffer((1,), "int32", scope="local")
        hi = T.sblock_alloc_buffer((1,), "int32", scope="local")
        top_k_mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
        mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
        top_k_lane_mass = T.sblock_alloc_buffer((LANES,), "float32", scope="local")
        lane_mass = T.sblock_alloc_buffer((LANES,), "float32", scope="local")
        lo[0] = top_k_bits[vr]
        hi[0] = T.Select(top_p[vr] < T.float32(1), ONE_BITS + 1, top_k_bits[vr] + 1)
        if lo[0] + 1 < hi[0]:
            _mass_at_least(
                "top_k_lanes", "top_k_mass", top_k_mass, top_k_lane_mass, numer, vr,
                as_float(top_k_bits[vr]), v,
            )  # fmt: skip
            for step in range(BISECT_STEPS):  # a named loop: WGSL refuses TVM's "__1" for "_"
                _mass_at_least(
                    "lanes_at_least", "mass_at_least", mass, lane_mass, numer, vr,
                    as_float((lo[0] + hi[0]) // 2), v,
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
    for r, lane, step in T.grid(n, T.int64(LANES), T.ceildiv(v, T.int64(LANES))):
        with T.sblock("kept_lanes"):
            vr, vl, vs = T.axis.remap("SSR", [r, lane, step])
            with T.init():
                lane_sum[vr, vl] = T.float32(0)
                lane_err[vr, vl] = T.float32(0)
            x: T.let[T.int64] = vs * LANES + vl
            _compensated_add(
                lane_sum, lane_err, (vr, vl),
                T.Select(numer[vr, x] >= as_float(keep_bits[vr]), numer[vr, x], T.float32(0)),
            )  # fmt: skip
    for r in range(n):
        with T.sblock("kept_total"):
            vr = T.axis.spatial(n, r)
            T.reads(lane_sum[vr, 0:LANES], lane_err[vr, 0:LANES])
            T.writes(kept_total[vr])
            total = T.sblock_alloc_buffer((1,), "float32", scope="local")
            err = T.sblock_alloc_buffer((1,), "float32", scope="local")
            total[0] = T.float32(0)
            err[0] = T.float32(0)
            for lane in range(T.int64(LANES)):
                _compensated_add(total, err, (0,), lane_sum[vr, lane] - lane_err[vr, lane])
            kept_total[vr] = total[0]



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
    numer = T.sblock_alloc_buffer((n, padded(v)), "float32")
    top_k_bits = T.sblock_alloc_buffer((n,), "int32")
    keep_bits = T.sblock_alloc_buffer((n,), "int32")
    lane_sum = T.sblock_alloc_buffer((n, LANES), "float32")
    lane_err = T.sblock_alloc_buffer((n, LANES), "float32")
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
                numer[vr, vx] >= as_float(keep_bits[vr]),
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
    chunk_mass = T.sblock_alloc_buffer((n, CHUNKS), "float32")
    for r in range(n):
        draw_row("chunks", probs, chunk_mass, u, tokens, r, n, v)


@T.prim_func(s_tir=True)
def argmax(var_logits: T.handle, var_tokens: T.handle):
    T.func_attr({"tirx.noalias": True})
    n, v = T.int64(), T.int64()
    logits = T.match_buffer(var_logits, (n, v), "float32")
    tokens = T.match_buffer(var_tokens, (n,), "int32")
    best_logit = T.sblock_alloc_buffer((n,), "float32")
    for r in range(n):
        argmax_rows(logits, tokens, best_logit, r, v)

