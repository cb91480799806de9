"""The speculative loop: greedy exactness, cache rollback, stops inside accepted runs, sampling's
distribution, determinism and a soak. Each test names the failure mode of docs/exactness.md it
guards (FM1..FM9)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import VOCAB, exact_first, fail_kernel_call, generate_all, prompts, top_k_probs
from mlc_spec import Engine

DRAFTS = ("self", "random", "partial")


@pytest.fixture(scope="session")
def target_ckpt(artifacts):
    return artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=VOCAB)


@pytest.fixture(scope="session")
def draft_ckpts(artifacts, target_ckpt):
    return {
        "self": target_ckpt,  # agrees always: every draft accepted
        "random": artifacts.checkpoint("unrelated", arch="llama", vocab_size=VOCAB, seed=7, num_hidden_layers=1),
        "partial": artifacts.checkpoint("perturbed", arch="llama", vocab_size=VOCAB, perturb_from=target_ckpt,
                                        noise=0.1),
    }


@pytest.fixture(scope="session")
def engines(artifacts, target_ckpt, draft_ckpts):
    return {name: Engine(artifacts.compile(f"spec-{name}", target_ckpt, draft, max_seq_len=128), max_batch_size=16)
            for name, draft in draft_ckpts.items()}


@pytest.fixture(scope="session")
def reference(engines):
    """Target-only greedy outputs (the same code path with no draft)."""
    return generate_all(engines["random"], prompts(100), max_tokens=40, stop_at_eos=False, speculative=False)


# -- FM1, FM2, FM3: greedy exactness with full, no and partial acceptance ------------------------------------
@pytest.mark.parametrize("draft", DRAFTS)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_speculative_equals_target_alone(engines, reference, draft, k):
    got = generate_all(engines[draft], prompts(100), max_tokens=40, stop_at_eos=False, draft_length=k)
    mismatched = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
    assert not mismatched, f"{len(mismatched)} of 100 prompts differ, first {mismatched[:5]}"


def test_acceptance_matches_each_draft(engines):
    batch = prompts(16, seed=3)
    rate = {name: engines[name].generate(token_ids=batch, max_tokens=40, stop_at_eos=False,
                                         draft_length=4)[0].stats["acceptance_rate"] for name in DRAFTS}
    assert rate["self"] == 1.0  # FM2: a draft that lacked dk after a full acceptance would drift below 1
    assert rate["random"] < 0.2
    assert 0.3 < rate["partial"] < 0.9, rate


def test_last_draft_position_is_verified(engines):
    """FM3: all k drafts are verified, the k-th included."""
    stats = engines["self"].generate(token_ids=prompts(4), max_tokens=30, stop_at_eos=False, draft_length=4)[0].stats
    assert stats["drafted_per_position"][3] > 0
    assert stats["accepted_per_position"][3] == stats["drafted_per_position"][3]


def test_caches_hold_exactly_the_committed_tokens(engines):
    """FM1: after every round the target caches all committed tokens but the last; the draft a prefix of
    them. The next step's logits from the cache equal a fresh prefill of the same tokens."""
    from mlc_spec.runtime.speculative import DraftModel, SamplingParams, Sequence, SpeculativeDecoder

    engine = engines["partial"]
    decoder = SpeculativeDecoder(engine.target, DraftModel(engine.draft, engine.prefill_chunk))
    with engine.session() as session, engine.session() as fresh:
        session.tokens[:] = prompts(1, seed=5)[0][:20]
        seq = Sequence(session.seq_id, session.tokens, np.random.default_rng(0), SamplingParams())
        for m in (engine.target, engine.draft):
            m.prefill(seq, 64)
        for _ in range(12):
            decoder.round([seq], 4)
            assert engine.target.cached(seq) == len(seq.tokens) - 1
            assert engine.draft.cached(seq) in (len(seq.tokens) - 1, len(seq.tokens) - 2)
        fresh.tokens[:] = list(seq.tokens)
        fseq = Sequence(fresh.seq_id, fresh.tokens, np.random.default_rng(0), SamplingParams())
        engine.target.prefill(fseq, 64)
        lib = engine.target.lib
        a = lib.forward_last(engine.target.kv, [seq.seq_id], [[seq.tokens[-1]]]).numpy()
        b = lib.forward_last(engine.target.kv, [fseq.seq_id], [[fseq.tokens[-1]]]).numpy()
        np.testing.assert_allclose(a, b, atol=1e-5)


