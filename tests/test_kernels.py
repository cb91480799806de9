"""Sampling and speculative-verification kernels (compile/kernels/) against a float64 numpy reference.

The ref_* functions below are the readable specification; the CPU schedule is compiled once per
session and checked against them. Random cases are drawn away from float ties and rounding boundaries
(see _stable_uniforms) so that exact comparisons are meaningful; explicit tie cases check that every
tied token is kept.
"""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm

from mlc_spec.compile import kernels

VOCABS = (3, 33, 1000, 32001)


# ---------------------------------------------------------------------------------------------------
# Reference (float64)


def ref_sampling_probs(logits, temperature, top_k, top_p):
    out = np.zeros(logits.shape)
    for r, row in enumerate(logits.astype(np.float64)):
        z = row / float(temperature[r])
        p = np.exp(z - z.max())
        p /= p.sum()
        vocab = len(p)
        if 0 < top_k[r] < vocab:
            # keep x iff fewer than top_k tokens are strictly more probable (boundary ties kept)
            p = np.where(_mass_strictly_above(p, np.ones_like(p)) < top_k[r], p, 0.0)
            p /= p.sum()
        if top_p[r] < 1:
            # keep x iff the mass strictly more probable than x is below top_p
            p = np.where(_mass_strictly_above(p, p) < top_p[r], p, 0.0)
            p /= p.sum()
        out[r] = p
    return out


def _mass_strictly_above(p, weight):
    """For each x: the sum of weight[y] over all y with p[y] > p[x]."""
    order = np.argsort(p, kind="stable")
    suffix = np.concatenate([np.cumsum(weight[order][::-1])[::-1], [0.0]])
    return suffix[np.searchsorted(p[order], p, side="right")]


def ref_sample(weights, u):
    """Smallest x with cumsum(w)[x] > u * sum(w); if rounding leaves none, the last positive x."""
    w = np.asarray(weights, np.float64)
    cdf = np.cumsum(w)
    hits = np.nonzero(cdf > u * cdf[-1])[0]
    if len(hits):
        return int(hits[0])
    return int(np.nonzero(w > 0)[0][-1])


def ref_argmax(logits):
    return np.argmax(logits, axis=1).astype(np.int32)


def ref_verify_greedy(logits, draft, indptr):
    best = np.argmax(logits, axis=1)
    accepted, next_token = [], []
    for b in range(len(indptr) - 1):
        first, k, d0 = indptr[b], indptr[b + 1] - indptr[b] - 1, indptr[b] - b
        n = 0
        while n < k and draft[d0 + n] == best[first + n]:
            n += 1
        accepted.append(n)
        next_token.append(best[first + n])
    return np.array(accepted, np.int32), np.array(next_token, np.int32)


def ref_verify_sampling(p, q, draft, indptr, u_accept, u_sample):
    p, q = p.astype(np.float64), q.astype(np.float64)
    accepted, next_token = [], []
    for b in range(len(indptr) - 1):
        first, k, d0 = indptr[b], indptr[b + 1] - indptr[b] - 1, indptr[b] - b
        n = 0
        while n < k:
            x = draft[d0 + n]
            target = p[first + n, x] if 0 <= x < p.shape[1] else 0.0
            if not (target > 0 and u_accept[d0 + n] * q[d0 + n, x] <= target):
                break
            n += 1
        weights = p[first + n]
        if n < k:
            residual = np.maximum(p[first + n] - q[d0 + n], 0.0)
            if residual.sum() > 0:
                weights = residual
        accepted.append(n)
        next_token.append(ref_sample(weights, u_sample[b]))
    return np.array(accepted, np.int32), np.array(next_token, np.int32)


def ref_tree_verify_greedy(logits, tokens, parents, indptr):
    best = np.argmax(logits, axis=1)
    leaves, next_token = [], []
    for b in range(len(indptr) - 1):
        first, n = indptr[b], indptr[b + 1] - indptr[b]
        node, moved = 0, True
        while moved:
            moved = False
            for j in _children(parents, first, n, node):
                if tokens[first + j] == best[first + node]:
                    node, moved = j, True
                    break
        leaves.append(node)
        next_token.append(best[first + node])
    return np.array(leaves, np.int32), np.array(next_token, np.int32)


def _children(parents, first, n, node):
    return [j for j in range(1, n) if parents[first + j] == node]


def ref_tree_walk(p, q, tokens, parents, indptr, u_accept, b, decisions=None):
    """Recursive rejection sampling down sequence b's tree: (deepest accepted node, law of the next
    token). Records each tested node's decision in decisions when given."""
    p, q = p.astype(np.float64), q.astype(np.float64)
    first, n, vocab = indptr[b], indptr[b + 1] - indptr[b], p.shape[1]
    node = 0
    while True:
        law, rest = p[first + node], 1.0
        for j in _children(parents, first, n, node):
            x = tokens[first + j]
            target = law[x] if 0 <= x < vocab else 0.0
            proposal = q[first + node, x] if 0 <= x < vocab else 0.0
            accept = target > 0 and u_accept[first + j] * proposal <= target * rest
            if decisions is not None:
                decisions[first + j] = accept
            if accept:
                node = j
                break
            law = np.maximum(law * rest - q[first + node], 0.0)
            law = law / law.sum() if law.sum() > 0 else law
            rest -= proposal
        else:  # every child rejected; an emptied residual means p == q to rounding: p is the law
            return node, law if law.sum() > 0 else p[first + node]


