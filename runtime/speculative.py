"""One round of exact speculative decoding over a batch of sequences, and the cache bookkeeping.

A round, for every sequence at once (gpt-fast's shape):
  1. draft:  the draft model catches up on the committed tokens it lacks, then proposes k tokens;
  2. verify: one forward of the target over [last, d1..dk] gives k+1 rows of logits;
  3. decide: the verification kernel returns how many drafts are accepted and the target's next token;
  4. commit: accepted drafts plus that token join the sequence; both caches are cut back to the
     committed tokens (all but the newest, which is fed next round).
Invariant between rounds: each cache holds a prefix of the sequence's committed tokens and never more
than all but the last; the target holds exactly all but the last. With k = 0 the same code is plain
target decoding, so speculative and target-only runs share every kernel that decides a token.

A token tree (DraftTree, FeatureTree) replaces the chain with a tree of depth k rooted at the last
committed token; the target verifies it in one tree-attention forward, the tree kernels pick the
accepted root->leaf path, and commit_tree keeps exactly that path in the target's cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .arrays import to_host
from .kv_cache import PagedKVCache
from .library import ModelLibrary

MAX_TREE_NODES = 256  # TVM's tree attention limit, root included
# ChainStop's default threshold: on held-out replies the default pair's feature draft is accepted 0.18
# of the time at a top probability of 0.1-0.2 and 0.96 at 0.9-1; stopping chains where the cumulative
# probability falls below 0.2 gave the most tokens per second in a model of its measured costs.
DRAFT_CONFIDENCE = 0.2


def tree_size(width: int, depth: int) -> int:
    """The most nodes of a tree TreeProposer grows, root included: width under the root, then width^2 a
    level (width children under each of the width nodes it expands)."""
    return 1 + width + (depth - 1) * width * width if depth else 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclasses.dataclass
class Sequence:
    seq_id: int
    tokens: list[int]
    rng: np.random.Generator
    params: SamplingParams
    draft_confidence: float = 0.0  # where its drafted chains stop (ChainStop); 0 drafts all k
    last_round_start: int | None = None  # its length when its latest round began (None before the first)

    def settled(self) -> int:
        """How many of its tokens a proposer's catch-up takes in: all but those its latest round committed,
        which the next proposal feeds in its first forward (all but the last before any round). So in a
        run of drafting rounds the catch-up has nothing to do, and what it does do (the prompt, the
        tokens of rounds that did not draft) is timed apart from what a round of k costs."""
        end = len(self.tokens) - 1
        return end if self.last_round_start is None else min(self.last_round_start, end)


@dataclasses.dataclass
class RoundStats:
    """What one round did, per sequence: drafts, acceptances and the committed tokens; and its timing."""
    drafted: list[int]
    accepted: list[int]
    draft_seconds: float
    verify_seconds: float
    catch_up_seconds: float = 0.0  # the draft taking in settled tokens it lacked (Sequence.settled)
    tokens: list[list[int]] = dataclasses.field(default_factory=list)  # accepted drafts + the target's token
    seconds: float = 0.0  # the whole round: the above and the host's work around them
    offered: list[int] = dataclasses.field(default_factory=list)  # each sequence's k (drafted: what it made of it)


class Model:
    """A model library with its KV cache: what the loop needs of target and draft alike.

    A target that exports its hidden states (the target of a feature draft) keeps them beside its cache:
    features[seq_id] holds one row per cached token, cut back whenever the cache is."""

    def __init__(self, lib: ModelLibrary, kv: PagedKVCache):
        self.lib = lib
        self.kv = kv
        self.features: dict[int, FeatureRows] | None = {} if lib.exports_hidden else None
        self._tree_features: np.ndarray | None = None  # a tree forward's, until its commit keeps a path

    def cached(self, seq: Sequence) -> int:
        return self.kv.length(seq.seq_id)

    def keep(self, seq: Sequence, n: int) -> None:
        """Cut the sequence's cache back to its first n tokens (a no-op if it holds no more)."""
        self.kv.popn(seq.seq_id, self.cached(seq) - n)
        if self.features is not None:
            # to what the cache holds: a session's reset empties the cache without this
            self.features.setdefault(seq.seq_id, FeatureRows()).truncate(self.cached(seq))

    def sync(self, seq: Sequence) -> None:
        """Restore the invariant: the cache holds a prefix of the committed tokens, all but the last at most."""
        self.keep(seq, min(self.cached(seq), len(seq.tokens) - 1))

    def remove_sequence(self, seq_id: int) -> None:
        self.kv.remove_sequence(seq_id)
        if self.features is not None:
            self.features.pop(seq_id, None)

    def prefill(self, seq: Sequence, chunk: int, end: int | None = None) -> None:
        """Feed the committed tokens it lacks up to end (all but the last), in chunks the cache accepts."""
        start, end = self.cached(seq), len(seq.tokens) - 1 if end is None else end
        for lo in range(start, end, chunk):
            self.forward_last([seq.seq_id], [seq.tokens[lo:min(end, lo + chunk)]])

    def forward_last(self, seq_ids: list[int], token_lists: list[list[int]]):
        """The library's forward_last, keeping the hidden states of a target that exports them."""
        return self._forward(self.lib.forward_last, seq_ids, token_lists)

    def forward_all(self, seq_ids: list[int], token_lists: list[list[int]]):
        """The library's forward_all over chains, keeping the hidden states of a target that exports them."""
        return self._forward(self.lib.forward_all, seq_ids, token_lists)

    def _forward(self, forward, seq_ids: list[int], token_lists: list[list[int]]):
        if self.features is None:
            return forward(self.kv, seq_ids, token_lists)
        logits, hidden = forward(self.kv, seq_ids, token_lists, hidden=True)
        rows = to_host(hidden)
        offsets = np.cumsum([0] + [len(t) for t in token_lists])
        for i, seq_id in enumerate(seq_ids):
            self.features.setdefault(seq_id, FeatureRows()).append(rows[offsets[i]:offsets[i + 1]])
        return logits

    def forward_tree(self, seq_ids: list[int], trees: list[Tree]):
        """One tree-attention forward over each sequence's tree, left in the cache until commit_tree (or
        the cache's discard_tree); logits at every node."""
        tokens, parents = [t.tokens for t in trees], [p for t in trees for p in t.parents]
        if self.features is None:
            return self.lib.forward_all(self.kv, seq_ids, tokens, parents)
        logits, hidden = self.lib.forward_all(self.kv, seq_ids, tokens, parents, hidden=True)
        self._tree_features = to_host(hidden)
        return logits

    def commit_tree(self, seq_ids: list[int], trees: list[Tree], leaves: list[int]) -> None:
        """Keep each sequence's root->leaf path of the tree forward in the cache, and its features."""
        self.kv.commit_tree(seq_ids, leaves)
        if self.features is not None:
            offset = 0
            for seq_id, tree, leaf in zip(seq_ids, trees, leaves):
                path = [offset + n for n in tree.nodes_to(leaf)]
                self.features.setdefault(seq_id, FeatureRows()).append(self._tree_features[path])
                offset += len(tree.tokens)