# -- FM6: stops inside an accepted run ----------------------------------------------------------------------
def test_eos_inside_an_accepted_run(engines, reference):
    engine = engines["self"]
    prompt, ref = prompts(100)[20], reference[20]
    eos = ref[6]
    first = ref.index(eos)
    saved = engine.eos_ids
    engine.eos_ids = frozenset({eos})
    try:
        with engine.session() as session:
            out = session.generate(token_ids=prompt, max_tokens=40, draft_length=8)
            assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop"
            check_caches_consistent(engine, session)
            # the next turn continues from exactly the committed tokens
            follow = session.tokens + [5, 6, 7]
            nxt = session.generate(token_ids=follow, max_tokens=10, draft_length=4, stop_at_eos=False)
    finally:
        engine.eos_ids = saved
    alone = engine.generate(token_ids=follow, max_tokens=10, speculative=False, stop_at_eos=False)
    assert nxt.token_ids == alone.token_ids


def test_max_tokens_inside_an_accepted_run(engines, reference):
    engine = engines["self"]
    with engine.session() as session:
        out = session.generate(token_ids=prompts(100)[30], max_tokens=5, draft_length=8, stop_at_eos=False)
        assert out.token_ids == reference[30][:5] and out.finish_reason == "length"
        check_caches_consistent(engine, session)


def test_stop_string_inside_an_accepted_run(engines, reference):
    engine = engines["self"]
    prompt = prompts(100)[40]
    full = engine.generate(token_ids=prompt, max_tokens=40, stop_at_eos=False, speculative=False)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop, "the reference produced no text"
    with engine.session() as session:
        out = session.generate(token_ids=prompt, max_tokens=40, stop=[stop], draft_length=8, stop_at_eos=False)
        assert out.finish_reason == "stop"
        assert out.text == full.text[:full.text.index(stop)]
        assert out.token_ids == full.token_ids[:len(out.token_ids)]
        check_caches_consistent(engine, session)


def check_caches_consistent(engine, session):
    n = len(session.tokens)
    assert engine.target.kv.length(session.seq_id) == n - 1
    assert engine.draft.kv.length(session.seq_id) <= n - 1


# -- multi-turn ---------------------------------------------------------------------------------------------
def test_multi_turn_reuses_the_cached_prefix(engines):
    engine = engines["partial"]
    history = prompts(1, seed=9)[0][:30]
    with engine.session() as session:
        for turn in range(4):
            out = session.generate(token_ids=history, max_tokens=12, draft_length=4, stop_at_eos=False)
            assert engine.target.kv.length(session.seq_id) == len(history) + len(out.token_ids) - 1
            alone = engine.generate(token_ids=history, max_tokens=12, speculative=False, stop_at_eos=False)
            assert out.token_ids == alone.token_ids, f"turn {turn}"
            history = history + out.token_ids + [7 + turn, 8 + turn]
        # a prompt that diverges from the cached history rolls the cache back to the common prefix
        edited = history[:10] + [99, 98]
        out = session.generate(token_ids=edited, max_tokens=8, stop_at_eos=False)
        assert out.token_ids == engine.generate(token_ids=edited, max_tokens=8, speculative=False,
                                                stop_at_eos=False).token_ids


# -- sampling: determinism and distribution -----------------------------------------------------------------
def test_same_seed_same_output(engines):
    """With a fixed k (auto's k depends on measured timings, and sampled tokens on k)."""
    engine = engines["partial"]
    opts = dict(token_ids=prompts(3, seed=1), max_tokens=24, temperature=0.8, top_p=0.9, top_k=20, seed=42,
                draft_length=4)
    a = [o.token_ids for o in engine.generate(**opts)]
    b = [o.token_ids for o in engine.generate(**opts)]
    c = [o.token_ids for o in engine.generate(**{**opts, "seed": 43})]
    assert a == b
    assert a != c


