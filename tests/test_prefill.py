"""Prefill over several chunks and sequences: each chunk after the first also attends to the pages
cached before it (compile/attention.py's CPU kernels), and its logits match transformers at every position.
So do decodes over many cached pages, one sequence or several of different lengths at once. And a
verify's or a token tree's rows are their decodes bit for bit, however the forward falls across pages."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import SHAPES, hf_logits
from mlc_spec.consistency import target_library

CHUNK = 13  # not a multiple of the page size (16), so chunks start and end inside pages


def _compiled(artifacts, name):
    arch, opts = SHAPES[name]
    ckpt = artifacts.checkpoint(name, arch=arch, **opts)
    lib = target_library(artifacts.compile(name, ckpt))
    kv = lib.create_kv_cache(max_batch_size=2, max_total_seq_len=512, prefill_chunk_size=64, page_size=16)
    return ckpt, lib, kv, opts["vocab_size"]


@pytest.mark.parametrize("name", ["llama-gqa2-untied", "mistral-gqa3-v333", "llama-mha-tied-v301"])
def test_chunked_prefill_matches_transformers(artifacts, name):
    ckpt, lib, kv, vocab = _compiled(artifacts, name)
    ids = np.random.default_rng(2).integers(0, vocab, 5 * CHUNK + 4).tolist()
    kv.add_sequence(0)
    got = [lib.forward_all(kv, [0], [ids[lo:lo + CHUNK]]).numpy() for lo in range(0, len(ids), CHUNK)]
    np.testing.assert_allclose(np.concatenate(got), hf_logits(ckpt, ids), atol=1e-4)


def test_one_forward_over_two_cached_sequences(artifacts):
    """Two sequences with different cached lengths in one forward: each attends to its own pages."""
    ckpt, lib, kv, vocab = _compiled(artifacts, "mistral-gqa3-v333")
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, vocab, n).tolist() for n in (45, 29)]
    cached = (33, 9)
    for seq_id, (ids, n) in enumerate(zip(seqs, cached)):
        kv.add_sequence(seq_id)
        lib.forward_last(kv, [seq_id], [ids[:n]])
    got = lib.forward_all(kv, [0, 1], [ids[n:] for ids, n in zip(seqs, cached)]).numpy()
    want = np.concatenate([hf_logits(ckpt, ids)[n:] for ids, n in zip(seqs, cached)])
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", ["mistral-gqa3-v333", "llama-mha-tied-v301"])
def test_decode_over_many_pages_matches_transformers(artifacts, name):
    """Batched decode of two sequences whose contexts end inside different pages, token after token."""
    ckpt, lib, kv, vocab = _compiled(artifacts, name)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, vocab, n).tolist() for n in (68, 53)]
    cached = [60, 45]
    for seq_id, (ids, n) in enumerate(zip(seqs, cached)):
        kv.add_sequence(seq_id)
        lib.forward_last(kv, [seq_id], [ids[:n]])
    got = [lib.forward_last(kv, [0, 1], [[seqs[0][n + i]], [seqs[1][m + i]]]).numpy() for i, (n, m) in
           enumerate([cached] * 8)]
    for seq_id, (ids, n) in enumerate(zip(seqs, cached)):
        np.testing.assert_allclose(np.stack([g[seq_id] for g in got]), hf_logits(ckpt, ids)[n:n + 8], atol=1e-4)


def decoded_logits(lib, tokens: list[int]) -> np.ndarray:
    """Each token's logits when the tokens are fed one at a time from an empty cache."""
    kv = lib.create_kv_cache(max_batch_size=1, max_total_seq_len=512, prefill_chunk_size=64, page_size=16)
    kv.add_sequence(0)
    return np.stack([lib.forward_last(kv, [0], [[t]]).numpy()[0] for t in tokens])


@pytest.mark.parametrize("name", ["mistral-gqa3-v333", "llama-mha-tied-v301"])
def test_verified_rows_are_decoded_rows_bit_for_bit(artifacts, name):
    """FM 8: TVM computes a multi-token forward's attention in two parts merged in float, a rounding
    away from a decode's one pass, which an int8-quantized next layer can turn into another token.
    compile/cpu_attention.c runs one pass instead: chains starting and ending anywhere in a page,
    two sequences in one forward, and a prefill all give each token its decode's logits exactly."""
    _, lib, _, vocab = _compiled(artifacts, name)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, vocab, 60).tolist() for _ in range(2)]
    decoded = [decoded_logits(lib, ids) for ids in seqs]
    np.testing.assert_array_equal(lib.forward_all(kv_of(lib, 1), [0], [seqs[0]]).numpy(), decoded[0])
    for prefix, n in [(13, 5), (14, 2), (30, 3), (16, 8), (31, 1), (40, 20)]:
        kv = kv_of(lib, 2)
        for seq_id, ids in enumerate(seqs):
            lib.forward_last(kv, [seq_id], [ids[:prefix - 3 * seq_id]])
        got = lib.forward_all(kv, [0, 1], [ids[prefix - 3 * i:prefix - 3 * i + n] for i, ids in enumerate(seqs)]).numpy()
        for i in range(2):
            np.testing.assert_array_equal(got[i * n:(i + 1) * n], decoded[i][prefix - 3 * i:prefix - 3 * i + n],
                                          err_msg=f"sequence {i}, {n} tokens after {prefix - 3 * i}")


@pytest.mark.parametrize("prefix", [13, 31, 32])
def test_token_tree_rows_are_decoded_paths_bit_for_bit(artifacts, prefix):
    """Each node of a token tree gets the logits its decode gets after the path from the root to it."""
    _, lib, _, vocab = _compiled(artifacts, "mistral-gqa3-v333")
    rng = np.random.default_rng(6)
    ids = rng.integers(0, vocab, prefix).tolist()
    parents = [-1, 0, 0, 1, 1, 2, 3, 5, 7]
    nodes = rng.integers(0, vocab, len(parents)).tolist()
    kv = kv_of(lib, 1)
    lib.forward_last(kv, [0], [ids])
    got = lib.forward_all(kv, [0], [nodes], tree_parents=parents).numpy()
    kv.discard_tree()
    for node in range(len(parents)):
        path, at = [], node
        while at != -1:
            path, at = [nodes[at]] + path, parents[at]
        np.testing.assert_array_equal(got[node], decoded_logits(lib, ids + path)[-1], err_msg=f"node {node}")


def kv_of(lib, sequences: int):
    kv = lib.create_kv_cache(max_batch_size=2, max_total_seq_len=512, prefill_chunk_size=64, page_size=16)
    for seq_id in range(sequences):
        kv.add_sequence(seq_id)
    return kv