class FeatureRows:
    """A growing [n, width] array of one sequence's target features (amortised appends)."""

    def __init__(self):
        self.data: np.ndarray | None = None
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        if self.data is None or self.n + len(rows) > len(self.data):
            grown = np.empty((max(2 * (self.n + len(rows)), 64), rows.shape[1]), rows.dtype)
            if self.data is not None:
                grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:self.n + len(rows)] = rows
        self.n += len(rows)

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def rows(self, start: int, end: int) -> np.ndarray:
        assert end <= self.n, (start, end, self.n)
        return self.data[start:end]


class Proposer(Protocol):
    """What SpeculativeDecoder asks of a proposer, every round: catch_up (take in the committed tokens it
    lacks, timed apart from drafting), propose (k tokens per sequence, or a tree of depth k, with their
    q rows when sampling: (drafts, q)), and after the round's commit, sync (drop whatever the sequence's
    committed tokens no longer support)."""

    def sync(self, seq: Sequence) -> None: ...

    def catch_up(self, seqs: list[Sequence]) -> None: ...

    def propose(self, seqs: list[Sequence], k: int, params: SamplingParams, u_draft: np.ndarray | None): ...


class _ModelDraft:
    """What chain and tree drafts share: a draft model kept a prefix of the committed tokens."""

    def __init__(self, model: Model, prefill_chunk: int):
        self.model = model
        self.prefill_chunk = prefill_chunk

    def sync(self, seq: Sequence) -> None:
        self.model.sync(seq)

    def catch_up(self, seqs: list[Sequence]) -> None:
        """Feed the settled tokens the draft lacks; propose feeds the latest round's (dk after a full
        acceptance, and the target's token) with the first draft step."""
        for seq in seqs:
            self.model.prefill(seq, self.prefill_chunk, seq.settled())


class DraftModel(_ModelDraft):
    """Proposes by running a small model k times; its q rows are its own processed distributions."""

    def propose(self, seqs: list[Sequence], k: int, params: SamplingParams, u_draft: np.ndarray):
        if k == 0:
            return [[] for _ in seqs], None
        model, ids = self.model, [s.seq_id for s in seqs]
        feeds = [s.tokens[model.cached(s):] for s in seqs]  # the latest round's tokens (catch_up fed the rest)
        stop, steps, q_rows = ChainStop(seqs), [], []
        for j in range(k):
            logits = model.lib.forward_last(model.kv, ids, feeds)
            if params.greedy:
                tokens = model.lib.kernels.argmax(logits)
            else:
                q = model.lib.kernels.sampling_probs(logits, *_row_params(params, len(seqs)))
                tokens = model.lib.kernels.sample_from_probs(q, u_draft[:, j])
                q_rows.append(to_host(q))
            steps.append(tokens)
            if not stop.extend(logits, q_rows[-1] if q_rows else None):
                break
            feeds = [[int(t)] for t in tokens]
        return stop.chains(steps, q_rows)