@pytest.mark.parametrize("speculative", [False, True, "ngram", "tree"])
def test_sampled_first_tokens_follow_the_target(engines, target_ckpt, speculative):
    """FM4/FM5 end to end: speculative sampling keeps the target's distribution (chi-square, 20k draws).
    The n-gram case drafts from a prompt that repeats itself, with a one-hot q; the tree case drafts
    three levels of two siblings drawn without replacement, the third under the two likeliest of the
    four second-level nodes (chosen from what was drawn there), and counts the first three tokens."""
    from scipy.stats import chisquare

    engine = engines["partial"]
    prompt = prompts(1, seed=11)[0][:12]
    if speculative == "ngram":
        prompt = prompt[:6] * 2
    n = 3 if speculative == "tree" else 2
    exact = exact_first(target_ckpt, prompt, temperature=1.0, top_k=4, n=n)
    counts = dict.fromkeys(exact, 0)
    batch = 16
    for call in range(20000 // batch):  # one token more than counted: a round drafts no deeper than max_tokens
        outs = engine.generate(token_ids=[prompt] * batch, max_tokens=n + 1, temperature=1.0, top_k=4, seed=call,
                               speculative=speculative, draft_length=3, tree_width=2, tree_depth=3, stop_at_eos=False)
        for o in outs:
            counts[tuple(o.token_ids[:n])] += 1
    keys = sorted(exact)
    observed = np.array([counts[key] for key in keys])
    expected = np.array([exact[key] for key in keys]) * observed.sum()
    assert observed.sum() == 20000 // batch * batch
    assert chisquare(observed, expected).pvalue > 1e-3


def test_sampled_chains_cut_by_the_draft_keep_the_target_distribution(engines, target_ckpt, draft_ckpts):
    """FM4/FM5 with ChainStop: whether the second position is drafted depends on the first draft (the
    draft's q after it); the first three tokens still follow the target (chi-square, 20k draws)."""
    from scipy.stats import chisquare

    prompt = prompts(1, seed=11)[0][:12]
    draft = top_k_probs(draft_ckpts["partial"], 1.0, 4)
    q1 = draft(prompt)
    reach = np.sort([q1.max() * draft(prompt + [int(a)]).max() for a in np.flatnonzero(q1)])
    gap = int(np.argmax(np.diff(reach)))  # a threshold the first draft always passes, the second only after some
    threshold = (reach[gap] + reach[gap + 1]) / 2
    exact = exact_first(target_ckpt, prompt, temperature=1.0, top_k=4, n=3)
    counts, drafted, batch = dict.fromkeys(exact, 0), np.zeros(2), 16
    for call in range(20000 // batch):
        outs = engines["partial"].generate(token_ids=[prompt] * batch, max_tokens=3, temperature=1.0, top_k=4,
                                           seed=call, draft_length=2, draft_confidence=threshold, stop_at_eos=False)
        drafted += outs[0].stats["drafted_per_position"][:2]
        for o in outs:
            counts[tuple(o.token_ids)] += 1
    assert 0 < drafted[1] < drafted[0], drafted
    keys = sorted(exact)
    observed = np.array([counts[key] for key in keys])
    assert chisquare(observed, np.array([exact[key] for key in keys]) * observed.sum()).pvalue > 1e-3


# -- bad requests -------------------------------------------------------------------------------------------
def test_prompt_longer_than_the_cache_is_refused(engines):
    engine = engines["self"]
    before = engine.cache_usage()
    with pytest.raises(ValueError, match="the prompt has 200 tokens but the KV cache holds 128"):
        engine.generate(token_ids=list(range(2, 202)), max_tokens=4)
    assert engine.cache_usage() == before


def test_generation_stops_at_the_cache_length(engines):
    out = engines["self"].generate(token_ids=list(range(2, 120)), max_tokens=40, stop_at_eos=False)
    assert out.finish_reason == "length" and len(out.token_ids) == 128 - 118


def test_more_sessions_than_the_cache_holds_is_refused(engines):
    engine = engines["random"]
    sessions = [engine.session() for _ in range(engine.max_batch_size)]
    try:
        with pytest.raises(RuntimeError, match="holds at most 16 sequences"):
            engine.session()
    finally:
        for s in sessions:
            s.close()
    assert engine.cache_usage()["target"]["sequences"] == 0


# -- soak: 200 requests, some cancelled midway; every page comes back -----------------------------------------
def test_soak_frees_every_page(engines):
    engine = engines["partial"]
    rng = np.random.default_rng(17)
    batch = prompts(200, seed=23)
    for i, prompt in enumerate(batch):
        opts = dict(max_tokens=int(rng.integers(1, 30)), draft_length=int(rng.integers(0, 6)),
                    temperature=float(rng.choice([0.0, 0.7])), seed=i, stop_at_eos=False)
        if i % 5 == 0:
            stream = engine.stream(token_ids=prompt, **opts)
            for _ in zip(range(2), stream):
                pass
            stream.close()  # cancelled midway
        elif i % 7 == 0:
            with engine.session() as session:
                session.generate(token_ids=prompt, **opts)
                session.generate(token_ids=session.tokens + [3, 4], **opts)
        else:
            engine.generate(token_ids=prompt, **opts)
    usage = engine.cache_usage()
    for role in ("target", "draft"):
        assert usage[role]["sequences"] == 0
        assert usage[role]["free_pages"] == usage[role]["total_pages"]


# -- FM7: draft and target vocabularies that differ in padding ---------------------------------------------------
@pytest.mark.parametrize("draft_vocab", [304, 352])
def test_padded_vocabularies_align(artifacts, draft_vocab):
    """Same 300-token tokenizer; the target's embedding has 320 rows, the draft's fewer or more. The
    random target emits padding ids >= 304, which the smaller draft has no row for."""
    target = artifacts.checkpoint("pad-target", arch="llama", vocab_size=320, tokenizer_vocab=300, seed=3)
    draft = artifacts.checkpoint(f"pad-draft-{draft_vocab}", arch="llama", vocab_size=draft_vocab,
                                 tokenizer_vocab=300, seed=4)
    engine = Engine(artifacts.compile(f"pad-{draft_vocab}", target, draft), max_batch_size=8)
    assert engine.config.shared_vocab_size == min(320, draft_vocab)
    assert engine.draft.lib.vocab_size == 320  # aligned to the target's rows
    batch = prompts(8, seed=31)
    ref = [o.token_ids for o in engine.generate(token_ids=batch, max_tokens=30, stop_at_eos=False, speculative=False)]
    assert any(t >= 304 for out in ref for t in out), "the test needs the target to emit padding ids"
    spec = [o.token_ids for o in engine.generate(token_ids=batch, max_tokens=30, stop_at_eos=False, draft_length=4)]
    assert spec == ref
    tree = engine.generate(token_ids=batch, max_tokens=30, stop_at_eos=False, speculative="tree", tree_width=3,
                           tree_depth=2)
    assert [o.token_ids for o in tree] == ref
    sampled = engine.generate(token_ids=batch, max_tokens=30, temperature=1.0, seed=1, stop_at_eos=False)
    assert all(0 <= t < 320 for o in sampled for t in o.token_ids)


# -- n-gram (prompt lookup) drafting ------------------------------------------------------------------------------
def test_ngram_greedy_equals_target_alone(engines, reference):
    got = generate_all(engines["random"], prompts(100), max_tokens=40, stop_at_eos=False, speculative="ngram",
                       draft_length=4)
    assert got == reference


def test_ngram_accepts_most_of_a_repetitive_text(engines):
    """A continuation that repeats the prompt's text: the lookup proposes it and the target agrees."""
    engine = engines["random"]
    seed_text = prompts(1, seed=13)[0][:24]
    loop = engine.generate(token_ids=seed_text, max_tokens=120, stop_at_eos=False, speculative=False).token_ids
    prompt = seed_text + loop  # greedy tiny models fall into loops: the prompt already holds the loop
    alone = engine.generate(token_ids=prompt, max_tokens=40, stop_at_eos=False, speculative=False)
    out = engine.generate(token_ids=prompt, max_tokens=40, stop_at_eos=False, speculative="ngram", draft_length=6,
                          ngram_size=2)
    assert out.token_ids == alone.token_ids
    assert out.stats["acceptance_rate"] > 0.6 and out.stats["mean_accepted_length"] > 2


def test_ngram_lookup_prefers_the_longest_latest_match():
    from mlc_spec.runtime.speculative import NGramDraft

    ngram = NGramDraft(vocab_size=10, max_ngram=3)
    assert ngram.lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], 2) == [8, 5]  # no [5, 2, 3]; the latest [2, 3]
    assert ngram.lookup([7, 1, 2, 3, 4, 4, 1, 2, 3], 3) == [4, 4, 1]
    assert ngram.lookup([1, 2, 3], 2) == []


