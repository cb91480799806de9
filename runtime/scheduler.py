"""Continuous batching: the one generation loop, for the Python API and the server alike.

A Batch holds the running requests. Each step, under the engine's lock, prefills the requests that
joined since the last one, then runs one speculative round over everything running; a request leaves
as soon as it finishes, without waiting for the others. Engine.generate is a Batch whose requests all
join at step 0, run to the end by the caller's thread; the Scheduler is a Batch run by a worker thread
that admits requests from a bounded queue as sequence slots free up (mlc_spec serve).

Each request keeps its own sampling parameters, seed, stops, max_tokens and draft length in the shared
verify forward. Requests are grouped by what proposes their drafts (the draft model's chains, n-gram
lookup, token trees of one shape): one round per group and step, the target alone riding along in a
chain group's forward with no drafts. So a greedy request's tokens are the target's whatever runs beside
it, and a seeded sampled one with a fixed draft length draws the same uniforms and makes the same
decisions alone or in any batch (docs/exactness.md).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable

import numpy as np
import tvm
from tokenizers import Tokenizer

from .kv_cache import CacheFullError
from .library import last_line
from .speculative import (DraftModel, DraftTree, FeatureDraft, FeatureModel, FeatureTree, NGramDraft, RoundStats,
                          Sequence, SpeculativeDecoder, tree_size)

MAX_DRAFT_LENGTH = 32  # the longest chain a request may ask for; Stats counts that many positions


class Stats:
    """Acceptance and timing over the rounds of one or more generations."""

    def __init__(self):
        self.drafted_at = np.zeros(MAX_DRAFT_LENGTH, np.int64)
        self.accepted_at = np.zeros(MAX_DRAFT_LENGTH, np.int64)
        self.rounds = 0
        self.target_calls_tokens = 0
        self.tokens = 0
        self.draft_seconds = 0.0
        self.verify_seconds = 0.0
        self.total_seconds = 0.0

    def add_round(self, r: RoundStats) -> None:
        for drafted, n in zip(r.drafted, r.accepted):
            self.add_sequence_round(drafted, n)
        self.draft_seconds += r.draft_seconds + r.catch_up_seconds
        self.verify_seconds += r.verify_seconds

    def add_sequence_round(self, drafted: int, accepted: int) -> None:
        """One sequence's part of a round: its drafts and how many of them the target accepted."""
        self.drafted_at[:drafted] += 1
        self.accepted_at[:accepted] += 1
        self.rounds += 1
        self.target_calls_tokens += accepted + 1

    def merge(self, other: "Stats") -> None:
        """Add another run's counts and times to these (a conversation's totals over its turns)."""
        self.drafted_at += other.drafted_at
        self.accepted_at += other.accepted_at
        for name in ("rounds", "target_calls_tokens", "tokens", "draft_seconds", "verify_seconds", "total_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        drafted = int(self.drafted_at.sum())
        return {
            "acceptance_rate": float(self.accepted_at.sum() / drafted) if drafted else 0.0,
            "mean_accepted_length": self.target_calls_tokens / self.rounds if self.rounds else 0.0,
            "tokens_per_second": self.tokens / self.total_seconds if self.total_seconds else 0.0,
            "drafted_per_position": self.drafted_at.tolist(),
            "accepted_per_position": self.accepted_at.tolist(),
            "acceptance_per_position": [float(a / d) if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)],
            "rounds": self.rounds,
            "tokens": self.tokens,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "total_seconds": self.total_seconds,
        }


def check_prompt(engine, prompt: list[int]) -> None:
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt) >= engine.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the KV cache holds {engine.max_seq_len} "
                         "per sequence; shorten the prompt or recompile with a larger --max-seq-len")
    vocab = engine.target.lib.vocab_size
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise ValueError(f"token id {max(prompt) if max(prompt) >= vocab else min(prompt)} is outside the vocabulary (0..{vocab - 1})")


def proposer_key(engine, opts) -> tuple | None:
    """What proposes a request's drafts: None (the target alone), ("draft",), ("ngram", n) or ("tree",
    width, depth, sampling): a tree round takes one shape and one set of sampling parameters."""
    if opts.speculative in ("draft", "tree") and engine.draft is None:
        raise ValueError(f"{engine.folder} has no draft model; use speculative='ngram' or compile with --draft")
    if opts.speculative is False:
        return None
    if opts.speculative == "tree" and not engine.drafts_trees:
        raise ValueError(f"{engine.folder}'s feature draft was compiled before feature drafts proposed trees; "
                         "recompile it with `mlc_spec compile`, or use speculative='draft'")
    if opts.speculative == "tree":
        return ("tree", opts.tree_width, opts.tree_depth, opts.sampling)
    if opts.speculative == "ngram" or engine.draft is None:
        return ("ngram", opts.ngram_size)
    return ("draft",)


