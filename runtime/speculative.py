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
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .kv_cache import PagedKVCache
from .library import ModelLibrary


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")


@dataclasses.dataclass
class Sequence:
    seq_id: int
    tokens: list[int]
    rng: np.random.Generator
    params: SamplingParams


@dataclasses.dataclass
class RoundStats:
    """What one round did, for acceptance statistics and timing: drafts and acceptances per sequence."""
    drafted: list[int]
    accepted: list[int]
    draft_seconds: float
    verify_seconds: float
    catch_up_seconds: float = 0.0  # the draft feeding tokens of rounds that did not draft


class Model:
    """A model library with its KV cache: what the loop needs of target and draft alike."""

    def __init__(self, lib: ModelLibrary, kv: PagedKVCache):
        self.lib = lib
        self.kv = kv

    def cached(self, seq: Sequence) -> int:
        return self.kv.length(seq.seq_id)

    def keep(self, seq: Sequence, n: int) -> None:
        """Cut the sequence's cache back to its first n tokens (a no-op if it holds no more)."""
        self.kv.popn(seq.seq_id, self.cached(seq) - n)

    def sync(self, seq: Sequence) -> None:
        """Restore the invariant: the cache holds a prefix of the committed tokens, all but the last at most."""
        self.keep(seq, min(self.cached(seq), len(seq.tokens) - 1))

    def prefill(self, seq: Sequence, chunk: int) -> None:
        """Feed the committed tokens it lacks except the last, in chunks the cache accepts."""
        start, end = self.cached(seq), len(seq.tokens) - 1
        for lo in range(start, end, chunk):
            self.lib.forward_last(self.kv, [seq.seq_id], [seq.tokens[lo:min(end, lo + chunk)]])


class DraftModel:
    """Proposes by running a small model k times; its q rows are its own processed distributions."""

    def __init__(self, model: Model, prefill_chunk: int):
        self.model = model
        self.prefill_chunk = prefill_chunk

    def sync(self, seq: Sequence) -> None:
        self.model.sync(seq)

    def catch_up(self, seqs: list[Sequence]) -> None:
        """Feed the committed tokens the draft lacks but the last (dk after a full acceptance, the tokens
        of rounds that did not draft), timed apart: each draft step then feeds one token, so its time is
        the cost per drafted token that draft_length="auto" weighs."""
        for seq in seqs:
            self.model.prefill(seq, self.prefill_chunk)

    def propose(self, seqs: list[Sequence], k: int, params: SamplingParams, u_draft: np.ndarray):
        if k == 0:
            return [[] for _ in seqs], None
        model, ids = self.model, [s.seq_id for s in seqs]
        feeds = [s.tokens[model.cached(s):] for s in seqs]  # the last token, and dk after a full acceptance
        steps, q_rows = [], []
        for j in range(k):
            logits = model.lib.forward_last(model.kv, ids, feeds)
            if params.greedy:
                tokens = model.lib.argmax(logits)
            else:
                q = model.lib.sampling_probs(logits, *_row_params(params, len(seqs)))
                tokens = model.lib.sample_from_probs(q, u_draft[:, j])
                q_rows.append(q.numpy())
            steps.append(tokens)
            feeds = [[int(t)] for t in tokens]
        drafts = np.stack(steps, axis=1).tolist()
        # Sequence-major rows for the kernel: sequence b owns q rows b*k .. b*k+k-1.
        q = None if params.greedy else np.stack(q_rows, axis=1).reshape(len(seqs) * k, -1)
        return drafts, q


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


class SpeculativeDecoder:
    def __init__(self, target: Model, proposer: DraftModel | NGramDraft | None):
        self.target = target
        self.proposer = proposer

    def round(self, seqs: list[Sequence], k: int) -> tuple[list[list[int]], RoundStats]:
        """Run one round; returns the new committed tokens of each sequence (accepted drafts + 1)."""
        k = k if self.proposer is not None else 0
        params = seqs[0].params
        u_draft, u_accept, u_sample = _uniforms(seqs, k, params.greedy)
        start = time.perf_counter()
        if k:
            self.proposer.catch_up(seqs)
        t0 = time.perf_counter()
        drafts, q = self.proposer.propose(seqs, k, params, u_draft) if k else ([[] for _ in seqs], None)
        t1 = time.perf_counter()
        accepted, next_tokens = self._verify(seqs, drafts, q, params, u_accept, u_sample)
        t2 = time.perf_counter()
        new_tokens = []
        for seq, d, n, t in zip(seqs, drafts, accepted, next_tokens):
            new_tokens.append(d[:n] + [int(t)])
            seq.tokens.extend(new_tokens[-1])
            self.target.sync(seq)
            if self.proposer is not None:
                self.proposer.sync(seq)
        return new_tokens, RoundStats([len(d) for d in drafts], [int(n) for n in accepted], t1 - t0, t2 - t1,
                                      t0 - start)

    # -- verify and decide ----------------------------------------------------------------------------
    def _verify(self, seqs, drafts, q, params: SamplingParams, u_accept, u_sample):
        target = self.target
        chains = [[s.tokens[-1]] + d for s, d in zip(seqs, drafts)]
        # Without drafts this is a plain decode step: the decode function's one-row matmuls are
        # cheaper than the verify function's blocks of rows, and give the same per-row sums.
        forward = target.lib.forward_all if any(drafts) else target.lib.forward_last
        logits = forward(target.kv, [s.seq_id for s in seqs], chains)
        indptr = np.cumsum([0] + [len(d) + 1 for d in drafts])
        flat_drafts = [t for d in drafts for t in d]
        if params.greedy:
            return target.lib.verify_greedy(logits, flat_drafts, indptr)
        p = target.lib.sampling_probs(logits, *_row_params(params, int(indptr[-1])))
        q = q if q is not None else np.zeros((0, target.lib.vocab_size), np.float32)
        # a proposer may draft fewer than k for a sequence: its first len(d) acceptance uniforms
        flat_u = np.concatenate([u[:len(d)] for u, d in zip(u_accept, drafts)]).astype(np.float32)
        return target.lib.verify_sampling(p, _to_device(q, target.lib), flat_drafts, indptr, flat_u, u_sample)


def _row_params(params: SamplingParams, rows: int):
    """The same temperature, top-k and top-p on every row: all p_0..p_k and all q_1..q_k alike."""
    return (np.full(rows, params.temperature, np.float32), np.full(rows, params.top_k, np.int32),
            np.full(rows, params.top_p, np.float32))


def _uniforms(seqs: list[Sequence], k: int, greedy: bool):
    """Each sequence draws from its own seeded generator in a fixed order, so a seed fixes the output
    whatever else is in the batch: k for drafting, k for acceptance, one for the final token."""
    if greedy:
        return None, None, None
    draws = np.stack([s.rng.random(2 * k + 1, dtype=np.float64) for s in seqs]).astype(np.float32)
    # float32 rounding can turn u < 1 into 1.0; keep every uniform in [0, 1).
    draws = np.minimum(draws, np.float32(1.0) - np.finfo(np.float32).epsneg)
    return draws[:, :k], draws[:, k:2 * k], draws[:, 2 * k]


def _to_device(array: np.ndarray, lib: ModelLibrary):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array, dtype=np.float32), lib.dev)