# -- chains cut where the draft is unsure (ChainStop) ------------------------------------------------------------
@pytest.mark.parametrize("draft", DRAFTS)
def test_chains_stop_where_the_draft_is_unsure_and_stay_exact(engines, reference, draft):
    """A threshold on the draft's cumulative top probability shortens some chains, not all, and the
    output is still the target's own."""
    got, drafted, rounds = [], np.zeros(4), []
    for i in range(0, 100, 10):
        outs = engines[draft].generate(token_ids=prompts(100)[i:i + 10], max_tokens=40, stop_at_eos=False,
                                       draft_length=4, draft_confidence=0.2, observer=rounds.append)
        got += [o.token_ids for o in outs]
        drafted += outs[0].stats["drafted_per_position"][:4]
    assert got == reference
    assert drafted[3] < drafted[0] / 2 and drafted[3] > 0, drafted  # these drafts are sure now and then
    # a round records the k each sequence was offered apart from what it drafted (auto weighs the former)
    pairs = [(o, d) for r in rounds for o, d in zip(r.offered, r.drafted)]
    assert all(d <= o <= 4 for o, d in pairs) and any(d < o == 4 for o, d in pairs)


def test_chain_stop_keeps_each_sequence_its_confident_prefix():
    from mlc_spec.runtime.speculative import ChainStop, SamplingParams, Sequence

    seqs = [Sequence(i, [1], np.random.default_rng(0), SamplingParams(1.0), c) for i, c in enumerate((0.0, 0.5, 0.3))]
    stop = ChainStop(seqs)
    q_rows = [np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]]), np.array([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])]
    assert stop.extend(None, q_rows[0])  # cumulative 0.9, 0.6, 0.8: all go on
    assert stop.extend(None, q_rows[1])  # 0.45, 0.54, 0.4: all go on
    q_rows.append(np.array([[0.5, 0.5], [0.5, 0.5], [0.7, 0.3]]))
    assert stop.extend(None, q_rows[2])  # 0.225, 0.27 (< 0.5: stops), 0.28 (< 0.3: stops); the first goes on
    drafts, q = stop.chains([np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8, 9])], q_rows)
    assert drafts == [[1, 4, 7], [2, 5], [3, 6]]
    assert q.tolist() == [[0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1], [0.8, 0.2], [0.5, 0.5]]
    everyone_stops = ChainStop(seqs[1:])
    assert not everyone_stops.extend(None, np.array([[0.4, 0.1], [0.2, 0.1]]))  # below 0.5 and 0.3 at once
    assert everyone_stops.chains([np.array([1, 2])], [np.array([[0.4, 0.1], [0.2, 0.1]])])[0] == [[], []]


