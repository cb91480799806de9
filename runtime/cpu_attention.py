"""A CPU multi-token forward's attention in one pass, so that verifying a token is bit for bit decoding it.

TVM's paged KV cache computes the attention of a forward of several tokens per sequence in two calls
and merges them in float: the new tokens among themselves (the "ragged" slot, or the tree slot for a
token tree, given their keys and values), then against the pages cached before them (the "paged" slot,
given the pages). A decode attends to all its keys in one pass, and the merge's rounding is enough to
change a token of an int8-quantized model (compile/attention.py). A CPU library passes the functions
registered here in those slots. The first keeps the new tokens' keys and values and reports an empty
attention (zero, with log-sum-exp EMPTY_LSE, which the merge weighs exactly zero); the second runs the
library's chunk kernel over the pages and the kept keys at once. TVM calls them in that order, layer by
layer, and skips the second when no sequence has cached pages, where the first runs the kernel itself
over no pages (AttentionInternal in TVM's src/runtime/vm/paged_kv_cache.cc).

The kernel is the library's whose forward is running on the calling thread: ModelLibrary.call makes it
current there (TVM calls back on that thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import tvm

from ..interface.artifact import CPU_ATTENTION_CACHED_PAGES, CPU_ATTENTION_NEW_TOKENS, CPU_ATTENTION_NEW_TREE

EMPTY_LSE = -5e4  # compile/attention.py's: the log-sum-exp of no keys at all
PAGE_SIZE = 16  # compile/attention.py's KEYS: TVM's CPU kernels fix the page size


@dataclasses.dataclass
class NewKeys:
    """The chunk kernel's view of a forward's new tokens: its sequences' queries (q_indptr) and new
    keys (k, v, kv_indptr). A token tree's node is a sequence of its own (tree_nodes: how many each
    of TVM's sequences has), its new keys its ancestors' and its own."""
    q_indptr: object
    k: object
    v: object
    kv_indptr: object
    tree_nodes: np.ndarray | None = None


class ChunkAttention:
    """One library's chunk kernel, and the new keys of the layer being attended."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.new_keys: NewKeys | None = None

    def attend_new_tokens(self, q, q_indptr, k, v, kv_indptr, cached_lengths, output, lse, sm_scale):
        self._keep_or_attend(q, NewKeys(q_indptr, k, v, kv_indptr), cached_lengths, output, lse, sm_scale)

    def attend_new_tree(self, q, q_indptr, k, v, q_positions, tree_order, output, lse, sm_scale):
        q_indptr = q_indptr.numpy()
        cached_lengths = q_positions.numpy()[q_indptr[:-1]]  # each tree's root sits right after its cached tokens
        self._keep_or_attend(q, new_tree_keys(q_indptr, k, v, tree_order.numpy()), cached_lengths, output, lse,
                             sm_scale)

    def attend_cached_pages(self, q, pages, page_indptr, page_values, length_info, output, lse, sm_scale):
        new, self.new_keys = self.new_keys, None
        if new.tree_nodes is not None:
            page_indptr, page_values, length_info = pages_per_node(page_indptr.numpy(), page_values.numpy(),
                                                                   length_info.numpy(), new.tree_nodes, q.device)
        self.kernel(q, new.q_indptr, pages, page_indptr, page_values, length_info, new.k, new.v, new.kv_indptr, output,
                    lse, sm_scale)

    def _keep_or_attend(self, q, new: NewKeys, cached_lengths, output, lse, sm_scale):
        if np.any(cached_lengths):
            self.new_keys = new
            output.copyfrom(np.zeros(output.shape, output.dtype))
            lse.copyfrom(np.full(lse.shape, EMPTY_LSE, np.float32))
            return
        no_pages = _no_pages(new.k.shape[1], new.k.shape[2], new.k.dtype, new.q_indptr.shape[0] - 1, q.device)
        self.kernel(q, new.q_indptr, *no_pages, new.k, new.v, new.kv_indptr, output, lse, sm_scale)


