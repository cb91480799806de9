"""A CPU multi-token forward's attention in one pass, so that verifying a token is bit for bit decoding it.

TVM's paged KV cache computes the attention of a forward of several tokens per sequence in two calls
and merges them in float: the new tokens among themselves (the "ragged" slot, or the tree slot for a
token tree, given their keys and values), then against the pages cached before them (the "paged" slot,
given the pages). A decode attends to all its keys in one pass, and the merge's rounding is enough to
change a token of an int8-quantized model (compile/attention.py). A CPU library passes the functions
registered here in those slots. The first keeps the new tokens' keys and values and the buffers TVM
gives it for the attention; the second runs the library's chunk kernel over the pages and the kept keys
at once, into those buffers, and reports an empty attention (zero, with log-sum-exp EMPTY_LSE) in its
own, which TVM then merges in: an empty attention weighs exactly zero. TVM calls them in that order,
layer by layer, and skips the second when no sequence has cached pages, where the first runs the kernel
itself over no pages (AttentionInternal in TVM's src/runtime/vm/paged_kv_cache.cc).

The kernel is the library's whose forward is running on the calling thread: ModelLibrary.call makes it
current there (TVM calls back on that thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import numpy as np
import tvm

from ..interface.artifact import (CPU_ATTENTION_CACHED_PAGES, CPU_ATTENTION_NEW_TOKENS, CPU_ATTENTION_NEW_TREE,
                                  CPU_PAGE_SIZE, EMPTY_LSE, FEW_QUERIES)
from .arrays import to_device, to_host


@dataclasses.dataclass
class Layout:
    """How a forward's new tokens map onto the chunk kernel's sequences, the same in every layer: their
    queries (q_indptr) and new keys (rows kv_rows[kv_indptr[b]..] of k and v). A token tree's node is
    a sequence of its own (tree_nodes: how many each of TVM's sequences has), its new keys those of its
    path from the root. cached: whether any sequence has cached pages (TVM then calls the second part);
    few: whether none has more than FEW_QUERIES queries (the kernel in small tiles then does less)."""
    q_indptr: object
    kv_rows: object
    kv_indptr: object
    cached: bool
    few: bool
    tree_nodes: np.ndarray | None = None
    node_pages: tuple | None = None  # each node's copy of its sequence's page table, once made
    reported_empty: bool = False  # whether the second part's buffers hold the empty attention yet


class ChunkAttention:
    """One library's chunk kernels; the layout of the forward running, and the new keys of its layer."""

    def __init__(self, kernel, few_queries_kernel):
        self.kernels = {False: kernel, True: few_queries_kernel}
        self.begin_forward()

    def begin_forward(self) -> None:
        self.layout: Layout | None = None
        self.kept = None  # the first part's new keys and values, and its output and lse buffers

    def attend_new_tokens(self, q, q_indptr, k, v, kv_indptr, cached_lengths, output, lse, sm_scale):
        if self.layout is None:
            few = np.diff(to_host(q_indptr)).max() <= FEW_QUERIES
            self.layout = Layout(q_indptr, _rows(k.shape[0], k.device), kv_indptr,
                                 bool(np.any(to_host(cached_lengths))), bool(few))
        self._keep_or_attend(q, k, v, output, lse, sm_scale)

    def attend_new_tree(self, q, q_indptr, k, v, q_positions, tree_order, output, lse, sm_scale):
        if self.layout is None:
            q_indptr = to_host(q_indptr)
            cached = np.any(to_host(q_positions)[q_indptr[:-1]])  # a tree's root sits right after its cached tokens
            self.layout = tree_layout(q_indptr, to_host(tree_order), bool(cached), k.device)
        self._keep_or_attend(q, k, v, output, lse, sm_scale)

    def attend_cached_pages(self, q, pages, page_indptr, page_values, length_info, output, lse, sm_scale):
        layout, (k, v, attention, attention_lse) = self.layout, self.kept
        self.kept = None
        tables = (page_indptr, page_values, length_info)
        if layout.tree_nodes is not None:
            if layout.node_pages is None:
                layout.node_pages = pages_per_node(*(to_host(t) for t in tables), layout.tree_nodes, q.device)
            tables = layout.node_pages
        self.kernels[layout.few](q, layout.q_indptr, pages, *tables, k, v, layout.kv_rows, layout.kv_indptr,
                                 attention, attention_lse, sm_scale)
        if not layout.reported_empty:
            # TVM's buffers for this part are the same in every layer of a forward and only this writes
            # them, so they are filled once a forward (two copies a layer cost 3.5 us of the 10 us the
            # first part took a layer, measured in a verify of 5 tokens).
            _filled(tuple(output.shape), str(output.dtype), 0.0, q.device).copyto(output)
            _filled(tuple(lse.shape), "float32", EMPTY_LSE, q.device).copyto(lse)
            layout.reported_empty = True

    def _keep_or_attend(self, q, k, v, output, lse, sm_scale):
        layout = self.layout
        if layout.cached:
            self.kept = (k, v, output, lse)
            return
        no_pages = _no_pages(k.shape[1], k.shape[2], str(k.dtype), layout.q_indptr.shape[0] - 1, q.device)
        self.kernels[layout.few](q, layout.q_indptr, *no_pages, k, v, layout.kv_rows, layout.kv_indptr, output, lse,
                                 sm_scale)


def tree_layout(q_indptr: np.ndarray, tree_order: np.ndarray, cached: bool, device) -> Layout:
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
    kv_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return Layout(to_device(np.arange(len(counts) + 1, dtype=np.int32), device),
                  to_device(np.concatenate(rows).astype(np.int32), device),
                  to_device(kv_indptr, device), cached, few=True, tree_nodes=np.diff(q_indptr))


def pages_per_node(page_indptr: np.ndarray, page_values: np.ndarray, length_info: np.ndarray, nodes: np.ndarray,
                   device) -> tuple:
    """Each sequence's page table repeated for each of its tree's nodes."""
    tables = [page_values[page_indptr[b]:page_indptr[b + 1]] for b in range(len(nodes)) for _ in range(nodes[b])]
    indptr = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int32)
    values = np.concatenate(tables + [np.zeros(1, np.int32)]).astype(np.int32)  # never empty
    return (to_device(indptr, device), to_device(values, device),
            to_device(np.repeat(length_info, nodes).astype(np.int32), device))