# -- FM9: adaptive draft length ----------------------------------------------------------------------------------
def test_auto_draft_length_is_exact_and_stops_drafting_when_it_does_not_pay(engines, reference):
    """On these tiny models a draft step costs as much as a target step (both are call overhead), so a
    draft that is sometimes wrong cannot pay: auto settles on the target alone, probing now and then.
    (The self-draft, always right, breaks exactly even: k+1 tokens for k+1 calls; only exactness holds.)"""
    batch = prompts(100)[:8]
    for name in DRAFTS:
        outs = engines[name].generate(token_ids=batch, max_tokens=40, stop_at_eos=False, draft_length="auto")
        assert [o.token_ids for o in outs] == reference[:8]
        stats = outs[0].stats
        if name != "self":
            assert sum(stats["drafted_per_position"]) / stats["rounds"] < 1.0, (name, stats["drafted_per_position"])


def _measure_plain(ctl, seconds: float, rest: float = 0.0):
    """The target alone's first rounds, which the controller measures before modelling anything."""
    from mlc_spec.runtime.adaptive import FIRST_SAMPLES

    for _ in range(FIRST_SAMPLES):
        ctl.update(_round([0], [0], 0.0, seconds, rest))


def _round(drafted, accepted, draft_seconds, verify_seconds, rest_seconds=0.0, offered=None):
    from mlc_spec.runtime.speculative import RoundStats

    return RoundStats(drafted, accepted, draft_seconds, verify_seconds,
                      seconds=draft_seconds + verify_seconds + rest_seconds, offered=offered or drafted)


def test_adaptive_controller_prefers_the_target_alone_for_a_useless_draft():
    from mlc_spec.runtime.adaptive import PROBE_EVERY, AdaptiveDraftLength

    ctl = AdaptiveDraftLength(8)
    assert ctl.choose(8) == 0
    _measure_plain(ctl, 0.010)
    assert ctl.choose(8) == 1
    for _ in range(20):
        ctl.update(_round([1], [0], 0.004, 0.012))
    choices = [ctl.choose(8) for _ in range(2 * PROBE_EVERY)]
    assert choices.count(0) == 2 * PROBE_EVERY - 2 and choices.count(1) == 2  # probes only
    gaps = []  # probes that find no agreement come ever more rarely
    for _ in range(3):
        gaps.append(next(n for n in range(1, 10 * PROBE_EVERY) if ctl.choose(8) == 1))
        ctl.update(_round([1], [0], 0.004, 0.012))
    assert gaps[1] == 2 * gaps[0] and gaps[2] == 2 * gaps[1], gaps
    for _ in range(40):  # the draft starts agreeing and is cheap: drafting pays again
        ctl.update(_round([1], [1], 0.001, 0.011))
    assert ctl.choose(8) >= 1


@pytest.mark.parametrize("drafting_rest,drafts", [(0.001, True), (0.006, False)])
def test_adaptive_controller_counts_the_whole_round(drafting_rest, drafts):
    """A draft agreeing 0.4 of the time yields 1.4 tokens for 12 ms of draft and verify against 1 for 11 ms
    of decode and host: it pays, unless the rest of a drafting round (host work, the draft's catch-up)
    takes 6 ms where a plain round's takes 1."""
    from mlc_spec.runtime.adaptive import AdaptiveDraftLength

    ctl = AdaptiveDraftLength(1)
    _measure_plain(ctl, 0.010, 0.001)
    for i in range(50):
        ctl.update(_round([1], [int(i % 5 < 2)], 0.001, 0.011, drafting_rest))
    assert (ctl.choose(1) == 1) == drafts


