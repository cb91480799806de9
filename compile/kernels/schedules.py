"""Schedules: llvm gets rows in parallel with vectorised elementwise loops; every other target gets
one thread block per row (or sequence) with the vocabulary loop spread over its threads."""

import re

from .common import CPU_VECTOR, GPU_THREADS


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


def _rows(sch, block):
    return sch.get_loops(block)[0]


def _vectorize_vocab(sch, block):
    _, lanes = sch.split(sch.get_loops(block)[-1], [None, CPU_VECTOR])
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


def cpu_sampling_probs(sch):
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


def cpu_rows_parallel(*block_names):
    def schedule(sch):
        blocks = [_block(sch, name) for name in block_names]
        for block in blocks:
            sch.parallel(_rows(sch, block))
        for block in blocks:
            if sch.get(block).init is not None:
                _hoist_init(sch, block, sch.get_loops(block)[-1])

    return schedule


def _spread_vocab(sch, block):
    _, threads = sch.split(sch.get_loops(block)[-1], [None, GPU_THREADS])
    sch.bind(threads, "threadIdx.x")


def gpu_sampling_probs(sch):
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


def gpu_argmax_rows(sch):
    row_argmax = _block(sch, "row_argmax")
    _spread_vocab(sch, row_argmax)
    sch.bind(_rows(sch, row_argmax), "blockIdx.x")
    # Its best-logit partner must share the token's (non-local) scope for the cross-thread reduction.
    sch.set_scope(row_argmax, 1, "shared")


def _gpu_sequences(sch, walk_name):
    blocks, threads = sch.split(_rows(sch, _block(sch, walk_name)), [None, GPU_THREADS])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")


def gpu_chunked_pick(sch, *chunk_names):
    pick = _block(sch, "pick")
    sch.bind(_rows(sch, pick), "blockIdx.x")
    for name in chunk_names:
        chunks = _block(sch, name)
        sch.bind(sch.get_loops(chunks)[1], "threadIdx.x")
        sch.set_scope(chunks, 0, "shared")
    # The pick stays unbound: every thread of the row repeats the short bucket scan in lockstep and
    # stores the same token (0.27 drops an extent-1 threadIdx binding without guarding the others).


def gpu_verify_greedy(sch):
    gpu_argmax_rows(sch)
    _gpu_sequences(sch, "greedy_walk")


def gpu_verify_sampling(sch):
    _gpu_sequences(sch, "accept_walk")
    gpu_chunked_pick(sch, "residual_chunks", "target_chunks")


def gpu_tree_verify_greedy(sch):
    gpu_argmax_rows(sch)
    _gpu_sequences(sch, "tree_greedy_walk")


def gpu_tree_verify_sampling(sch):
    """A thread block per sequence walks its tree, every thread alike; each vocabulary loop is spread
    over the threads with the same split, so a thread reads only the law entries it wrote."""
    for name in ("law_from_p", "law_at_token", "residual", "residual_total", "law_from_residual"):
        for block in _blocks(sch, name):
            _spread_vocab(sch, block)
    sch.bind(_rows(sch, _block(sch, "tree_walk")), "blockIdx.x")
    final_law = _block(sch, "final_law")
    _spread_vocab(sch, final_law)
    sch.bind(_rows(sch, final_law), "blockIdx.x")
    gpu_chunked_pick(sch, "law_chunks")


def gpu_sample_from_probs(sch):
    gpu_chunked_pick(sch, "chunks")