def ref_tree_verify_sampling(p, q, tokens, parents, indptr, u_accept, u_sample):
    leaves, next_token = [], []
    for b in range(len(indptr) - 1):
        node, law = ref_tree_walk(p, q, tokens, parents, indptr, u_accept, b)
        leaves.append(node)
        next_token.append(ref_sample(law, u_sample[b]))
    return np.array(leaves, np.int32), np.array(next_token, np.int32)


# ---------------------------------------------------------------------------------------------------
# Compiled CPU kernels


class CpuKernels:
    """The registry's kernels built for generic LLVM, called as the runtime calls them: by name, with
    results shaped from each kernel's signature."""

    def __init__(self):
        target = tvm.target.Target({"kind": "llvm"})
        funcs = kernels.scheduled_kernels(target)
        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
        self._lib = tvm.compile(mod, target=target)
        self._dev = tvm.cpu()

    def __getattr__(self, name):
        if name not in kernels.KERNELS:
            raise AttributeError(name)
        signature = kernels.KERNELS[name].signature
        return lambda *args: self._call_signature(signature, args)

    def _call_signature(self, signature, args):
        inputs = [np.ascontiguousarray(a, spec.dtype) for a, spec in zip(args, signature.args)]
        shapes = signature.result_shapes([i.shape for i in inputs])
        return self._call(signature.name, inputs, [(shape, r.dtype) for shape, r in zip(shapes, signature.results)])

    def _call(self, name, inputs, outputs):
        args = [tvm.runtime.tensor(a, self._dev) for a in inputs]
        outs = [tvm.runtime.empty(shape, dtype, self._dev) for shape, dtype in outputs]
        self._lib[name](*args, *outs)
        results = [o.numpy() for o in outs]
        return results[0] if len(results) == 1 else tuple(results)


@pytest.fixture(scope="module")
def cpu():
    return CpuKernels()