def test_adaptive_controller_measures_both_first_on_several_rounds():
    """The plain step and one draft step alternate for FIRST_SAMPLES rounds each, and those rounds count
    alike: a draft whose first round was slow (20 ms, then 10.5 ms twice; accepted in two of the three)
    is chosen on their mean (1.6 tokens in 13.7 ms: 119/s against the plain 100/s), where a running
    average started at the first round (18.2 ms: 89/s) would have run the target alone."""
    from mlc_spec.runtime.adaptive import FIRST_SAMPLES, AdaptiveDraftLength

    assert FIRST_SAMPLES == 3
    ctl, chosen = AdaptiveDraftLength(1), []
    drafting = iter([(0.020, 1), (0.0105, 1), (0.0105, 0)])
    for _ in range(2 * FIRST_SAMPLES):
        chosen.append(ctl.choose(1))
        seconds, accepted = next(drafting) if chosen[-1] else (0.010, 0)
        ctl.update(_round([chosen[-1]], [accepted], 0.0, seconds))
    assert chosen == [0, 1] * FIRST_SAMPLES
    assert ctl.round_cost[1] == pytest.approx(0.041 / 3)
    assert ctl.choose(1) == 1


@pytest.mark.parametrize("round_ms,drafts", [(14.0, True), (16.0, False)])
def test_adaptive_controller_counts_chains_the_draft_stopped(round_ms, drafts):
    """Offered one draft, the draft stops its chain in half the rounds and is right in the other half: a
    round offered k = 1 yields 1.5 tokens, not the 2 its drafted positions alone suggest. In 14 ms that
    beats 1 token in 10 ms; in 16 ms it does not (2 tokens would)."""
    from mlc_spec.runtime.adaptive import AdaptiveDraftLength

    ctl = AdaptiveDraftLength(1)
    _measure_plain(ctl, 0.010)
    for i in range(50):
        stopped = i % 2 == 0
        ctl.update(_round([0 if stopped else 1], [0 if stopped else 1], 0.002, round_ms / 1000 - 0.002, offered=[1]))
    assert ctl.reach()[0] == pytest.approx(0.5, abs=0.05)
    assert (ctl.choose(1) == 1) == drafts


def test_adaptive_controller_measures_a_longer_chain_before_choosing_it():
    """Where one draft pays, two are tried once, then chosen or not by what they cost: never by a guess."""
    from mlc_spec.runtime.adaptive import AdaptiveDraftLength

    ctl = AdaptiveDraftLength(8)
    _measure_plain(ctl, 0.010)
    for _ in range(10):
        ctl.update(_round([1], [1], 0.001, 0.011))
    assert ctl.choose(8) == 2
    ctl.update(_round([2], [1], 0.002, 0.030))  # the second draft failed and the round was slow
    assert [ctl.choose(8) for _ in range(5)] == [1] * 5


def test_adaptive_controller_is_not_fooled_by_one_slow_round():
    """One plain round slowed by a 90 ms pause of the process does not hand the rounds to a draft that
    never agrees (it would, at face value: 19 ms per plain token against 12 ms per drafting round); and
    while drafting wins, a round of the target alone every PROBE_EVERY keeps the plain cost measured."""
    from mlc_spec.runtime.adaptive import PROBE_EVERY, AdaptiveDraftLength

    ctl = AdaptiveDraftLength(1)
    _measure_plain(ctl, 0.010)
    for _ in range(20):
        ctl.update(_round([1], [0], 0.002, 0.010))
    ctl.update(_round([0], [0], 0.0, 0.100))
    assert ctl.choose(1) == 0
    ctl = AdaptiveDraftLength(1)
    _measure_plain(ctl, 0.010)
    for _ in range(10):
        ctl.update(_round([1], [1], 0.001, 0.010))
    choices = [ctl.choose(1) for _ in range(2 * PROBE_EVERY)]
    assert choices.count(0) == 2 and choices[PROBE_EVERY - 1] == choices[-1] == 0