class Request:
    """One sequence's generation: its prompt and options, new tokens, text and stop state. It runs on
    a session (a KV cache sequence) bound when it is admitted."""

    _ids = itertools.count()

    def __init__(self, engine, prompt: list[int], opts, index: int = 0):
        """index: its place in a batch given one seed, so that each of them draws its own uniforms."""
        check_prompt(engine, prompt)
        self.id = next(self._ids)
        self.prompt = prompt
        self.opts = opts
        self.key = proposer_key(engine, opts)
        self.rng = np.random.default_rng(np.random.SeedSequence(opts.seed, spawn_key=(index,)))
        self.detok = IncrementalDetokenizer(engine.tokenizer)
        self.eos_ids = engine.eos_ids if opts.stop_at_eos else frozenset()
        self.session = None
        self.seq: Sequence | None = None
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.decoded = ""  # the text of every token taken
        self.text = ""  # what was given out: decoded, less a held-back possible beginning of a stop string
        self.stats = Stats()
        self.cancelled = False  # set by any thread; the batch drops the request at its next step
        self.listener: Callable[[str, "Request"], None] | None = None  # the Scheduler's per-request events
        self.admitted_at: float | None = None
        self.error: str | None = None  # why it failed, with finish_reason "error"

    def bind(self, session) -> None:
        self.session = session
        self.seq = Sequence(session.seq_id, session.tokens, self.rng, self.opts.sampling, self.opts.chain_confidence)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def speculates(self) -> bool:
        return self.key is not None

    @property
    def generated(self) -> list[int]:
        return self.session.tokens[len(self.prompt):] if self.session is not None else []

    def accept(self, new_tokens: list[int], max_seq_len: int) -> tuple[str, int]:
        """Take committed tokens one by one until a stop; returns the text delta and how many were kept.
        Text that may begin a stop string still being completed is held back from the delta: what was
        streamed cannot be taken back."""
        for i, token in enumerate(new_tokens):
            n_generated = len(self.generated) - len(new_tokens) + i + 1
            if token in self.eos_ids:
                self.finish_reason = "stop"
                return self.decoded[len(self.text):], i + 1
            searched = len(self.decoded)
            self.decoded += self.detok.add(token)
            cut = _find_stop(self.decoded, self.opts.stop, searched)
            if cut is not None:
                self.finish_reason = "stop"
                return self.decoded[len(self.text):cut], i + 1
            if n_generated >= self.opts.max_tokens or len(self.prompt) + n_generated >= max_seq_len:
                self.finish_reason = "length"
                return self.decoded[len(self.text):], i + 1
        return self.decoded[len(self.text):len(self.decoded) - _stop_beginning(self.decoded, self.opts.stop)], len(new_tokens)


def _find_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Where the first stop string ending in the new part of the text begins."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (best is None or at < best):
            best = at
    return best