# ---------------------------------------------------------------------------------------------------
# Case builders


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _ragged(lengths):
    """indptr for sequences with the given draft counts (each owns k + 1 target rows)."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths) + 1)]).astype(np.int32)


def _stable_uniforms(rng, size, decide):
    """Uniforms whose decisions survive a 1e-5 nudge, so float32 rounding cannot flip them.

    decide(u) maps the uniforms to the decisions they drive, one per entry and monotone in each u;
    entries whose decision changes between u - 1e-5 and u + 1e-5 are redrawn.
    """
    u = rng.random(size)
    for _ in range(100):
        unstable = decide(np.clip(u - 1e-5, 0, 1)) != decide(np.clip(u + 1e-5, 0, 1))
        if not unstable.any():
            return u.astype(np.float32).astype(np.float64)
        u[unstable] = rng.random(int(unstable.sum()))
    raise AssertionError("could not draw uniforms away from decision boundaries")


def _processed(rng, rows, vocab, scale=2.0):
    """Probability rows as sampling_probs would give them: softmax with some tokens cut to zero."""
    p = _softmax(rng.standard_normal((rows, vocab)) * scale)
    if vocab > 3:
        p[rng.random((rows, vocab)) < 0.2] = 0.0
        p[np.arange(rows), rng.integers(0, vocab, rows)] += 0.05
        p /= p.sum(axis=1, keepdims=True)
    return p.astype(np.float32)


def _sampling_case(rng, lengths, vocab):
    """A ragged verify batch: q near p, drafts drawn from q, stable uniforms."""
    indptr = _ragged(lengths)
    num_rows, num_drafts = indptr[-1], indptr[-1] - len(lengths)
    p = _processed(rng, num_rows, vocab)
    draft_rows = np.concatenate([np.arange(indptr[b], indptr[b + 1] - 1) for b in range(len(lengths))])
    draft_rows = draft_rows.astype(np.int64)
    q = (0.6 * p[draft_rows] + 0.4 * _processed(rng, num_drafts, vocab)).astype(np.float32)
    draft = np.array([rng.choice(vocab, p=row / row.sum()) for row in q.astype(np.float64)], np.int32)
    target, proposal = p[draft_rows, draft].astype(np.float64), q[np.arange(num_drafts), draft]
    u_accept = _stable_uniforms(rng, num_drafts, lambda u: (target > 0) & (u * proposal <= target))

    def next_tokens(u):
        return ref_verify_sampling(p, q, draft, indptr, u_accept, u)[1]

    u_sample = _stable_uniforms(rng, len(lengths), next_tokens)
    return p, q, draft, indptr, u_accept, u_sample


# ---------------------------------------------------------------------------------------------------
# argmax


@pytest.mark.parametrize("vocab", VOCABS)
def test_argmax_matches_numpy_including_ties(cpu, vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[1, :] = 0.5  # all tied: lowest index
    logits[2, [0, vocab - 1]] = 9.0  # tie between the ends
    logits[3, vocab // 2 :] = 7.0
    logits[4, 0] = -np.inf
    np.testing.assert_array_equal(cpu.argmax(logits), ref_argmax(logits))


# ---------------------------------------------------------------------------------------------------
# sampling_probs


def _filter_case(rng, rows, vocab):
    """Per-row temperature/top-k/top-p whose kept sets have clear margins in float32."""
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    temperature = rng.uniform(0.5, 1.5, rows)
    top_k = np.zeros(rows, np.int64)
    top_p = np.ones(rows)
    for r in range(rows):
        z = np.sort(logits[r].astype(np.float64))[::-1] / temperature[r]
        kind = r % 4  # 0: top-k only, 1: top-p only, 2: both, 3: neither
        if kind in (0, 2) and vocab > 2:
            gaps = np.nonzero(z[:-1] - z[1:] > 1e-3)[0][: min(vocab - 1, 60)] + 1
            top_k[r] = rng.choice(gaps)
        if kind in (1, 2):
            p = _softmax(z)[: top_k[r] or vocab]
            cum = np.cumsum(p / p.sum())
            cut = rng.integers(0, min(len(cum) - 1, 40)) if len(cum) > 1 else 0
            top_p[r] = cum[cut] + 0.5 * (cum[cut + 1] - cum[cut]) if cut + 1 < len(cum) else 0.999
    return logits, temperature.astype(np.float32), top_k, top_p.astype(np.float32)


@pytest.mark.parametrize("vocab", VOCABS)
def test_sampling_probs_applies_filters_to_every_row(cpu, vocab):
    rng = np.random.default_rng(10 + vocab)
    logits, temperature, top_k, top_p = _filter_case(rng, 12, vocab)
    got = cpu.sampling_probs(logits, temperature, top_k, top_p)
    want = ref_sampling_probs(logits, temperature, top_k, top_p.astype(np.float64))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("vocab", VOCABS + (151936,))
def test_sampling_probs_without_filters_is_softmax(cpu, vocab):
    rng = np.random.default_rng(20 + vocab)
    logits = (rng.standard_normal((5, vocab)) * 3).astype(np.float32)
    logits[0, 0] = 20.0  # a dominant token: the normaliser's rounding shows on its probability
    temperature = np.array([1.0, 0.3, 2.0, 1.0, 0.7], np.float32)
    top_k = np.array([0, vocab, vocab + 5, 0, -1])  # k outside (0, V) means no top-k
    got = cpu.sampling_probs(logits, temperature, top_k, np.ones(5, np.float32))
    want = _softmax(logits.astype(np.float64) / temperature[:, None].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_sampling_probs_keeps_every_tied_token(cpu):
    vocab = 33
    logits = np.full((4, vocab), -2.0, np.float32)
    logits[0, [3, 9, 20]] = 1.0  # top_k = 2 falls inside a three-way tie: all three kept
    logits[1, [3, 9, 20]] = 1.0  # top_p = 0.5: each of the tied tokens has nothing strictly above
    logits[2, [5, 6]] = [2.0, 1.0]
    logits[2, [7, 8]] = 1.0  # top_k = 2 boundary tie below a unique maximum
    logits[3, :] = 0.0  # everything tied: top-k and top-p keep all
    top_k = np.array([2, 0, 2, 3])
    top_p = np.array([1.0, 0.5, 1.0, 0.1], np.float32)
    got = cpu.sampling_probs(logits, np.ones(4, np.float32), top_k, top_p)
    want = ref_sampling_probs(logits, np.ones(4), top_k, top_p.astype(np.float64))
    assert set(np.nonzero(got[0])[0]) == {3, 9, 20}
    assert set(np.nonzero(got[1])[0]) == {3, 9, 20}
    assert set(np.nonzero(got[2])[0]) == {5, 6, 7, 8}
    assert (got[3] > 0).all()
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_sampling_probs_smallest_top_p_keeps_the_top_token(cpu):
    logits = np.array([[0.0, 3.0, 1.0, 2.9]], np.float32)
    got = cpu.sampling_probs(logits, np.ones(1, np.float32), np.zeros(1), np.full(1, 1e-6, np.float32))
    np.testing.assert_array_equal(got, [[0.0, 1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------
# sample_from_probs


@pytest.mark.parametrize("vocab", VOCABS)
def test_sample_from_probs_is_the_inverse_cdf(cpu, vocab):
    rng = np.random.default_rng(30 + vocab)
    probs = _processed(rng, 16, vocab)
    probs[3] *= 3.7  # unnormalised rows are sampled in proportion
    probs[4] = 0.0
    probs[4, vocab - 1] = 0.25  # only the last token has mass
    u = _stable_uniforms(rng, 16, lambda u: np.array([ref_sample(w, x) for w, x in zip(probs, u)]))
    want = np.array([ref_sample(w, x) for w, x in zip(probs, u)])
    np.testing.assert_array_equal(cpu.sample_from_probs(probs, u), want)


@pytest.mark.parametrize("vocab", VOCABS)
def test_sample_from_probs_never_returns_a_zero_probability_token(cpu, vocab):
    rng = np.random.default_rng(40 + vocab)
    probs = _processed(rng, 8, vocab)
    probs[:, -1] = 0.0  # a zero tail: rounding must not push the pick onto it
    probs[:, 0] = 0.0
    probs[:, 1] = np.maximum(probs[:, 1], 1e-3)
    u = np.array([0.0, 1e-9, 0.5, 0.999, 0.9999999, np.nextafter(np.float32(1), np.float32(0)), 0.25, 0.75])
    tokens = cpu.sample_from_probs(probs, u)
    assert (probs[np.arange(8), tokens] > 0).all()


# ---------------------------------------------------------------------------------------------------
# verify_greedy


def test_verify_greedy_chain_cases(cpu):
    vocab = 33
    rng = np.random.default_rng(50)
    lengths = [4, 4, 4, 0, 3]
    indptr = _ragged(lengths)
    logits = rng.standard_normal((indptr[-1], vocab)).astype(np.float32)
    best = ref_argmax(logits)
    draft = []
    for b, k in enumerate(lengths):
        rows = best[indptr[b] : indptr[b] + k].copy()
        if b == 1:
            rows[0] = (rows[0] + 1) % vocab  # first draft wrong
        if b == 2:
            rows[2] = (rows[2] + 1) % vocab  # mismatch in the middle
        draft += list(rows)
    draft = np.array(draft, np.int32)
    accepted, next_token = cpu.verify_greedy(logits, draft, indptr)
    np.testing.assert_array_equal(accepted, [4, 0, 2, 0, 3])
    # all accepted: the bonus token is the argmax of the row after the last draft
    assert next_token[0] == best[indptr[0] + 4] and next_token[4] == best[indptr[4] + 3]
    assert next_token[1] == best[indptr[1]] and next_token[2] == best[indptr[2] + 2]
    assert next_token[3] == best[indptr[3]]
    ref = ref_verify_greedy(logits, draft, indptr)
    np.testing.assert_array_equal(accepted, ref[0])
    np.testing.assert_array_equal(next_token, ref[1])


@pytest.mark.parametrize("vocab", VOCABS)
def test_verify_greedy_ragged_batches(cpu, vocab):
    rng = np.random.default_rng(60 + vocab)
    lengths = list(range(9)) + list(rng.integers(0, 9, 7))
    indptr = _ragged(lengths)
    logits = rng.standard_normal((indptr[-1], vocab)).astype(np.float32)
    best = ref_argmax(logits)
    draft = []
    for b, k in enumerate(lengths):
        rows = best[indptr[b] : indptr[b] + k].copy()
        if k and b % 3:  # plant one mismatch at a random position in two sequences of three
            j = rng.integers(0, k)
            rows[j] = (rows[j] + 1 + rng.integers(0, vocab - 1)) % vocab
        draft += list(rows)
    draft = np.array(draft, np.int32)
    got = cpu.verify_greedy(logits, draft, indptr)
    want = ref_verify_greedy(logits, draft, indptr)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------------
# verify_sampling


@pytest.mark.parametrize("vocab", VOCABS)
def test_verify_sampling_ragged_batches(cpu, vocab):
    rng = np.random.default_rng(70 + vocab)
    lengths = list(range(9)) + list(rng.integers(0, 9, 23 if vocab < 1000 else 3))
    p, q, draft, indptr, u_accept, u_sample = _sampling_case(rng, lengths, vocab)
    got = cpu.verify_sampling(p, q, draft, indptr, u_accept, u_sample)
    want = ref_verify_sampling(p, q, draft, indptr, u_accept, u_sample)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert 0 < want[0].sum() < sum(lengths)  # both acceptances and rejections were exercised


def _edge_rows():
    """p at a node, p at its child, q without p's token 5, and q far above p at token 3."""
    p_row = np.array([0.1, 0.2, 0.0, 0.3, 0.0, 0.25, 0.15, 0.0], np.float32)
    bonus_row = np.array([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5], np.float32)
    q_no_5 = p_row.copy()
    q_no_5[5] = 0.0
    q_no_5 /= q_no_5.sum()
    q_over_3 = np.array([0.05, 0.05, 0.0, 0.6, 0.0, 0.15, 0.15, 0.0], np.float32)
    return p_row, bonus_row, q_no_5, q_over_3


