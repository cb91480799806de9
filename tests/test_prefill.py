"""Prefill over several chunks and sequences: each chunk after the first also attends to the pages
cached before it (compile/attention.py's CPU kernels), and its logits match transformers at every position.
So do decodes over many cached pages, one sequence or several of different lengths at once."""

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