def _stop_beginning(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of the text that begins a stop string."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


class Batch:
    """The running requests and the loop over them (see the module's docstring). Between steps both
    caches of every sequence hold a prefix of its committed tokens."""

    def __init__(self, engine):
        self.engine = engine
        self.stats = Stats()
        self.joining: list[Request] = []
        self.running: list[Request] = []
        self._decoders: dict[tuple | None, SpeculativeDecoder] = {}

    @property
    def active(self) -> bool:
        return bool(self.joining or self.running)

    def __len__(self) -> int:
        return len(self.joining) + len(self.running)

    def join(self, request: Request) -> None:
        """Join at the next step (its session bound)."""
        self.joining.append(request)

    def step(self) -> list[tuple[Request, str]]:
        """Prefill the newcomers and run one round over every group; each request's text delta. Finished
        and cancelled requests leave the batch (their finish_reason set). After an error (or a Ctrl-C)
        inside the step, every cache is settled and the error raised."""
        with self.engine._exclusive():
            if any(r.session._closed for r in self.joining + self.running):
                raise RuntimeError("the session was closed while this stream was suspended")
            out = []
            for r in self.joining + self.running:
                if r.cancelled:
                    r.finish_reason = "cancelled"
                    out.append((r, ""))
            self.joining = [r for r in self.joining if not r.cancelled]
            self.running = [r for r in self.running if not r.cancelled]
            try:
                while self.joining:
                    self._prefill(self.joining[0])
                    self.running.append(self.joining.pop(0))
                for key, group in self._groups().items():
                    out += self._round(key, group)
            except BaseException:
                for r in self.joining + self.running:
                    self._settle(r)
                raise
            self.running = [r for r in self.running if r.finish_reason is None]
            return out

    def _prefill(self, req: Request) -> None:
        session, prompt = req.session, req.prompt
        common = _common_prefix(session.tokens, prompt)
        session.tokens[:] = prompt
        # every model, a draft this request does not run too: a later one reuses its cache
        for m in self.engine._models():
            m.keep(req.seq, min(common, len(prompt) - 1))
        # The draft is fed by its proposer's catch-up when a round first drafts: under
        # draft_length="auto" a draft that does not pay never reads the prompt at all.
        self.engine.target.prefill(req.seq, self.engine.prefill_chunk)

    def _groups(self) -> dict[tuple | None, list[Request]]:
        """The running requests by proposer; the target-only ones join a chain group's forward."""
        groups: dict[tuple | None, list[Request]] = {}
        for r in self.running:
            groups.setdefault(r.key, []).append(r)
        chain = next((key for key in groups if key is not None and key[0] != "tree"), None)
        if chain is not None and None in groups:
            groups[chain] += groups.pop(None)
        return groups

    def _decoder(self, key: tuple | None) -> SpeculativeDecoder:
        if key not in self._decoders:
            engine = self.engine
            if key is None:
                proposer = None
            elif key[0] == "tree" and isinstance(engine.draft, FeatureModel):
                proposer = FeatureTree(engine.draft, engine.target, engine.prefill_chunk, key[1])
            elif key[0] == "tree":
                proposer = DraftTree(engine.draft, engine.prefill_chunk, key[1])
            elif key[0] == "ngram":
                proposer = NGramDraft(engine.target.lib.vocab_size, max_ngram=key[1])
            elif isinstance(engine.draft, FeatureModel):
                proposer = FeatureDraft(engine.draft, engine.target, engine.prefill_chunk)
            else:
                proposer = DraftModel(engine.draft, engine.prefill_chunk)
            self._decoders[key] = SpeculativeDecoder(engine.target, proposer)
        return self._decoders[key]

    def _round(self, key, group: list[Request]) -> list[tuple[Request, str]]:
        """One speculative round over a group, in as many forwards as its tokens need."""
        decoder = self._decoder(key)
        tree = key is not None and key[0] == "tree"
        adaptive = (self.engine.auto_draft_length(decoder.proposer)
                    if decoder.proposer is not None and not tree else None)
        ks = self._draft_lengths(group, decoder, adaptive, tree)
        out = []
        for part in self._forwards(group, ks, decoder, tree):
            rstats = decoder.round([group[i].seq for i in part], [ks[i] for i in part])
            self.stats.add_round(rstats)
            if adaptive is not None and any(group[i].opts.draft_length == "auto" for i in part):
                adaptive.update(rstats)
            for observer in dict.fromkeys(group[i].opts.observer for i in part):
                if observer is not None:
                    observer(rstats)
            for i, tokens, drafted, accepted in zip(part, rstats.tokens, rstats.drafted, rstats.accepted):
                out.append((group[i], self._take(group[i], tokens)))
                group[i].stats.add_sequence_round(drafted, accepted)
        return out

    def _take(self, req: Request, tokens: list[int]) -> str:
        """A round's committed tokens up to the request's stop; its text delta."""
        delta, kept = req.accept(tokens, self.engine.max_seq_len)
        drop = len(tokens) - kept
        if drop > 0:  # a stop inside an accepted run: forget what came after it, in the caches too
            del req.session.tokens[-drop:]
            for m in self.engine._models():
                m.sync(req.seq)
        req.text += delta
        self.stats.tokens += kept
        req.stats.tokens += kept
        return delta

    def _draft_lengths(self, group: list[Request], decoder, adaptive, tree: bool) -> list[int]:
        """Each request's k (or its tree's depth): never drafting past its max_tokens or the cache's
        per-sequence length; 0 for the target alone. "auto" chooses one k for the group."""
        if decoder.proposer is None:
            return [0] * len(group)
        rooms = [max(0, min(r.opts.max_tokens - len(r.generated), self.engine.max_seq_len - len(r.session.tokens)) - 1)
                 for r in group]
        if tree:
            return [min(r.opts.tree_depth, room) for r, room in zip(group, rooms)]
        auto_rooms = [room for r, room in zip(group, rooms) if r.speculates and r.opts.draft_length == "auto"]
        k_auto = adaptive.choose(max(auto_rooms)) if auto_rooms else 0
        return [min(k_auto if r.opts.draft_length == "auto" else r.opts.draft_length, room) if r.speculates else 0
                for r, room in zip(group, rooms)]

    def _forwards(self, group: list[Request], ks: list[int], decoder, tree: bool) -> list[list[int]]:
        """The group's requests split into runs whose tokens fit one forward (the artifact's prefill chunk);
        a tree round takes one depth, so trees cut short by their room run apart from the others."""
        width = decoder.proposer.width if tree else 1
        runs = [[i for i, k in enumerate(ks) if k == depth] for depth in sorted(set(ks))] if tree else [list(range(len(ks)))]
        parts = []
        for run in runs:
            parts.append([])
            size = 0
            for i in run:
                tokens = tree_size(width, ks[i]) if tree else ks[i] + 1
                if parts[-1] and size + tokens > self.engine.prefill_chunk:
                    parts.append([])
                    size = 0
                parts[-1].append(i)
                size += tokens
        return parts

    def _settle(self, req: Request) -> None:
        """After an error: both caches hold a prefix of the committed tokens."""
        if not req.session._closed:
            for m in self.engine._models():
                m.sync(req.seq)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full: try again later."""


class Scheduler:
    """Continuous batching as a service: one worker thread owns the batch and runs its steps while
    anything is running; submit() from any thread queues a request, which joins the batch at the next
    step with a free sequence slot. Each request's listener is called on the worker thread with
    ("delta", request) after a step that gave it text, then once with ("done", request) or
    ("error", request) (request.error holds the message)."""

    def __init__(self, engine, max_waiting: int = 64, log: Callable[[str], None] | None = None):
        self.engine = engine
        self.batch = Batch(engine)
        self.max_waiting = max_waiting
        self.log = log or (lambda _line: None)
        self.finished: collections.Counter[str] = collections.Counter()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mlc_spec-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the worker after its current step; what is still running or waiting is cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def check_fits(self, prompt: list[int], max_tokens: int) -> None:
        """Refuse a request whose prompt and max_tokens together can never fit a sequence of the cache."""
        check_prompt(self.engine, prompt)
        limit = self.engine.max_seq_len
        if len(prompt) + max_tokens > limit:
            raise ValueError(f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}, but the KV cache "
                             f"holds {limit} tokens per sequence; lower max_tokens to at most {limit - len(prompt)} "
                             "or shorten the prompt")

    def submit(self, request: Request, listener: Callable[[str, Request], None]) -> None:
        """Queue a request; QueueFull when max_waiting are already waiting."""
        self.check_fits(request.prompt, request.opts.max_tokens)
        request.listener = listener
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry shortly")
            self._waiting.append(request)
            self._cond.notify()

    def counts(self) -> dict:
        with self._cond:
            return {"running": len(self.batch), "waiting": len(self._waiting)}

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._waiting or self.batch.active)
                if self._stopping:
                    break
            self._admit()
            if not self.batch.active:
                continue
            try:
                stepped = self.batch.step()
            except Exception as err:  # noqa: BLE001  (a failed step fails its requests, not the server)
                self._fail_running(err)
                continue
            for request, delta in stepped:
                if delta:
                    request.listener("delta", request)
                if request.finish_reason is not None:
                    self._finish(request)
        for request in self.batch.joining + self.batch.running + list(self._waiting):
            request.finish_reason = "cancelled"
            self._finish(request)

    def _admit(self) -> None:
        while len(self.batch) < self.engine.max_batch_size:
            with self._cond:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled:
                request.finish_reason = "cancelled"
                self._finish(request)
                continue
            try:
                session = self.engine.session()
            except CacheFullError:  # slots held by others (sessions of the Python API): wait for one
                with self._cond:
                    self._waiting.appendleft(request)
                return
            request.bind(session)
            request.admitted_at = time.perf_counter()
            self.batch.join(request)

    def _fail_running(self, err: Exception) -> None:
        for request in self.batch.joining + self.batch.running:
            request.error = f"generation failed: {last_line(err)}"
            request.finish_reason = "error"
            self._finish(request)
        self.batch.joining, self.batch.running = [], []

    def _finish(self, request: Request) -> None:
        if request.session is not None:
            request.session.close()
            request.stats.total_seconds = time.perf_counter() - request.admitted_at
        self.finished[request.finish_reason] += 1
        s = request.stats.as_dict()
        self.log(f"request {request.id}: {len(request.prompt)} prompt tokens, {s['tokens']} output tokens, "
                 f"{s['tokens_per_second']:.1f} tok/s, acceptance {s['acceptance_rate']:.2f}, "
                 f"finish {request.finish_reason}")
        request.listener("error" if request.finish_reason == "error" else "done", request)
        if not self.batch.active:
            trim_memory_pool()


# TVM's pooled allocator, which holds every VM's intermediate buffers, keeps each freed buffer for a
# later one of the same size and frees none: every new prompt length, batch or tree size added buffers
# for good (1000 mixed calls grew a process from 634 MB to 2.9 GB). Its idle buffers are freed after each
# generation; those in use are untouched, so other threads' generations are safe. Freeing only once the
# process had grown ratcheted up (the heap fragments, +42% in 200 calls of tools/soak.py); freeing every
# time holds it flat, and allocating a generation's buffers again is lost in the noise of its forwards.
trim_memory_pool = tvm.get_global_func("vm.builtin.memory_manager.clear")


class IncrementalDetokenizer:
    """Text deltas from a growing token list, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=False)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=False)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]