def test_verify_sampling_edge_cases(cpu):
    p_row, bonus_row, q_no_5, q_over_3 = _edge_rows()
    # one draft per sequence: (q row, drafted token, u_accept)
    cases = [
        (p_row, 2, 0.0),  # q == p and p(x) = 0: rejected, the residual is empty, p is sampled
        (q_no_5, 5, 0.999),  # q(x) = 0 < p(x): accepted whatever u is
        (np.full(8, 0.125, np.float32), 4, 0.0),  # p(x) = 0 < q(x): rejected even with u = 0
        (q_over_3, 3, 0.999),  # u q(x) > p(x) > 0: rejected, the residual max(0, p - q) is sampled
    ]
    indptr = _ragged([1] * len(cases))
    p = np.stack([row for _ in cases for row in (p_row, bonus_row)])
    q = np.stack([c[0] for c in cases])
    draft = np.array([c[1] for c in cases], np.int32)
    u_accept = np.array([c[2] for c in cases], np.float32)
    u_sample = np.array([0.35, 0.6, 0.9, 0.1], np.float32)
    accepted, next_token = cpu.verify_sampling(p, q, draft, indptr, u_accept, u_sample)
    np.testing.assert_array_equal(accepted, [0, 1, 0, 0])
    assert next_token[0] == ref_sample(p_row, u_sample[0])
    assert bonus_row[next_token[1]] > 0
    assert np.maximum(p_row - 0.125, 0)[next_token[2]] > 0
    assert np.maximum(p_row - q_over_3, 0)[next_token[3]] > 0
    want = ref_verify_sampling(p, q, draft, indptr, u_accept, u_sample)
    np.testing.assert_array_equal(accepted, want[0])
    np.testing.assert_array_equal(next_token, want[1])


def test_verify_sampling_out_of_vocab_draft_is_rejected(cpu):
    p = np.full((2, 4), 0.25, np.float32)
    q = np.full((1, 4), 0.25, np.float32)
    for bad in (-1, 4, 1 << 30):
        accepted, next_token = cpu.verify_sampling(
            p, q, np.array([bad], np.int32), _ragged([1]), np.zeros(1), np.array([0.6], np.float32)
        )
        assert accepted[0] == 0 and next_token[0] == 2


# ---------------------------------------------------------------------------------------------------
# token trees: tree_verify_greedy and tree_verify_sampling


def _full_tree_parents(width, depth):
    """The shape the runtime drafts: every node above depth has width children, numbered level by level."""
    parents, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for node in level:
            for _ in range(width):
                nxt.append(len(parents))
                parents.append(node)
        level = nxt
    return parents