def test_adaptive_controller_probes_an_unlucky_draft_soon():
    """A draft rejected on its first three rounds (1 token in 12.5 ms against 10 ms plain) looks useless,
    but three tries cannot rule out the rate at which it agrees later (half the time: 1.5 tokens in
    12.5 ms beats the plain 1 in 10): it is probed every PROBE_SOON rounds, not every PROBE_EVERY and
    ever more rarely, and is drafting by the end of a hundred rounds."""
    from mlc_spec.runtime.adaptive import FIRST_SAMPLES, PROBE_EVERY, PROBE_SOON, AdaptiveDraftLength

    ctl = AdaptiveDraftLength(1)
    _measure_plain(ctl, 0.010)
    for _ in range(FIRST_SAMPLES):
        ctl.update(_round([1], [0], 0.002, 0.0105))
    chosen, probes = [], 0
    for _ in range(100):
        chosen.append(ctl.choose(1))
        if chosen[-1]:
            probes += 1
            ctl.update(_round([1], [probes % 2], 0.002, 0.0105))
        else:
            ctl.update(_round([0], [0], 0.0, 0.010))
    assert PROBE_SOON < PROBE_EVERY and chosen[:PROBE_SOON] == [0] * (PROBE_SOON - 1) + [1]
    assert sum(chosen[-2 * PROBE_EVERY:]) >= 2 * PROBE_EVERY - 2, chosen  # the target alone only to re-measure it


def test_adaptive_controller_drafts_deeper_once_its_first_drafts_agree():
    """Acceptance is counted (not a slow running average), and positions never drafted are expected to
    do as well as the one before: a cheap draft whose first rounds all agreed is given more than one
    token at once, where a 0.5 prior for the untried positions would keep it at k = 1."""
    from mlc_spec.runtime.adaptive import FIRST_SAMPLES, AdaptiveDraftLength

    ctl = AdaptiveDraftLength(8)
    _measure_plain(ctl, 0.010)
    for _ in range(FIRST_SAMPLES):
        ctl.update(_round([1], [1], 0.002, 0.011))
    reach = (FIRST_SAMPLES + 0.5) / (FIRST_SAMPLES + 1)
    assert ctl.reach()[0] == pytest.approx(reach, abs=0.01) and ctl.reach()[3] == pytest.approx(reach, abs=0.01)
    assert ctl.choose(8) >= 2


# -- token trees ------------------------------------------------------------------------------------------------
TREE_SHAPES = [(1, 4), (2, 3), (3, 3), (4, 2)]  # (width, depth); width 1 is the chain of length depth


@pytest.mark.parametrize("width,depth", TREE_SHAPES)
def test_greedy_tree_equals_target_alone(engines, reference, width, depth):
    got = generate_all(engines["partial"], prompts(100), max_tokens=40, stop_at_eos=False, speculative="tree",
                       tree_width=width, tree_depth=depth)
    mismatched = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
    assert not mismatched, f"{len(mismatched)} of 100 prompts differ, first {mismatched[:5]}"


def test_greedy_tree_with_an_always_agreeing_draft(engines, reference):
    """FM2 for trees: every level accepted, so the draft never saw the deepest node before the next round.
    Each level expands the likeliest paths, which need not hold the target's own when the draft is
    unsure, so most rounds, not all, accept every level."""
    outs = engines["self"].generate(token_ids=prompts(100)[:8], max_tokens=40, stop_at_eos=False,
                                    speculative="tree", tree_width=2, tree_depth=4)
    assert [o.token_ids for o in outs] == reference[:8]
    stats = outs[0].stats
    assert stats["accepted_per_position"][3] >= 0.8 * stats["drafted_per_position"][3] > 0


def test_width_one_tree_is_the_chain(engines):
    """Same tokens and the same acceptance at every position as a chain of length depth."""
    batch = prompts(16, seed=4)
    chain = engines["partial"].generate(token_ids=batch, max_tokens=40, stop_at_eos=False, draft_length=4)
    tree = engines["partial"].generate(token_ids=batch, max_tokens=40, stop_at_eos=False, speculative="tree",
                                       tree_width=1, tree_depth=4)
    assert [o.token_ids for o in tree] == [o.token_ids for o in chain]
    assert tree[0].stats["accepted_per_position"] == chain[0].stats["accepted_per_position"]
    assert tree[0].stats["rounds"] == chain[0].stats["rounds"]