def new_tree_keys(q_indptr: np.ndarray, k, v, tree_order: np.ndarray) -> NewKeys:
    """Each node of each tree as a sequence of one query whose new keys are those of its path from the
    root, itself last: what its decode would attend to after that path. tree_order holds TVM's
    depth-first interval of each node: j is on i's path when first[j] <= first[i] < end[j]."""
    rows, counts = [], []
    for start, stop in zip(q_indptr[:-1], q_indptr[1:]):
        first, end = tree_order[start:stop, 0], tree_order[start:stop, 1]
        on_path = (first[None, :] <= first[:, None]) & (first[:, None] < end[None, :])  # [node, ancestor]
        for node_path in on_path:
            path = np.flatnonzero(node_path)  # ancestors come before their descendants, so in depth order
            rows.append(start + path)
            counts.append(len(path))
    rows = np.concatenate(rows)
    device = k.device
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return NewKeys(tvm.runtime.tensor(np.arange(len(counts) + 1, dtype=np.int32), device),
                   tvm.runtime.tensor(k.numpy()[rows], device), tvm.runtime.tensor(v.numpy()[rows], device),
                   tvm.runtime.tensor(kv_indptr, device), tree_nodes=np.diff(q_indptr))


def pages_per_node(page_indptr: np.ndarray, page_values: np.ndarray, length_info: np.ndarray, nodes: np.ndarray,
                   device):
    """Each sequence's page table repeated for each of its tree's nodes."""
    tables = [page_values[page_indptr[b]:page_indptr[b + 1]] for b in range(len(nodes)) for _ in range(nodes[b])]
    indptr = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int32)
    values = np.concatenate(tables + [np.zeros(1, np.int32)]).astype(np.int32)  # never empty
    return (tvm.runtime.tensor(indptr, device), tvm.runtime.tensor(values, device),
            tvm.runtime.tensor(np.repeat(length_info, nodes).astype(np.int32), device))


_thread = threading.local()


@contextlib.contextmanager
def current(attention: ChunkAttention | None):
    """Make this library's chunk attention the one the cache's calls reach, for one forward."""
    previous = getattr(_thread, "attention", None)
    _thread.attention = attention
    try:
        yield
    finally:
        _thread.attention = previous


def _active() -> ChunkAttention:
    attention = getattr(_thread, "attention", None)
    if attention is None:
        raise RuntimeError("a CPU library's attention ran outside ModelLibrary.call")
    return attention


@tvm.register_global_func(CPU_ATTENTION_NEW_TOKENS, override=True)
def _new_tokens(q, q_indptr, k, v, kv_indptr, _q_positions, cached_lengths, output, lse, _causal, _rotary_mode,
                _rope_scale, _rope_theta, sm_scale):
    _active().attend_new_tokens(q, q_indptr, k, v, kv_indptr, cached_lengths.numpy(), output, lse, sm_scale)


@tvm.register_global_func(CPU_ATTENTION_NEW_TREE, override=True)
def _new_tree(q, q_indptr, k, v, _kv_indptr, q_positions, _mn_indptr, tree_order, output, lse, _rotary_mode,
              _rope_scale, _rope_theta, sm_scale):
    _active().attend_new_tree(q, q_indptr, k, v, q_positions, tree_order, output, lse, sm_scale)


@tvm.register_global_func(CPU_ATTENTION_CACHED_PAGES, override=True)
def _cached_pages(q, _q_indptr, pages, page_indptr, page_values, length_info, _k_rope_offset, _q_positions, output,
                  lse, _causal, _rotary_mode, _rope_scale, _rope_theta, sm_scale):
    _active().attend_cached_pages(q, pages, page_indptr, page_values, length_info, output, lse, sm_scale)


_NO_PAGES: dict = {}


def _no_pages(h_kv: int, d: int, dtype, batch: int, device) -> tuple:
    """An empty page table for `batch` sequences (one unused page, so every buffer has an element)."""
    key = (h_kv, d, str(dtype), batch, str(device))
    if key not in _NO_PAGES:
        zeros = np.zeros(batch + 1, np.int32)
        _NO_PAGES[key] = (tvm.runtime.tensor(np.zeros((1, 2, h_kv, PAGE_SIZE, d), str(dtype)), device),
                          tvm.runtime.tensor(zeros, device), tvm.runtime.tensor(zeros[:1], device),
                          tvm.runtime.tensor(zeros[:batch], device))
    return _NO_PAGES[key]