def _random_tree(rng, n, max_width):
    """Any parent before its child, at most max_width children each: siblings need not be adjacent."""
    parents = [-1]
    for j in range(1, n):
        open_nodes = [i for i in range(j) if parents.count(i) < max_width]
        parents.append(int(rng.choice(open_nodes)))
    return parents


def _tree_batch(rng, count, max_width=4):
    """Parent pointers of a ragged batch: full trees (chains among them), random trees, a lone root."""
    shapes = [_full_tree_parents(w, d) for w, d in ((1, 4), (2, 3), (3, 2), (4, 1), (2, 1)) if w <= max_width]
    shapes += [_random_tree(rng, int(n), max_width) for n in rng.integers(1, 24, count - len(shapes) - 1)] + [[-1]]
    indptr = np.concatenate([[0], np.cumsum([len(t) for t in shapes])]).astype(np.int32)
    return np.concatenate(shapes).astype(np.int32), indptr


def _without_replacement(rng, weights, width):
    """width tokens from each row of weights, one after another, each from what the earlier left."""
    weights = np.array(weights, np.float64)
    drawn = np.zeros((len(weights), width), np.int32)
    for i in range(width):
        cdf = np.cumsum(weights, axis=1)
        drawn[:, i] = np.argmax(cdf > rng.random((len(weights), 1)) * cdf[:, -1:], axis=1)
        weights[np.arange(len(weights)), drawn[:, i]] = 0.0
    return drawn


def _draw_siblings(rng, q, tokens, parents, indptr):
    """Each node's children drawn without replacement from the q row of that node."""
    for b in range(len(indptr) - 1):
        first, n = indptr[b], indptr[b + 1] - indptr[b]
        for node in range(n):
            children = _children(parents, first, n, node)
            if children:
                tokens[first + np.array(children)] = _without_replacement(rng, q[first + node][None], len(children))[0]


def _tree_sampling_case(rng, count, vocab):
    """A ragged batch of trees: q near p, siblings drawn from q without replacement, stable uniforms."""
    parents, indptr = _tree_batch(rng, count, max_width=min(4, vocab))
    nodes = indptr[-1]
    p = _processed(rng, nodes, vocab)
    q = (0.6 * p + 0.4 * _processed(rng, nodes, vocab)).astype(np.float32)
    if vocab > 3:  # some mass where p is zero (q's own zeros come from _processed)
        q[np.arange(nodes), np.argmin(p, axis=1)] += 0.05
        q /= q.sum(axis=1, keepdims=True)
    widest = max(len(_children(parents, indptr[b], indptr[b + 1] - indptr[b], j))
                 for b in range(count) for j in range(indptr[b + 1] - indptr[b]))
    assert (q > 0).sum(axis=1).min() >= widest, "every node's siblings must fit in q's support"
    tokens = rng.integers(0, vocab, nodes).astype(np.int32)
    _draw_siblings(rng, q, tokens, parents, indptr)

    def decisions(u):
        tested = np.zeros(nodes, np.int8) - 1
        for b in range(count):
            ref_tree_walk(p, q, tokens, parents, indptr, u, b, tested)
        return tested

    u_accept = _stable_uniforms(rng, nodes, decisions)

    def next_tokens(u):
        return ref_tree_verify_sampling(p, q, tokens, parents, indptr, u_accept, u)[1]

    u_sample = _stable_uniforms(rng, count, next_tokens)
    return p, q, tokens, parents, indptr, u_accept, u_sample


def test_tree_verify_greedy_cases(cpu):
    vocab = 33
    rng = np.random.default_rng(150)
    parents, indptr = _tree_batch(rng, 12)
    logits = rng.standard_normal((indptr[-1], vocab)).astype(np.float32)
    best = ref_argmax(logits)
    # each node holds its parent's argmax half the time: paths of every depth, matches on later siblings
    parent_rows = np.maximum(parents, 0) + np.repeat(indptr[:-1], np.diff(indptr))
    tokens = np.where(rng.random(len(parents)) < 0.5, best[parent_rows], rng.integers(0, vocab, len(parents)))
    leaf, next_token = cpu.tree_verify_greedy(logits, tokens, parents, indptr)
    want = ref_tree_verify_greedy(logits, tokens, parents, indptr)
    np.testing.assert_array_equal(leaf, want[0])
    np.testing.assert_array_equal(next_token, want[1])
    assert 0 < (want[0] > 0).sum() < len(want[0])  # some trees accept a path, some nothing
    assert leaf[-1] == 0 and next_token[-1] == best[-1]  # a lone root: the target's next token


def test_tree_verify_greedy_follows_a_later_sibling(cpu):
    logits = np.zeros((4, 5), np.float32)
    logits[0, 3] = logits[2, 1] = logits[3, 4] = 1.0  # root -> 3, node 2 -> 1
    # the root's children: 2 (wrong), then 3 (the match); node 2's child 1 matches too
    tokens, parents = [0, 2, 3, 1], [-1, 0, 0, 2]
    leaf, next_token = cpu.tree_verify_greedy(logits, tokens, parents, _ragged([3]))
    assert leaf[0] == 3 and next_token[0] == 4


@pytest.mark.parametrize("vocab", VOCABS)
def test_tree_verify_sampling_ragged_batches(cpu, vocab):
    rng = np.random.default_rng(160 + vocab)
    case = _tree_sampling_case(rng, 24 if vocab < 1000 else 8, vocab)
    got = cpu.tree_verify_sampling(*case)
    want = ref_tree_verify_sampling(*case)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert 0 < (want[0] > 0).sum() < len(want[0])  # acceptances and full rejections both exercised