def test_wider_trees_accept_more_per_target_forward(engines):
    batch = prompts(16, seed=6)

    def mean_accepted(width):  # batches of 4: four trees of 37 nodes fit one forward
        return np.mean([engines["partial"].generate(token_ids=batch[i:i + 4], max_tokens=40, stop_at_eos=False,
                                                    speculative="tree", tree_width=width, tree_depth=3)[0]
                        .stats["mean_accepted_length"] for i in range(0, len(batch), 4)])

    lengths = [mean_accepted(width) for width in (1, 2, 4)]
    assert lengths[0] < lengths[1] < lengths[2], lengths


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_tree_round_leaves_the_caches_on_the_committed_tokens(engines, temperature):
    """FM1 for trees: after each round the target holds exactly the accepted path (all committed tokens
    but the last), the draft a prefix of them, and the next step's logits equal a fresh prefill's."""
    from mlc_spec.runtime.speculative import DraftTree, SamplingParams, Sequence, SpeculativeDecoder

    engine = engines["partial"]
    decoder = SpeculativeDecoder(engine.target, DraftTree(engine.draft, engine.prefill_chunk, width=3))
    params = SamplingParams(temperature=temperature)
    with engine.session() as session, engine.session() as fresh:
        session.tokens[:] = prompts(100)[21]
        seq = Sequence(session.seq_id, session.tokens, np.random.default_rng(0), params)
        for m in (engine.target, engine.draft):
            m.prefill(seq, 64)
        accepted = []
        for _ in range(12):
            stats = decoder.round([seq], 3)
            accepted += stats.accepted
            assert engine.target.cached(seq) == len(seq.tokens) - 1
            assert engine.draft.cached(seq) == len(seq.tokens) - len(stats.tokens[0])  # up to the round's root
        assert 0 < sum(accepted) < 3 * len(accepted)  # partial acceptance, where rollback bugs live
        fresh.tokens[:] = list(seq.tokens)
        fseq = Sequence(fresh.seq_id, fresh.tokens, np.random.default_rng(0), params)
        engine.target.prefill(fseq, 64)
        lib = engine.target.lib
        a = lib.forward_last(engine.target.kv, [seq.seq_id], [[seq.tokens[-1]]]).numpy()
        b = lib.forward_last(engine.target.kv, [fseq.seq_id], [[fseq.tokens[-1]]]).numpy()
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_failed_tree_verify_leaves_the_caches_usable(engines, reference, monkeypatch):
    """An error between the target's tree forward and its commit discards the tree: the cache keeps the
    committed tokens and TVM accepts the next forward."""
    engine = engines["partial"]
    fail_kernel_call(monkeypatch, engine.target.lib, "tree_verify_greedy", 3)
    prompt = prompts(100)[7]
    with engine.session() as session:
        with pytest.raises(RuntimeError, match="injected"):
            session.generate(token_ids=prompt, max_tokens=40, stop_at_eos=False, speculative="tree")
        check_caches_consistent(engine, session)
        out = session.generate(token_ids=prompt, max_tokens=40, stop_at_eos=False, speculative="tree")
    assert out.token_ids == reference[7]


def test_sampled_tree_with_top_k_one_is_the_greedy_output(engines, reference):
    """top_k = 1 leaves q and p one token each: fewer tokens than the tree is wide, and sampling that can
    only emit the target's argmax."""
    got = generate_all(engines["partial"], prompts(100)[:16], max_tokens=40, stop_at_eos=False, speculative="tree",
                       tree_width=3, tree_depth=3, temperature=1.0, top_k=1, seed=0)
    assert got == reference[:16]


def test_tree_options_are_validated(engines):
    engine = engines["partial"]
    for bad, message in ((dict(tree_width=0), "tree_width must be >= 1"),
                         (dict(tree_depth=0), "tree_depth must be between 1 and 32"),
                         (dict(tree_width=2.5), "tree_width must be an integer"),
                         (dict(tree_width=1, tree_depth=33), "tree_depth must be between 1 and 32")):
        with pytest.raises(ValueError, match=message):
            engine.generate(token_ids=[5], speculative="tree", **bad)
    with pytest.raises(ValueError, match="has 265 nodes; TVM's tree attention takes at most 256"):
        engine.generate(token_ids=[5], speculative="tree", tree_width=8, tree_depth=5)
    engine.generate(token_ids=[5], speculative="tree", tree_width=8, tree_depth=4, max_tokens=2)  # 201 nodes fit
    # three trees of 201 nodes overflow one 512-token forward: the batch verifies them in two, still exact
    batch = prompts(3, seed=4)
    outs = engine.generate(token_ids=batch, speculative="tree", tree_width=8, tree_depth=4, max_tokens=12,
                           stop_at_eos=False)
    alone = engine.generate(token_ids=batch, speculative=False, max_tokens=12, stop_at_eos=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]


def test_auto_draft_length_carries_over_between_requests(engines, reference):
    """auto's controller belongs to the engine: once a request has found the draft useless, the next
    short request neither re-measures it nor probes it, and its output is still the target's."""
    engine, batch = engines["random"], prompts(100)
    engine.generate(token_ids=batch[:8], max_tokens=40, stop_at_eos=False, draft_length="auto")
    out = engine.generate(token_ids=batch[0], max_tokens=10, stop_at_eos=False, draft_length="auto")
    assert out.token_ids == reference[0][:10]
    assert sum(out.stats["drafted_per_position"]) == 0, out.stats["drafted_per_position"]