class ChainStop:
    """Where each sequence's chain of drafts ends: before the first draft at which the draft's cumulative
    confidence, the product of its top probabilities at each step so far, falls below the sequence's
    draft_confidence (EAGLE-2's measure: the draft's top probability tracks how often the target agrees,
    so a long chain is verified only where it is likely to be accepted, and a short one costs no rows
    that would be rejected). When sampling, the confidence is read off q, never the token drawn from
    it, so whether a position is proposed depends only on the tokens before it and rejection sampling
    stays exact."""

    def __init__(self, seqs: list[Sequence]):
        self.threshold = np.array([s.draft_confidence for s in seqs], np.float64)
        self.cumulative = np.ones(len(seqs))
        self.lengths = np.zeros(len(seqs), np.int64)
        self.alive = np.ones(len(seqs), bool)

    def extend(self, logits, q: np.ndarray | None) -> bool:
        """Take the latest step's drafts of the sequences still drafting; whether any still drafts."""
        if self.threshold.any():
            self.cumulative *= top_probability(logits) if q is None else q.max(axis=1)
            self.alive &= self.cumulative >= self.threshold
        self.lengths += self.alive
        return bool(self.alive.any())

    def chains(self, steps: list, q_rows: list[np.ndarray]):
        """Each sequence's drafts, and its q rows in turn (sequence-major, as the kernels read them;
        None when greedy)."""
        drafts = [[int(step[b]) for step in steps[:n]] for b, n in enumerate(self.lengths)]
        if not q_rows:
            return drafts, None
        q = np.stack(q_rows, axis=1)  # [batch, steps, V]
        return drafts, np.concatenate([q[b, :n] for b, n in enumerate(self.lengths)])


def top_probability(logits) -> np.ndarray:
    """Each row's largest probability under softmax(logits)."""
    rows = to_host(logits)
    return 1.0 / np.exp(rows - rows.max(axis=1, keepdims=True)).sum(axis=1)


@dataclasses.dataclass
class Tree:
    """One sequence's draft tree. Node 0 is the root, the last committed token (parent -1); every other
    node's parent precedes it, the order TVM's tree attention and the tree kernels expect."""
    tokens: list[int]
    parents: list[int]

    def path(self, leaf: int) -> list[int]:
        """The tokens below the root down to leaf."""
        return [self.tokens[n] for n in self.nodes_to(leaf)[1:]]

    def nodes_to(self, leaf: int) -> list[int]:
        """The nodes from the root down to leaf."""
        nodes = [leaf]
        while nodes[-1] > 0:
            nodes.append(self.parents[nodes[-1]])
        return nodes[::-1]