def test_tree_verify_sampling_edge_cases(cpu):
    p_row, bonus_row, q_no_5, q_over_3 = _edge_rows()
    # root plus two siblings per tree: (q row at the root, the siblings, their u_accept)
    cases = [
        (p_row, (3, 1), (0.999, 0.999)),  # q == p: both accepted by rule u q <= p; the first wins
        (q_over_3, (3, 5), (0.999, 0.5)),  # 3 rejected; 5 accepted: u q(5) <= norm(max(0, p - q))(5) * 0.4
        (np.full(8, 0.125, np.float32), (4, 7), (0.0, 0.0)),  # p(x) = 0 < q(x): both rejected even at u = 0
        (q_no_5, (5, 3), (0.999, 0.5)),  # q(x) = 0 < p(x): accepted whatever u is
        (np.full(8, 0.125, np.float32), (4, 99), (0.0, 0.0)),  # an id outside the vocabulary: rejected
    ]
    indptr = _ragged([2] * len(cases))
    p = np.stack([row for _ in cases for row in (p_row, bonus_row, bonus_row)])
    q = np.stack([row for c in cases for row in (c[0], bonus_row, bonus_row)])
    tokens = np.array([t for c in cases for t in (0,) + c[1]], np.int32)
    parents = np.array([-1, 0, 0] * len(cases), np.int32)
    u_accept = np.array([u for c in cases for u in (0.0,) + c[2]], np.float32)
    u_sample = np.array([0.35, 0.6, 0.9, 0.1, 0.45], np.float32)
    leaf, next_token = cpu.tree_verify_sampling(p, q, tokens, parents, indptr, u_accept, u_sample)
    want = ref_tree_verify_sampling(p, q, tokens, parents, indptr, u_accept, u_sample)
    np.testing.assert_array_equal(leaf, want[0])
    np.testing.assert_array_equal(next_token, want[1])
    np.testing.assert_array_equal(leaf, [1, 2, 0, 1, 0])
    assert bonus_row[next_token[[0, 1, 3]]].min() > 0  # after an acceptance: the child's p
    # both rejected: residual of p after 0.125 everywhere twice; p(4) = p(7) = 0 so it stays in p's support
    assert p_row[next_token[2]] > 0 and p_row[next_token[4]] > 0


def test_tree_zero_residual_falls_back_to_p(cpu):
    """q == p, yet rounding rejects: the residual max(0, p - q) is empty and the token comes from p."""
    p_row = np.array([0.5, 0.25, 0.25, 0.0], np.float32)
    p = np.stack([p_row, p_row])
    tokens, parents = [0, 1], [-1, 0]
    # u = 1.5 lies outside U[0, 1): it forces the rejection of q(x) == p(x) that only rounding causes
    u_accept = np.array([0.0, 1.5], np.float32)
    for u_sample, want in ((0.1, 0), (0.6, 1), (0.9, 2)):
        leaf, next_token = cpu.tree_verify_sampling(p, p, tokens, parents, _ragged([1]), u_accept,
                                                    np.array([u_sample], np.float32))
        assert leaf[0] == 0 and next_token[0] == want


def test_width_one_trees_decide_like_chains(cpu):
    """A chain is the width-1 tree: same accepted count and token from the same uniforms, greedy and sampled."""
    rng = np.random.default_rng(170)
    lengths = list(range(9)) + list(rng.integers(0, 9, 15))
    p, q, draft, indptr, u_accept, u_sample = _sampling_case(rng, lengths, 1000)
    parents = np.concatenate([np.arange(-1, k) for k in lengths]).astype(np.int32)
    roots = indptr[:-1]
    node_of_draft = np.delete(np.arange(indptr[-1]), roots)  # draft slot s is tree node s + its sequence + 1
    tokens = np.zeros(indptr[-1], np.int32)
    tokens[node_of_draft] = draft
    tree_u = np.zeros(indptr[-1], np.float32)
    tree_u[node_of_draft] = u_accept
    # q rows by node: a draft's q belongs to its parent, the node it was drawn from; leaves have none
    tree_q = np.zeros_like(p)
    tree_q[node_of_draft - 1] = q
    chain = cpu.verify_sampling(p, q, draft, indptr, u_accept, u_sample)
    tree = cpu.tree_verify_sampling(p, tree_q, tokens, parents, indptr, tree_u, u_sample)
    np.testing.assert_array_equal(tree[0], chain[0])
    np.testing.assert_array_equal(tree[1], chain[1])
    assert 0 < chain[0].sum() < sum(lengths)
    logits = rng.standard_normal(p.shape).astype(np.float32)
    # greedy drafts that hold the target's argmax at their parent most of the time
    greedy_draft = np.where(rng.random(len(draft)) < 0.7, ref_argmax(logits)[node_of_draft - 1], draft)
    greedy_tokens = np.zeros(indptr[-1], np.int32)
    greedy_tokens[node_of_draft] = greedy_draft
    tree = cpu.tree_verify_greedy(logits, greedy_tokens, parents, indptr)
    chain = cpu.verify_greedy(logits, greedy_draft, indptr)
    np.testing.assert_array_equal(tree[0], chain[0])
    np.testing.assert_array_equal(tree[1], chain[1])
    assert chain[0].max() > 2


