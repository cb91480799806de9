"""The paged KV cache of one model, through TVM's vm.builtin.* functions.

Every forward is begin_forward -> the model call -> end_forward. begin_forward grows the sequences at
once, so a forward that fails midway is rolled back here with popn: the cache never keeps tokens the
runtime does not know about.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import tvm
from tvm.runtime import ShapeTuple

_f = tvm.get_global_func
_add_sequence = _f("vm.builtin.kv_state_add_sequence")
_remove_sequence = _f("vm.builtin.kv_state_remove_sequence")
_popn = _f("vm.builtin.kv_state_popn")
_begin_forward = _f("vm.builtin.kv_state_begin_forward")
_end_forward = _f("vm.builtin.kv_state_end_forward")
_sequence_length = _f("vm.builtin.attention_kv_cache_get_sequence_length")
_available_pages = _f("vm.builtin.attention_kv_cache_get_num_available_pages")
_commit_tree = _f("vm.builtin.attention_kv_cache_commit_accepted_token_tree_nodes")


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class CacheFullError(RuntimeError):
    """The KV cache cannot hold the tokens asked for."""


class PagedKVCache:
    def __init__(self, handle, *, page_size: int, max_batch_size: int):
        self.handle = handle
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.total_pages = self.available_pages()
        self._live: set[int] = set()
        self._uncommitted_tree: list[int] = []  # the sequences of a tree forward not yet committed

    def add_sequence(self, seq_id: int) -> None:
        if len(self._live) >= self.max_batch_size:
            raise CacheFullError(f"the KV cache holds at most {self.max_batch_size} sequences; "
                                 "drop a conversation or create the engine with a larger max_batch_size")
        _add_sequence(self.handle, seq_id)
        self._live.add(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        _remove_sequence(self.handle, seq_id)
        self._live.discard(seq_id)

    @property
    def sequences(self) -> frozenset[int]:
        return frozenset(self._live)

    def length(self, seq_id: int) -> int:
        return int(_sequence_length(self.handle, seq_id))

    def popn(self, seq_id: int, n: int) -> None:
        if n > 0:
            _popn(self.handle, seq_id, n)

    def available_pages(self) -> int:
        return int(_available_pages(self.handle))

    def pages_needed(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> int:
        return sum(pages_for(self.length(s) + n, self.page_size) - pages_for(self.length(s), self.page_size)
                   for s, n in zip(seq_ids, lengths))

    @contextlib.contextmanager
    def forward(self, seq_ids: Sequence[int], lengths: Sequence[int], tree_parents: Sequence[int] | None = None):
        """Bracket one model call over these sequences; undone if the call raises."""
        if self.pages_needed(seq_ids, lengths) > self.available_pages():
            raise CacheFullError(f"the KV cache is out of pages ({self.total_pages} pages of {self.page_size} tokens); "
                                 "shorten the prompt or max_tokens, or raise max_seq_len")
        args = [self.handle, ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths))]
        if tree_parents is not None:
            args.append(ShapeTuple(list(tree_parents)))
        _begin_forward(*args)
        if tree_parents is not None:
            self._uncommitted_tree = list(seq_ids)
        completed = False
        try:
            yield
            completed = True
        finally:
            _end_forward(self.handle)
            if not completed and tree_parents is not None:
                self.discard_tree()
            elif not completed:
                for seq_id, n in zip(seq_ids, lengths):
                    _popn(self.handle, seq_id, n)

    def commit_tree(self, seq_ids: Sequence[int], leaves: Sequence[int]) -> None:
        """Keep each sequence's root->leaf path of the last tree forward, drop the rest of it. Due after
        every tree forward, before the next forward: TVM refuses one while a tree is uncommitted."""
        _commit_tree(self.handle, ShapeTuple(list(seq_ids)), ShapeTuple([int(leaf) for leaf in leaves]))
        self._uncommitted_tree = []

    def discard_tree(self) -> None:
        """Drop the whole of an uncommitted tree forward (leaf -1: no node kept); a no-op when there is
        none, so cleanup may call it whatever happened (a second drop would pop committed tokens)."""
        if self._uncommitted_tree:
            self.commit_tree(self._uncommitted_tree, [-1] * len(self._uncommitted_tree))