_thread = threading.local()


@contextlib.contextmanager
def current(attention: ChunkAttention | None):
    """Make this library's chunk attention the one the cache's calls reach, for one forward."""
    previous = getattr(_thread, "attention", None)
    if attention is not None:
        attention.begin_forward()
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
    _active().attend_new_tokens(q, q_indptr, k, v, kv_indptr, cached_lengths, output, lse, sm_scale)


@tvm.register_global_func(CPU_ATTENTION_NEW_TREE, override=True)
def _new_tree(q, q_indptr, k, v, _kv_indptr, q_positions, _mn_indptr, tree_order, output, lse, _rotary_mode,
              _rope_scale, _rope_theta, sm_scale):
    _active().attend_new_tree(q, q_indptr, k, v, q_positions, tree_order, output, lse, sm_scale)


@tvm.register_global_func(CPU_ATTENTION_CACHED_PAGES, override=True)
def _cached_pages(q, _q_indptr, pages, page_indptr, page_values, length_info, _k_rope_offset, _q_positions, output,
                  lse, _causal, _rotary_mode, _rope_scale, _rope_theta, sm_scale):
    _active().attend_cached_pages(q, pages, page_indptr, page_values, length_info, output, lse, sm_scale)


@functools.lru_cache(maxsize=16)  # a verify's few shapes, and the last prefill chunks'
def _filled(shape, dtype, value, device):
    return to_device(np.full(shape, value, dtype), device)


@functools.lru_cache(maxsize=16)  # a verify's few sizes, and the last prefill chunks'
def _rows(n: int, device) -> tvm.runtime.Tensor:
    """0 .. n-1: a chain's new keys are its k and v rows in order."""
    return to_device(np.arange(n, dtype=np.int32), device)


@functools.cache  # one per library shape and batch size
def _no_pages(h_kv: int, d: int, dtype: str, batch: int, device) -> tuple:
    """An empty page table for `batch` sequences (one unused page, so every buffer has an element)."""
    zeros = np.zeros(batch + 1, np.int32)
    pages = np.zeros((1, 2, h_kv, CPU_PAGE_SIZE, d), dtype)
    return tuple(to_device(a, device) for a in (pages, zeros, zeros[:1], zeros[:batch]))
