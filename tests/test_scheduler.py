"""Continuous batching (runtime/scheduler.py): requests that join a running batch at any step, each with
its own sampling options and draft length, get what they would get alone; cancelled and finished ones
give their cache pages back; a full queue is refused."""

from __future__ import annotations

import threading

import pytest

from helpers import fail_kernel_call, prompts
from mlc_spec import Engine
from mlc_spec.runtime.engine import GenerateOptions
from mlc_spec.runtime.scheduler import Batch, QueueFull, Request, Scheduler


@pytest.fixture(scope="module")
def engine(partial_artifact) -> Engine:
    return Engine(partial_artifact, max_batch_size=8)


# greedy and sampled, drafting and not, chains of different k, n-gram lookup and a tree, different lengths
MIXED = [dict(max_tokens=20), dict(max_tokens=9, speculative=False),
         dict(max_tokens=16, temperature=0.8, seed=3, draft_length=2),
         dict(max_tokens=24, temperature=1.2, top_k=20, top_p=0.9, seed=4, draft_length=5),
         dict(max_tokens=12, temperature=0.7, seed=5, speculative=False),
         dict(max_tokens=18, speculative="ngram", draft_length=3),
         dict(max_tokens=14, speculative="tree", tree_width=2, tree_depth=3),
         dict(max_tokens=20, draft_length="auto")]


def alone(engine, prompt, options) -> list[int]:
    return engine.generate(token_ids=prompt, stop_at_eos=False, **options).token_ids


def run_staggered(engine, batch_prompts, options, joins_at) -> list[list[int]]:
    """A Batch where request i joins at step joins_at[i], each with its own options."""
    batch = Batch(engine)
    requests = [Request(engine, p, GenerateOptions.make(stop_at_eos=False, **o)) for p, o in zip(batch_prompts, options)]
    sessions = [engine.session() for _ in requests]
    try:
        step = 0
        while step <= max(joins_at) or batch.active:
            for r, s, at in zip(requests, sessions, joins_at):
                if at == step:
                    r.bind(s)
                    batch.join(r)
            if batch.active:
                batch.step()
            step += 1
        return [r.generated for r in requests]
    finally:
        for s in sessions:
            s.close()


def test_requests_joining_a_running_batch_get_their_outputs_alone(engine):
    """Greedy requests are the target's tokens and seeded sampled ones with a fixed k draw the same
    uniforms, whatever joins, runs beside them or leaves."""
    batch_prompts = prompts(len(MIXED), seed=31)
    want = [alone(engine, p, o) for p, o in zip(batch_prompts, MIXED)]
    got = run_staggered(engine, batch_prompts, MIXED, joins_at=[0, 0, 1, 3, 3, 5, 6, 9])
    assert got == want
    assert all(u["sequences"] == 0 for u in engine.cache_usage().values())


def test_a_batch_mixing_temperatures_keeps_each_distribution(engine):
    """Per-row parameters: a sampled request beside a greedy one and one with another temperature still
    samples as it does alone (FM4: each row gets its own sequence's temperature, top-k and top-p)."""
    p = prompts(3, seed=8)
    options = [dict(max_tokens=16, temperature=1.0, top_k=1, seed=1, draft_length=3),  # top_k 1 is greedy
               dict(max_tokens=16, temperature=5.0, seed=2, draft_length=3),
               dict(max_tokens=16)]
    got = run_staggered(engine, p, options, joins_at=[0, 0, 0])
    assert got[0] == alone(engine, p[0], dict(max_tokens=16, speculative=False))
    assert got[1] == alone(engine, p[1], options[1])


def test_cancelled_requests_free_their_pages_at_the_next_step(engine):
    scheduler = Scheduler(engine, max_waiting=4)
    events, done = [], threading.Event()

    def listener(kind, request):
        events.append(kind)
        if kind == "delta":
            request.cancel()
        else:
            done.set()

    scheduler.start()
    try:
        request = Request(engine, prompts(1, seed=2)[0], GenerateOptions.make(max_tokens=100, stop_at_eos=False))
        scheduler.submit(request, listener)
        assert done.wait(timeout=60)
    finally:
        scheduler.stop()
    assert request.finish_reason == "cancelled" and len(request.generated) < 100
    assert events[-1] == "done"
    assert all(u["sequences"] == 0 and u["free_pages"] == u["total_pages"] for u in engine.cache_usage().values())


def test_the_queue_is_bounded_and_hopeless_requests_are_refused_at_once(engine):
    scheduler = Scheduler(engine, max_waiting=2)  # not started: nothing leaves the queue
    opts = GenerateOptions.make(max_tokens=8)
    for _ in range(2):
        scheduler.submit(Request(engine, [5, 6, 7], opts), lambda *_: None)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        scheduler.submit(Request(engine, [5, 6, 7], opts), lambda *_: None)
    with pytest.raises(ValueError, match="the prompt has 100 tokens and max_tokens is 40, but the KV cache holds 128"):
        scheduler.check_fits(list(range(2, 102)), 40)


def test_a_failed_step_fails_its_requests_and_the_scheduler_serves_on(engine, monkeypatch):
    fail_kernel_call(monkeypatch, engine.target.lib, "verify_greedy", 2)  # the first request's second round
    finished = {}
    done = threading.Semaphore(0)

    def listener(kind, request):
        if kind != "delta":
            finished[request.id] = (kind, request.error)
            done.release()

    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        opts = GenerateOptions.make(max_tokens=6, stop_at_eos=False, speculative=False)
        failing = Request(engine, [5, 6, 7], opts)
        scheduler.submit(failing, listener)
        assert done.acquire(timeout=60)
        later = Request(engine, [5, 6, 7], opts)
        scheduler.submit(later, listener)
        assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    assert finished[failing.id] == ("error", "generation failed: injected")
    assert finished[later.id] == ("done", None)
    assert later.generated == alone(engine, [5, 6, 7], dict(max_tokens=6, speculative=False))
    assert all(u["sequences"] == 0 for u in engine.cache_usage().values())