def test_kernels_are_deterministic(cpu):
    rng = np.random.default_rng(90)
    case = _sampling_case(rng, [3, 0, 5, 8, 1], 1000)
    first = cpu.verify_sampling(*case)
    second = cpu.verify_sampling(*case)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    logits, temperature, top_k, top_p = _filter_case(rng, 8, 1000)
    np.testing.assert_array_equal(
        cpu.sampling_probs(logits, temperature, top_k, top_p),
        cpu.sampling_probs(logits, temperature, top_k, top_p),
    )
    u = rng.random(8)
    probs = cpu.sampling_probs(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(cpu.sample_from_probs(probs, u), cpu.sample_from_probs(probs, u))


# ---------------------------------------------------------------------------------------------------
# Distribution: the first emitted token follows the processed target p exactly


CHI_SQUARE_ALPHA = 1e-3
CHI_SQUARE_SEQUENCES = 100_000


def _chi_square_p_value(observed, expected):
    """scipy's chi-square p-value when installed, else the Wilson-Hilferty normal approximation."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    try:
        from scipy import stats
    except ImportError:
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(stats.chi2.sf(stat, dof))


# (vocab, temperature, top_k, top_p, target logits, draft logits)
CHI_SQUARE_CASES = [
    (6, 0.7, 4, 0.9, [1.0, 0.2, -0.5, 2.0, 0.0, 1.5], [0.0, 2.0, 1.0, -1.0, 0.5, 0.3]),
    (8, 1.3, 0, 0.8, [0.5, -1.0, 2.0, 0.0, 1.0, -0.3, 0.8, 0.1], [0.0] * 8),
    (7, 1.0, 5, 1.0, [2.0, 1.9, 0.5, 0.1, -1.0, 1.0, 0.7], [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]),
    (8, 0.9, 6, 0.95, [0.3, 0.2, 0.1, 0.0, -0.1, -0.2, 1.2, 1.1], None),  # draft == target
]


@pytest.mark.parametrize("case", range(len(CHI_SQUARE_CASES)))
def test_first_emitted_token_follows_the_target(cpu, case):
    vocab, temperature, top_k, top_p, target_logits, draft_logits = CHI_SQUARE_CASES[case]
    draft_logits = target_logits if draft_logits is None else draft_logits
    rng = np.random.default_rng(100 + case)
    settings = (np.full(2, temperature, np.float32), np.full(2, top_k), np.full(2, top_p, np.float32))
    # row 0: the distributions under test; row 1: arbitrary later positions of the chain
    target_rows = np.array([target_logits, rng.standard_normal(vocab)], np.float32)
    p_rows = cpu.sampling_probs(target_rows, *settings)
    q_rows = cpu.sampling_probs(np.array([draft_logits, rng.standard_normal(vocab)]), *settings)
    np.testing.assert_allclose(p_rows, ref_sampling_probs(target_rows, *settings), atol=1e-6)

    lengths = rng.integers(1, 4, CHI_SQUARE_SEQUENCES)
    indptr = _ragged(lengths)
    first_rows = indptr[:-1]
    p = np.repeat(p_rows[1:2], indptr[-1], axis=0)
    p[first_rows] = p_rows[0]
    first_drafts = first_rows - np.arange(len(lengths))
    num_drafts = indptr[-1] - len(lengths)
    q = np.repeat(q_rows[1:2], num_drafts, axis=0)
    q[first_drafts] = q_rows[0]
    draft = _draw(rng, q_rows[1], num_drafts)
    draft[first_drafts] = _draw(rng, q_rows[0], len(lengths))
    u_accept = rng.random(num_drafts).astype(np.float32)
    u_sample = rng.random(len(lengths)).astype(np.float32)

    accepted, next_token = cpu.verify_sampling(p, q, draft, indptr, u_accept, u_sample)
    first = np.where(accepted > 0, draft[first_drafts], next_token)
    observed = np.bincount(first, minlength=vocab)
    target = p_rows[0].astype(np.float64)
    assert observed[target == 0].sum() == 0
    expected = target[target > 0] / target.sum() * len(lengths)
    assert _chi_square_p_value(observed[target > 0], expected) > CHI_SQUARE_ALPHA


@pytest.mark.parametrize("case", range(len(CHI_SQUARE_CASES)))
def test_tree_first_emitted_token_follows_the_target(cpu, case):
    """Recursive rejection sampling over siblings drawn without replacement from q keeps p: trees of
    depth 2 (the walk descends), top-k/top-p-truncated rows, q with mass where p is 0, and q == p."""
    vocab, temperature, top_k, top_p, target_logits, draft_logits = CHI_SQUARE_CASES[case]
    draft_logits = target_logits if draft_logits is None else draft_logits
    rng = np.random.default_rng(200 + case)
    settings = (np.full(2, temperature, np.float32), np.full(2, top_k), np.full(2, top_p, np.float32))
    # row 0: the distributions at the root, under test; row 1: every deeper node's
    p_rows = cpu.sampling_probs(np.array([target_logits, rng.standard_normal(vocab)], np.float32), *settings)
    q_rows = cpu.sampling_probs(np.array([draft_logits, rng.standard_normal(vocab)], np.float32), *settings)
    width = int(min(3, (q_rows > 0).sum(axis=1).min()))
    shape = np.array(_full_tree_parents(width, 2), np.int32)
    sequences, nodes = CHI_SQUARE_SEQUENCES // 2, len(shape)
    level_one = np.flatnonzero(shape == 0)

    p = np.repeat(p_rows[1:2], sequences * nodes, axis=0)
    q = np.repeat(q_rows[1:2], sequences * nodes, axis=0)
    p[::nodes], q[::nodes] = p_rows[0], q_rows[0]
    tokens = np.zeros((sequences, nodes), np.int32)
    tokens[:, level_one] = _without_replacement(rng, np.repeat(q_rows[:1], sequences, axis=0), width)
    for node in level_one:
        children = np.flatnonzero(shape == node)
        tokens[:, children] = _without_replacement(rng, np.repeat(q_rows[1:], sequences, axis=0), width)
    parents = np.tile(shape, sequences)
    indptr = (np.arange(sequences + 1) * nodes).astype(np.int32)
    u_accept = rng.random(sequences * nodes).astype(np.float32)
    u_sample = rng.random(sequences).astype(np.float32)

    leaf, next_token = cpu.tree_verify_sampling(p, q, tokens.ravel(), parents, indptr, u_accept, u_sample)
    on_level_one = np.where(leaf > width, shape[leaf], leaf)  # the accepted path's first node
    first = np.where(leaf > 0, tokens[np.arange(sequences), on_level_one], next_token)
    observed = np.bincount(first, minlength=vocab)
    target = p_rows[0].astype(np.float64)
    assert observed[target == 0].sum() == 0
    # the walk descends to depth 2 unless the root's q has no mass where p has (case 0: all rejected)
    assert (leaf > width).any() == (p_rows[0] * q_rows[0]).any()
    # every sibling at the root rejected: happens unless q == p there, where u q(x) <= p(x) always
    assert (leaf == 0).any() != np.array_equal(p_rows[0], q_rows[0])
    expected = target[target > 0] / target.sum() * sequences
    assert _chi_square_p_value(observed[target > 0], expected) > CHI_SQUARE_ALPHA


def _draw(rng, probs, size):
    w = probs.astype(np.float64)
    return rng.choice(len(w), size=size, p=w / w.sum()).astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# Public API and GPU schedules (which cannot run here, but must lower and build)


def test_unscheduled_kernels_are_unnamed_block_funcs():
    for name in kernels.KERNEL_NAMES:
        func = kernels.kernel(name)
        assert isinstance(func, tvm.tirx.PrimFunc)
        assert "global_symbol" not in func.attrs
        assert "T.sblock(" in func.script() and "thread_binding" not in func.script()
    cpu_funcs = kernels.scheduled_kernels(tvm.target.Target({"kind": "llvm"}))
    assert set(cpu_funcs) == set(kernels.KERNEL_NAMES)
    assert all(f.attrs["tirx.is_scheduled"] and "global_symbol" not in f.attrs for f in cpu_funcs.values())


@pytest.mark.parametrize("kind", ["opencl", "webgpu", "cuda"])
def test_gpu_schedules_lower_to_device_source(kind, monkeypatch):
    if kind == "cuda" and "tvm_runtime_cuda" in tvm.base._LOADED_LIBS:
        # TVM's CUDA runtime loaded, so tvm.compile really compiles: with nvcc, as the wheel's NVRTC
        # path needs the cuda-bindings package.
        if not shutil.which("nvcc"):
            pytest.skip("TVM's CUDA runtime is loaded but nvcc is missing")
        monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    target = tvm.target.Target(
        {"kind": kind, **({"arch": "sm_90"} if kind == "cuda" else {})}, host={"kind": "llvm"}
    )
    funcs = kernels.scheduled_kernels(target)
    assert all(f.attrs["tirx.is_scheduled"] for f in funcs.values())
    assert all("global_symbol" not in f.attrs for f in funcs.values())
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        lib = tvm.compile(mod, target=target)
    source = lib.mod.imports[0].inspect_source()
    for name in kernels.KERNEL_NAMES:
        assert f"{name}_kernel" in source, f"{name} missing from the {kind} source"


# The libcuda.so.1 symbols TVM 0.27's libtvm_runtime_cuda.so imports, each failing with
# CUDA_ERROR_NO_DEVICE: enough for the library to load, so that tvm.compile runs nvcc instead of
# silently returning a source-only module (the spike's cuda_stub/libcuda_stub.c).
_LIBCUDA_STUB = """
#define STUB(name) int name() { return 100; }
STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction)
STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
static const char* kMsg = "CUDA_ERROR_NO_DEVICE (stub libcuda)";
int cuGetErrorName(int e, const char** s) { *s = kMsg; return 0; }
int cuGetErrorString(int e, const char** s) { *s = kMsg; return 0; }
"""

_CUDA_BUILD = textwrap.dedent(
    """
    import tvm, tvm.support.nvcc as nvcc
    from tvm.base import _LOADED_LIBS
    from mlc_spec.compile import kernels
    assert "tvm_runtime_cuda" in _LOADED_LIBS, "libtvm_runtime_cuda.so did not load"
    binaries = []
    compile_cuda = nvcc.compile_cuda
    nvcc.compile_cuda = lambda *a, **k: binaries.append(compile_cuda(*a, **k)) or binaries[-1]
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    funcs = kernels.scheduled_kernels(target)
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    with target:  # the nvcc callback reads the arch from the current target, not the argument
        tvm.compile(mod, target=target)
    assert binaries and all(len(b) > 0 for b in binaries), "nvcc produced nothing"
    print("fatbin bytes", sum(len(b) for b in binaries))
    """
)


def test_gpu_schedules_build_cuda_sm90_binaries(tmp_path):
    """A real nvcc build on a machine without a GPU, through a stub libcuda."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not (shutil.which("nvcc") and compiler):
        pytest.skip("building CUDA binaries needs nvcc and a C compiler for the libcuda stub")
    (tmp_path / "libcuda_stub.c").write_text(_LIBCUDA_STUB)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(tmp_path / "libcuda_stub.c")],
        check=True,
    )
    env = dict(os.environ, TVM_CUDA_COMPILE_MODE="nvcc")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("LD_LIBRARY_PATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _CUDA_BUILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "fatbin bytes" in result.stdout