class TreeProposer:
    """Proposes a tree of the given depth, growing it a level per draft forward as EAGLE-2's expansion
    does: the root gets `width` children, and each later level expands the `width` likeliest nodes of
    the level before (by the product of the draft's probabilities along their paths) with `width`
    children each, so a tree grows by width^2 nodes a level, not by a power of width. Children are the
    draft's likeliest tokens when greedy, drawn without replacement from its q when sampling (as the
    recursive rejection sampling of tree_verify_sampling requires), fewer where q has fewer tokens.
    Which nodes get children is decided from the tokens drafted before them, never from the children's
    own draws, so sampling stays exact; EAGLE-2's last step, verifying only the likeliest of all the
    drafted nodes, would decide from those draws, and is not taken.

    A subclass gives the draft's logits on the host at the root (_root_logits; None where it cannot
    draft yet) and at the nodes to expand (_logits_at), and head, the target token id of each of the
    draft's logit columns (None: the draft's columns are the target's vocabulary)."""

    width: int
    target_vocab_size: int
    head: np.ndarray | None = None

    def propose(self, seqs: list[Sequence], depth: int, params: SamplingParams, u_draft: np.ndarray | None):
        """The trees, and when sampling each node's q row ([nodes of all trees, V], zero at leaves)."""
        trees = [Tree([s.tokens[-1]], [-1]) for s in seqs]
        expand = [(b, 0) for b in range(len(seqs))]  # (sequence, node) of the nodes to expand, one per row
        path_probability = dict.fromkeys(expand, 1.0)
        logits = self._root_logits(seqs)
        q_rows = {}
        for level in range(depth if logits is not None else 0):
            if level:
                logits = self._logits_at(seqs, trees, expand)
            probs = _softmax(logits) if params.greedy else self._probs(logits, params)
            if not params.greedy:
                q_rows.update(zip(expand, probs))
            children = self._add_children(trees, expand, logits if params.greedy else probs, params, u_draft)
            for child, row, column in children:
                path_probability[child] = path_probability[expand[row]] * probs[row, column]
            expand = self._likeliest([child for child, _, _ in children], path_probability)
        if params.greedy:
            return trees, None
        offsets = np.cumsum([0] + [len(t.tokens) for t in trees])
        q = np.zeros((offsets[-1], self.target_vocab_size), np.float32)
        columns = slice(None) if self.head is None else self.head
        for (b, node), row in q_rows.items():
            q[offsets[b] + node, columns] = row
        return trees, q

    def _likeliest(self, nodes: list[tuple[int, int]], path_probability: dict) -> list[tuple[int, int]]:
        """Each sequence's `width` nodes of the highest path probability, in node order."""
        kept = []
        for b in dict.fromkeys(b for b, _ in nodes):
            mine = [node for node in nodes if node[0] == b]
            kept += sorted(sorted(mine, key=lambda node: -path_probability[node])[:self.width])
        return kept

    def _probs(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        lib = self.model.lib
        return to_host(lib.kernels.sampling_probs(logits, *_row_params(params, len(logits))))

    def _add_children(self, trees: list[Tree], parents: list[tuple[int, int]], weights: np.ndarray,
                      params: SamplingParams, u_draft: np.ndarray | None) -> list[tuple[tuple[int, int], int, int]]:
        """Give each parent up to width children picked from its row of weights without replacement (the
        argmax, or a draw in proportion to q, of what earlier siblings left); returns them in node order,
        each as ((sequence, node), its parent's row, its column of weights)."""
        lib = self.model.lib
        removed = -np.inf if params.greedy else 0.0
        weights = weights.copy()
        counts = np.minimum(self.width, (weights > removed).sum(axis=1))
        first_child, picked = [], {}
        for (b, node), count in zip(parents, counts):  # a parent's children are adjacent
            first_child.append(len(trees[b].tokens))
            trees[b].tokens += [-1] * count
            trees[b].parents += [node] * count
        for i in range(self.width):
            rows = np.flatnonzero(counts > i)
            if not rows.size:
                break
            children = [(parents[r][0], first_child[r] + i) for r in rows]
            if params.greedy:
                picks = lib.kernels.argmax(weights[rows])
            else:  # a node's draw uses the node's own uniform, so it is fixed whatever the batch
                picks = lib.kernels.sample_from_probs(weights[rows], [u_draft[b, n - 1] for b, n in children])
            picks = np.asarray(picks, np.int64)
            tokens = picks if self.head is None else self.head[picks]
            for (b, n), r, column, token in zip(children, rows, picks, tokens):
                trees[b].tokens[n] = int(token)
                picked[b, n] = (r, column)
            weights[rows, picks] = removed
        return [((b, n), *picked[b, n]) for r, (b, _) in enumerate(parents)
                for n in range(first_child[r], first_child[r] + counts[r])]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class DraftTree(TreeProposer, _ModelDraft):
    """A draft model's token trees. TVM's cache appends a tree forward's tokens in place until they are
    committed, so a later forward cannot attach to an uncommitted tree: each level re-feeds the tree
    below the root as one tree forward (the draft is small), reads the logits of the nodes it expands
    and drops those tokens again. The root goes in once (catch_up fed the committed tokens before it),
    so its cache ends each round as the chain draft's does.
    """

    def __init__(self, model: Model, prefill_chunk: int, width: int):
        super().__init__(model, prefill_chunk)
        self.width = width
        self.target_vocab_size = model.lib.vocab_size

    def _root_logits(self, seqs: list[Sequence]) -> np.ndarray:
        model = self.model
        return to_host(model.lib.forward_last(model.kv, [s.seq_id for s in seqs],
                                              [s.tokens[model.cached(s):] for s in seqs]))

    def _logits_at(self, seqs: list[Sequence], trees: list[Tree], nodes: list[tuple[int, int]]) -> np.ndarray:
        """The draft's logits at the nodes to expand: each tree below its (cached) root fed, then dropped."""
        kv = self.model.kv
        below_root, parents, rows = _below_root(trees, nodes)
        try:
            logits = self.model.lib.forward_all(kv, [s.seq_id for s in seqs], below_root, parents)
        finally:
            kv.discard_tree()
        return to_host(logits)[rows]


def _below_root(trees: list[Tree], nodes: list[tuple[int, int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """Each tree's nodes below its root, their parents as a tree forward on the cached root takes them
    (the first level hangs off the cached root: -1), and the rows of that forward holding nodes."""
    below_root = [t.tokens[1:] for t in trees]
    offsets = np.cumsum([0] + [len(t) for t in below_root])
    return (below_root, [p - 1 for t in trees for p in t.parents[1:]],
            [int(offsets[b]) + node - 1 for b, node in nodes])


class NGramDraft:
    """Prompt lookup: the continuation that followed the latest earlier occurrence of the sequence's
    last n tokens (longest n first). A deterministic proposal is a one-hot q, so verification keeps
    the target's distribution exactly (vLLM's rule)."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def sync(self, seq: Sequence) -> None:
        pass

    def catch_up(self, seqs: list[Sequence]) -> None:
        pass

    def propose(self, seqs: list[Sequence], k: int, params: SamplingParams, u_draft: np.ndarray):
        drafts = [self.lookup(s.tokens, k) for s in seqs]
        if params.greedy:
            return drafts, None
        flat = [t for d in drafts for t in d]
        q = np.zeros((len(flat), self.vocab_size), np.float32)
        q[np.arange(len(flat)), flat] = 1.0
        return drafts, q

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        if k == 0:
            return []
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []


class FeatureModel(Model):
    """A feature draft's library and cache. Its cache entry i is sequence position i+1, fed the token
    there and the target's feature of the position before (position 0 has none), so it holds at most
    one entry fewer than the tokens it was fed."""

    def keep(self, seq: Sequence, n: int) -> None:
        self.kv.popn(seq.seq_id, self.cached(seq) - max(0, n - 1))

    def sync(self, seq: Sequence) -> None:
        self.kv.popn(seq.seq_id, self.cached(seq) - min(self.cached(seq), len(seq.tokens) - 1))


class FeatureDraft:
    """EAGLE-style proposals (compile/eagle.py): the draft reads the target's features of the committed
    tokens and its own feature after each drafted one. Its head covers a subset of the vocabulary; q is
    zero outside it, so the verification rule stays exact (a token outside it can still come from the
    target's residual).

    Its cache keeps only entries fed the target's own features: those of drafted positions, fed the
    draft's features, are dropped at sync, and the next catch-up feeds the accepted ones afresh."""

    def __init__(self, model: FeatureModel, target: Model, prefill_chunk: int):
        self.model = model
        self.target = target
        self.prefill_chunk = prefill_chunk
        self._true_entries: dict[int, int] = {}  # per sequence: the entries fed target features, this round

    def sync(self, seq: Sequence) -> None:
        true = self._true_entries.pop(seq.seq_id, None)
        if true is not None:
            self.model.kv.popn(seq.seq_id, self.model.cached(seq) - true)
        self.model.sync(seq)

    def catch_up(self, seqs: list[Sequence]) -> None:
        """Feed positions cached+1 .. S-1 (S: the settled tokens) in forwards of at most prefill_chunk rows
        across all the sequences (the cache's limit for one forward); propose feeds the latest round's
        positions, up to N-1, in its first forward, so a run of drafting rounds pays one draft call each."""
        while True:
            todo, room = [], self.prefill_chunk
            for s in seqs:
                lo, end = self.model.cached(s) + 1, s.settled()
                if lo < end and room:
                    todo.append((s, lo, min(end, lo + room)))
                    room -= todo[-1][2] - lo
            if not todo:
                return
            self._feed(todo)

    def _unfed(self, seq: Sequence) -> int:
        """Positions cached+1 .. N-1, the ones the draft has not been fed."""
        return max(0, len(seq.tokens) - 1 - self.model.cached(seq))

    def _feed(self, spans: list[tuple[Sequence, int, int]]):
        """Feed each sequence positions lo..hi-1 with the target's features; the draft's logits and
        feature at each one's last position."""
        tokens = [t for s, lo, hi in spans for t in s.tokens[lo:hi]]
        features = np.concatenate([self.target.features[s.seq_id].rows(lo - 1, hi - 1) for s, lo, hi in spans])
        return self.model.lib.forward_features(self.model.kv, [s.seq_id for s, _, _ in spans],
                                               [hi - lo for _, lo, hi in spans], self.target.lib.embed(tokens), features)

    def _feed_latest(self, seqs: list[Sequence]):
        """Feed the positions up to N-1 it lacks with the target's features (the latest round's, in a run
        of drafting rounds); the draft's logits and feature at N-1. None where a sequence has no
        position 1 yet (position 0 has no feature before it)."""
        if min(len(s.tokens) for s in seqs) < 2:
            return None
        out = self._feed([(s, len(s.tokens) - max(1, self._unfed(s)), len(s.tokens)) for s in seqs])
        for s in seqs:
            self._true_entries[s.seq_id] = self.model.cached(s)
        return out

    def propose(self, seqs: list[Sequence], k: int, params: SamplingParams, u_draft: np.ndarray):
        fed = self._feed_latest(seqs) if k else None
        if fed is None:
            return [[] for _ in seqs], None
        lib = self.model.lib
        logits, g = fed
        ids, stop, steps, q_rows = [s.seq_id for s in seqs], ChainStop(seqs), [], []
        for j in range(k):
            if j:
                logits, g = lib.forward_own_features(self.model.kv, ids, self.target.lib.embed(steps[-1]), g)
            if params.greedy:
                picks = lib.kernels.argmax(logits)
            else:
                q = lib.kernels.sampling_probs(logits, *_row_params(params, len(seqs)))
                picks = lib.kernels.sample_from_probs(q, u_draft[:, j])
                q_rows.append(to_host(q))
            steps.append(lib.token_ids[np.asarray(picks, np.int64)])
            if not stop.extend(logits, q_rows[-1] if q_rows else None):
                break
        drafts, q_head = stop.chains(steps, q_rows)
        if params.greedy:
            return drafts, None
        # scattered over the target's vocabulary
        q = np.zeros((len(q_head), self.target.lib.vocab_size), np.float32)
        q[:, lib.token_ids] = q_head
        return drafts, q


class FeatureTree(TreeProposer, FeatureDraft):
    """A feature draft's token trees: as DraftTree's, each level is re-fed as one tree forward of the
    draft over the tree below the root and dropped again; every node is fed its token's embedding and
    its parent's draft feature (a first-level node, the root's: the draft's feature at the last
    committed position, which read the target's)."""

    def __init__(self, model: FeatureModel, target: Model, prefill_chunk: int, width: int):
        super().__init__(model, target, prefill_chunk)
        self.width = width
        self.head = model.lib.token_ids
        self.target_vocab_size = target.lib.vocab_size
        self._node_features: dict[tuple[int, int], np.ndarray] = {}  # (sequence, node): the draft's feature there

    def _root_logits(self, seqs: list[Sequence]) -> np.ndarray | None:
        fed = self._feed_latest(seqs)
        if fed is None:
            return None
        logits, g = fed
        self._node_features = {(b, 0): row for b, row in enumerate(to_host(g))}
        return to_host(logits)

    def _logits_at(self, seqs: list[Sequence], trees: list[Tree], nodes: list[tuple[int, int]]) -> np.ndarray:
        kv, lib = self.model.kv, self.model.lib
        below_root, parents, rows = _below_root(trees, nodes)
        features = np.stack([self._node_features[b, p] for b, t in enumerate(trees) for p in t.parents[1:]])
        try:
            logits, g = lib.forward_own_tree(kv, [s.seq_id for s in seqs], below_root, parents,
                                             self.target.lib.embed([t for tokens in below_root for t in tokens]),
                                             features, rows)
        finally:
            kv.discard_tree()
        self._node_features.update(zip(nodes, to_host(g)))
        return to_host(logits)


class SpeculativeDecoder:
    def __init__(self, target: Model, proposer: Proposer | None,
                 observer: Callable[[RoundStats], None] | None = None):
        """observer: told of every round, after its tokens are committed (bench and the backend checks
        record decisions and timings with it)."""
        self.target = target
        self.proposer = proposer
        self.observer = observer

    def round(self, seqs: list[Sequence], k: int | list[int]) -> RoundStats:
        """Run one round; its stats carry the new committed tokens of each sequence (accepted drafts + 1).
        k: drafts per chain, one for all or each sequence's own (0: that sequence only decodes), or the
        tree's depth (one for all). Each sequence decides with its own sampling parameters and uniforms,
        so its tokens depend on its own k, never on the rest of the batch."""
        ks = [k] * len(seqs) if isinstance(k, int) else list(k)
        if self.proposer is None:
            ks = [0] * len(seqs)
        start = time.perf_counter()
        if isinstance(self.proposer, TreeProposer) and max(ks, default=0):
            stats = self._tree_round(seqs, max(ks))
        else:
            stats = self._chain_round(seqs, ks)
        stats.seconds, stats.offered = time.perf_counter() - start, ks
        if self.observer is not None:
            self.observer(stats)
        return stats

    def _chain_round(self, seqs: list[Sequence], ks: list[int]) -> RoundStats:
        uniforms = _uniforms(seqs, ks)
        drafts, q_blocks, draft_seconds, catch_up_seconds = self._propose_chains(seqs, ks, uniforms)
        t0 = time.perf_counter()
        accepted, next_tokens = self._verify(seqs, drafts, q_blocks, uniforms)
        verify_seconds = time.perf_counter() - t0
        accepted_drafts = [d[:n] for d, n in zip(drafts, accepted)]
        return RoundStats([len(d) for d in drafts], [int(n) for n in accepted], draft_seconds, verify_seconds,
                          catch_up_seconds, self._commit(seqs, accepted_drafts, next_tokens))

    def _tree_round(self, seqs: list[Sequence], depth: int) -> RoundStats:
        params = seqs[0].params
        if any(s.params != params for s in seqs):
            raise ValueError("a tree round takes one set of sampling parameters for all its sequences")
        # one draw per non-root node for drafting and one for accepting it: a width-1 tree draws as a chain
        nodes = tree_size(self.proposer.width, depth) - 1
        uniforms = _uniforms(seqs, [nodes] * len(seqs))
        u_draft = None if params.greedy else np.stack([u[:nodes] for u in uniforms])
        start = time.perf_counter()
        self.proposer.catch_up(seqs)
        t0 = time.perf_counter()
        trees, q = self.proposer.propose(seqs, depth, params, u_draft)
        draft_seconds, catch_up_seconds = time.perf_counter() - t0, t0 - start
        t0 = time.perf_counter()
        leaves, next_tokens = self._verify_tree(seqs, trees, q, params, uniforms, nodes)
        verify_seconds = time.perf_counter() - t0
        paths = [tree.path(leaf) for tree, leaf in zip(trees, leaves)]
        return RoundStats([depth] * len(seqs), [len(p) for p in paths], draft_seconds, verify_seconds,
                          catch_up_seconds, self._commit(seqs, paths, next_tokens))

    def _propose_chains(self, seqs: list[Sequence], ks: list[int], uniforms):
        """Each sequence's drafts (its first k) and their q rows (None when greedy), with the proposer's
        drafting and catch-up seconds. The proposer runs once per set of sampling parameters among the
        sequences that draft, each time with that set's longest k; shorter chains keep their first k."""
        drafts, q_blocks = [[] for _ in seqs], [None] * len(seqs)
        drafting = [i for i, k in enumerate(ks) if k]
        if not drafting:
            return drafts, q_blocks, 0.0, 0.0
        start = time.perf_counter()
        self.proposer.catch_up([seqs[i] for i in drafting])
        t0 = time.perf_counter()
        for params, members in _by_params(seqs, drafting):
            k = max(ks[i] for i in members)
            # rows past a sequence's own k draft tokens it drops: their uniforms are padding
            u_draft = None if params.greedy else np.stack([np.pad(uniforms[i][:ks[i]], (0, k - ks[i]))
                                                           for i in members])
            proposed, q = self.proposer.propose([seqs[i] for i in members], k, params, u_draft)
            row = 0  # q holds each sequence's rows in turn, as many as it drafted
            for i, d in zip(members, proposed):
                drafts[i] = list(d[:ks[i]])
                q_blocks[i] = None if q is None else q[row:row + len(drafts[i])]
                row += len(d)
        return drafts, q_blocks, time.perf_counter() - t0, t0 - start

    def _commit(self, seqs: list[Sequence], accepted: list[list[int]], next_tokens) -> list[list[int]]:
        """The accepted drafts and the target's next token join each sequence; caches back to the invariant."""
        new_tokens = []
        for seq, drafts, t in zip(seqs, accepted, next_tokens):
            new_tokens.append(drafts + [int(t)])
            seq.last_round_start = len(seq.tokens)
            seq.tokens.extend(new_tokens[-1])
            self.target.sync(seq)
            if self.proposer is not None:
                self.proposer.sync(seq)
        return new_tokens

    # -- verify and decide ----------------------------------------------------------------------------
    def _verify(self, seqs, drafts, q_blocks, uniforms):
        """One target forward over every chain; greedy sequences decide by the argmax, sampled ones by
        rejection sampling with their own temperature, top-k and top-p on each of their rows."""
        target = self.target
        chains = [[s.tokens[-1]] + d for s, d in zip(seqs, drafts)]
        # Without drafts this is a plain decode step: the decode function's one-row matmuls are
        # cheaper than the verify function's blocks of rows, and give the same per-row sums.
        drafting = any(drafts)
        forward = target.forward_all if drafting else target.forward_last
        logits = forward([s.seq_id for s in seqs], chains)
        rows = np.cumsum([0] + [len(c) if drafting else 1 for c in chains])
        accepted, next_tokens = np.zeros(len(seqs), np.int64), np.zeros(len(seqs), np.int64)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if greedy and sampled:  # each kind's rows go to its own kernel
            logits = to_host(logits)
        for members, decide in ((greedy, self._decide_greedy), (sampled, self._decide_sampled)):
            if members:
                part = logits if len(members) == len(seqs) else logits[np.concatenate(
                    [np.arange(rows[i], rows[i + 1]) for i in members])]
                accepted[members], next_tokens[members] = decide(part, [seqs[i] for i in members],
                                                                 [drafts[i] for i in members],
                                                                 [q_blocks[i] for i in members],
                                                                 [uniforms[i] for i in members])
        return accepted, next_tokens

    def _decide_greedy(self, logits, seqs, drafts, q_blocks, uniforms):
        indptr = np.cumsum([0] + [len(d) + 1 for d in drafts])
        return self.target.lib.kernels.verify_greedy(logits, [t for d in drafts for t in d], indptr)

    def _decide_sampled(self, logits, seqs, drafts, q_blocks, uniforms):
        kernels = self.target.lib.kernels
        counts = [len(d) + 1 for d in drafts]
        p = kernels.sampling_probs(logits, *_row_params([s.params for s in seqs], counts))
        blocks = [q for q in q_blocks if q is not None and len(q)]
        q = np.concatenate(blocks) if blocks else np.zeros((0, self.target.lib.vocab_size), np.float32)
        # a sequence drafted len(d) <= k tokens: its first len(d) acceptance uniforms, then its final one
        k_of = [(len(u) - 1) // 2 for u in uniforms]
        flat_u = np.concatenate([u[k:k + len(d)] for u, k, d in zip(uniforms, k_of, drafts)]).astype(np.float32)
        u_sample = np.array([u[2 * k] for u, k in zip(uniforms, k_of)], np.float32)
        return kernels.verify_sampling(p, q, [t for d in drafts for t in d], np.cumsum([0] + counts), flat_u, u_sample)

    def _verify_tree(self, seqs, trees: list[Tree], q, params: SamplingParams, uniforms, nodes: int):
        """One tree-attention forward of the target over every tree, the tree kernel's walk, and the
        commit that keeps only each accepted root->leaf path in the target's cache."""
        target, lib, ids = self.target, self.target.lib, [s.seq_id for s in seqs]
        tokens = [t for tree in trees for t in tree.tokens]
        parents = [p for tree in trees for p in tree.parents]
        indptr = np.cumsum([0] + [len(tree.tokens) for tree in trees])
        try:
            logits = target.forward_tree(ids, trees)
            if params.greedy:
                leaves, next_tokens = lib.kernels.tree_verify_greedy(logits, tokens, parents, indptr)
            else:
                p = lib.kernels.sampling_probs(logits, *_row_params(params, int(indptr[-1])))
                # node n's acceptance uniform is its sequence's n-th; the root has none
                node_u = np.concatenate([np.concatenate([[0.0], u[nodes:nodes + len(tree.tokens) - 1]])
                                         for u, tree in zip(uniforms, trees)]).astype(np.float32)
                u_sample = np.array([u[2 * nodes] for u in uniforms], np.float32)
                leaves, next_tokens = lib.kernels.tree_verify_sampling(p, q, tokens, parents, indptr,
                                                                       node_u, u_sample)
            target.commit_tree(ids, trees, leaves)
        finally:
            target.kv.discard_tree()  # after a failure: an uncommitted tree blocks every later forward
        return leaves, next_tokens


def _by_params(seqs: list[Sequence], members: list[int]) -> list[tuple[SamplingParams, list[int]]]:
    """The members grouped by their sampling parameters, in order of first appearance."""
    groups: dict[SamplingParams, list[int]] = {}
    for i in members:
        groups.setdefault(seqs[i].params, []).append(i)
    return list(groups.items())


def _row_params(params: SamplingParams | list[SamplingParams], rows: int | list[int]):
    """Temperature, top-k and top-p per row: one set for all rows, or each sequence's own set on each of
    its rows (all of its p_0..p_k and q_1..q_k alike)."""
    per_seq, counts = (params, rows) if isinstance(params, list) else ([params], [rows])
    return (np.repeat(np.array([p.temperature for p in per_seq], np.float32), counts),
            np.repeat(np.array([p.top_k for p in per_seq], np.int32), counts),
            np.repeat(np.array([p.top_p for p in per_seq], np.float32), counts))


def _uniforms(seqs: list[Sequence], counts: list[int]) -> list[np.ndarray | None]:
    """Each sampled sequence draws from its own seeded generator in a fixed order, so a seed fixes its
    output whatever else is in the batch: n for drafting, n for acceptance, one for the final token
    (n: its drafts, or its tree's nodes below the root). A greedy sequence draws nothing."""
    out = []
    for seq, n in zip(seqs, counts):
        if seq.params.greedy:
            out.append(None)
            continue
        draws = seq.rng.random(2 * n + 1, dtype=np.float64).astype(np.float32)
        # float32 rounding can turn u < 1 into 1.0; keep every uniform in [0, 1).
        out.append(np.minimum(draws, np.float32(1.0) - np.finfo(np.float32).epsneg))
    return out
