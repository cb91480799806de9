"""The Python API: Engine, Session, generate and stream.

An Engine loads an artifact's target (and draft) library and owns one KV cache per model. A Session
is one conversation: its tokens stay in both caches between calls, and a new call reuses the longest
common prefix with what is cached, so a chat turn prefills only what is new. Sessions free their
cache pages when closed or garbage-collected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tvm
from tokenizers import Tokenizer

from ..interface.artifact import ArtifactError, read_artifact
from . import options as check
from .kv_cache import CacheFullError, pages_for
from .library import ModelLibrary, missing_cpu_features, tvm_device
from .adaptive import AdaptiveDraftLength
from .speculative import (MAX_TREE_NODES, DraftModel, DraftTree, FeatureDraft, FeatureModel, Model, NGramDraft,
                          RoundStats, SamplingParams, Sequence, SpeculativeDecoder, tree_size)

AUTO_MAX_DRAFT = 8
MAX_DRAFT_LENGTH = 32  # the longest chain a request may ask for; Stats counts that many positions


@dataclasses.dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stats: dict


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
            self.drafted_at[:drafted] += 1
            self.accepted_at[:n] += 1
            self.rounds += 1
            self.target_calls_tokens += n + 1
        self.draft_seconds += r.draft_seconds + r.catch_up_seconds
        self.verify_seconds += r.verify_seconds

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


class Engine:
    def __init__(self, artifact: str | Path, device: str = "cpu", *, max_batch_size: int = 8,
                 max_seq_len: int | None = None, check_hashes: bool = False):
        """check_hashes: compare every file's sha256 with the artifact's record (sizes are always checked)."""
        self.folder = Path(artifact)
        self.config = read_artifact(self.folder, check_hashes)
        if device != self.config.device:
            raise ArtifactError(f"{self.folder} was compiled for {self.config.device}, not {device}; "
                                f"recompile with --device {device}")
        missing = missing_cpu_features(self.config.cpu_features)
        if missing:
            raise ArtifactError(f"{self.folder} was compiled for a CPU with {', '.join(missing)}, which this one "
                                "lacks; recompile it on this machine")
        self.dev = tvm_device(device)
        build = self.config.build
        self.max_seq_len = (build.max_seq_len if max_seq_len is None
                            else check.integer("max_seq_len", max_seq_len, 1, check.MAX_SEQ_LEN))
        self.page_size = build.page_size
        self.prefill_chunk = build.prefill_chunk_size
        self.max_batch_size = check.integer("max_batch_size", max_batch_size, 1, check.MAX_BATCH_SIZE)
        self.tokenizer = _read_tokenizer(self.folder)
        self.eos_ids = frozenset(self.config.special_tokens.eos_token_ids)
        self.chat_template = self.config.chat_template
        self.target = self._load("target")
        self.draft = self._load("draft") if self.config.has_draft else None
        self._seq_ids = itertools.count()
        self._auto: dict[str, AdaptiveDraftLength] = {}
        # TVM's KV caches and VMs are not thread-safe (two threads generating at once crash the process):
        # every step that touches them holds this lock. Steps, not whole generations, so a stream that
        # one thread leaves suspended does not block the others.
        self._lock = threading.RLock()
        self._depth = 0  # steps this thread has entered and not left (the lock is reentrant)
        self._abandoned: list[int] = []  # sequences of sessions collected without close(), freed at the next step

    def auto_draft_length(self, proposer) -> AdaptiveDraftLength:
        """draft_length="auto"'s controller for this kind of proposer, one per engine: what a request
        learns of costs and acceptance carries over to the next (a chat's turns, a bench's prompts), so
        a short request does not pay again for measuring and probing."""
        return self._auto.setdefault(type(proposer).__name__, AdaptiveDraftLength(AUTO_MAX_DRAFT))

    def _load(self, role: str) -> Model:
        lib = ModelLibrary(self.folder, self.config.models[role], self.config.kernels, self.dev)
        # Slack per sequence for a verify forward's tokens beyond max_seq_len: room for a full token tree.
        pages = pages_for(self.max_seq_len, self.page_size) + pages_for(MAX_TREE_NODES, self.page_size)
        try:
            kv = lib.create_kv_cache(max_batch_size=self.max_batch_size,
                                     max_total_seq_len=pages * self.page_size * self.max_batch_size,
                                     prefill_chunk_size=self.prefill_chunk, page_size=self.page_size)
        except RuntimeError as err:  # TVM reports a failed allocation as an InternalError (std::bad_alloc)
            raise ValueError(f"cannot allocate the {role}'s KV cache for {self.max_batch_size} sequences of "
                             f"{self.max_seq_len} tokens ({_last_line(err)}); lower max_batch_size or max_seq_len") from None
        return (FeatureModel if lib.kind == "eagle" else Model)(lib, kv)

    @property
    def has_draft(self) -> bool:
        return self.draft is not None

    # -- sessions -------------------------------------------------------------------------------------
    def session(self) -> "Session":
        return Session(self)

    def _models(self) -> list[Model]:
        return [self.target] + ([self.draft] if self.draft is not None else [])

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the engine for one step over its caches and VMs (see _lock)."""
        with self._lock:
            self._depth += 1
            try:
                if self._depth == 1:
                    self._free_abandoned()
                yield
            finally:
                self._depth -= 1

    def _add_sequence(self) -> int:
        with self._exclusive():
            seq_id = next(self._seq_ids)
            added = []
            try:
                for m in self._models():
                    m.kv.add_sequence(seq_id)
                    added.append(m)
            except CacheFullError:
                for m in added:
                    m.kv.remove_sequence(seq_id)
                raise
            return seq_id

    def _remove_sequence(self, seq_id: int) -> None:
        with self._lock:
            if self._depth:  # from inside a step: a collected stream closing its session mid-forward
                self._abandon(seq_id)
                return
            with self._exclusive():
                self._drop(seq_id)

    def _abandon(self, seq_id: int) -> None:
        """A session's sequence to free at the next step, not now: the garbage collector may run this
        in the middle of a forward, between TVM's begin_forward and end_forward."""
        self._abandoned.append(seq_id)

    def _free_abandoned(self) -> None:
        while self._abandoned:
            self._drop(self._abandoned.pop())

    def _drop(self, seq_id: int) -> None:
        for m in self._models():
            if seq_id in m.kv.sequences:
                m.remove_sequence(seq_id)

    # -- one-shot generation ----------------------------------------------------------------------------
    def generate(self, prompt: str | list[str] | None = None, *, token_ids: list[int] | list[list[int]] | None = None,
                 **options) -> GenerationOutput | list[GenerationOutput]:
        """Generate for one prompt or a batch (a list): a batch shares one ragged verify forward per round."""
        prompts, single = self._prompts(prompt, token_ids)
        opts = GenerateOptions.make(**options)
        with contextlib.ExitStack() as sessions:
            outs = _run(self, [sessions.enter_context(self.session()) for _ in prompts], prompts, opts)
        return outs[0] if single else outs

    def stream(self, prompt: str | None = None, *, token_ids: list[int] | None = None, **options) -> Iterator[str]:
        """Text deltas as tokens are committed. Closing the iterator early stops generation cleanly."""
        with self.session() as session:
            yield from session.stream(prompt, token_ids=token_ids, **options)

    def _prompts(self, prompt, token_ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (token_ids is None):
            raise ValueError("give either a prompt (text) or token_ids")
        if prompt is not None:
            texts, single = check.text_prompts(prompt)
            return [self.encode(t) for t in texts], single
        return check.token_lists(token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def cache_usage(self) -> dict:
        with self._exclusive():
            return {role: {"sequences": len(m.kv.sequences), "free_pages": m.kv.available_pages(),
                           "total_pages": m.kv.total_pages}
                    for role, m in zip(("target", "draft"), self._models())}


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculative: bool | str = True
    draft_length: int | str = 4
    stop_at_eos: bool = True
    ngram_size: int = 3
    tree_width: int = 2
    tree_depth: int = 4
    observer: Callable[[RoundStats], None] | None = None

    # make's defaults are the fields' own: in the class body these names still hold them.
    @classmethod
    def make(cls, *, max_tokens: int = max_tokens, temperature: float = SamplingParams.temperature,
             top_p: float = SamplingParams.top_p, top_k: int = SamplingParams.top_k, seed: int | None = seed,
             stop: str | list[str] | None = None, speculative: bool | str = speculative,
             draft_length: int | str = draft_length, stop_at_eos: bool = stop_at_eos, ngram_size: int = ngram_size,
             tree_width: int = tree_width, tree_depth: int = tree_depth,
             observer: Callable[[RoundStats], None] | None = observer) -> "GenerateOptions":
        """speculative: True (the draft model, or n-gram lookup when the artifact has none), "draft",
        "ngram", "tree" (the draft model proposes a token tree: tree_width children under every node of
        the first tree_depth levels, verified in one forward; draft_length does not apply), or False (the
        target alone). draft_length: k, or "auto" to choose k each round from measured acceptance and
        costs (runtime/adaptive.py). Sampled tokens depend on k and the tree's shape (the uniforms are
        drawn per round), so a seed reproduces a sampled output with a fixed k or shape; greedy output
        never depends on them. observer: called with every round's RoundStats (each sequence's drafts,
        acceptances and committed tokens, and the round's timing)."""
        sampling = SamplingParams(
            check.real("temperature", temperature, 0.0, hint=" (0 is greedy)"),
            check.real("top_p", top_p, 0.0, 1.0, low_open=True),
            check.integer("top_k", top_k, 0, hint=" (0 turns it off)"))
        if draft_length != "auto":
            check.integer("draft_length", draft_length, 0, MAX_DRAFT_LENGTH, hint=", or 'auto'")
        if not (isinstance(speculative, bool) or speculative in ("draft", "ngram", "tree")):
            raise ValueError(f"speculative must be True, False, 'draft', 'ngram' or 'tree', got {speculative!r}")
        if observer is not None and not callable(observer):
            raise ValueError(f"observer must be a function of a round's RoundStats, got {observer!r}")
        tree_width = check.integer("tree_width", tree_width, 1)
        tree_depth = check.integer("tree_depth", tree_depth, 1, MAX_DRAFT_LENGTH)
        if tree_size(tree_width, tree_depth) > MAX_TREE_NODES:
            raise ValueError(f"a tree of width {tree_width} and depth {tree_depth} has {tree_size(tree_width, tree_depth)} "
                             f"nodes; TVM's tree attention takes at most {MAX_TREE_NODES} (root included)")
        return cls(check.integer("max_tokens", max_tokens, 1), sampling,
                   check.optional_integer("seed", seed, 0, None), check.stop_strings(stop), speculative,
                   draft_length, check.flag("stop_at_eos", stop_at_eos), check.integer("ngram_size", ngram_size, 1),
                   tree_width, tree_depth, observer)


class Session:
    """One conversation: its tokens stay cached between calls. One generate or stream at a time: a
    second one while a stream is suspended would build on the other's context, so it is refused."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.seq_id = engine._add_sequence()
        self.tokens: list[int] = []
        self.last_stats: Stats | None = None  # of the latest generate or stream call
        self._generation: _Generation | None = None  # the generate or stream in progress
        self._closed = False
        self._finalizer = weakref.finalize(self, engine._abandon, self.seq_id)

    def close(self) -> None:
        """Free the cache pages; a stream left suspended on the session raises if resumed."""
        if self._finalizer.detach() is not None:
            self._closed = True
            self.engine._remove_sequence(self.seq_id)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | None = None, *, token_ids: list[int] | None = None, **options) -> GenerationOutput:
        """prompt / token_ids is the whole conversation so far: its common prefix with the cache is reused."""
        return _run(self.engine, [self], *self._request(prompt, token_ids, options))[0]

    def stream(self, prompt: str | None = None, *, token_ids: list[int] | None = None, **options) -> Iterator[str]:
        generation = _Generation(self.engine, [self], *self._request(prompt, token_ids, options))
        self.last_stats = generation.stats
        yield from generation.deltas()

    def _request(self, prompt, token_ids, options) -> tuple[list[list[int]], GenerateOptions]:
        prompts, single = self.engine._prompts(prompt, token_ids)
        if not single:
            raise ValueError("a session holds one conversation: give one prompt, or use Engine.generate for a batch")
        return prompts, GenerateOptions.make(**options)

    def reset(self) -> None:
        with self.engine._exclusive():
            self._check_idle()
            self.tokens = []
            for m in self.engine._models():
                m.kv.popn(self.seq_id, m.kv.length(self.seq_id))

    def _check_idle(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed; start a new one with engine.session()")
        if self._generation is not None:
            raise RuntimeError("this session has a stream in progress; finish it or call its close() first")


def _run(engine: Engine, sessions: list[Session], prompts: list[list[int]], opts: GenerateOptions) -> list[GenerationOutput]:
    gen = _Generation(engine, sessions, prompts, opts)
    for session in sessions:
        session.last_stats = gen.stats
    for _ in gen.deltas():
        pass
    return gen.outputs()


class _Request:
    """One sequence's progress in a generation: its new tokens, text and stop state."""

    def __init__(self, session: Session, seq: Sequence, prompt_len: int, opts: GenerateOptions,
                 tokenizer: Tokenizer, eos_ids):
        self.session = session
        self.seq = seq
        self.prompt_len = prompt_len
        self.opts = opts
        self.detok = IncrementalDetokenizer(tokenizer)
        self.eos_ids = eos_ids if opts.stop_at_eos else frozenset()
        self.finish_reason: str | None = None
        self.text = ""

    @property
    def generated(self) -> list[int]:
        return self.session.tokens[self.prompt_len:]

    def accept(self, new_tokens: list[int], max_seq_len: int) -> tuple[str, int]:
        """Take committed tokens one by one until a stop; returns the text delta and how many were kept."""
        delta = ""
        for i, token in enumerate(new_tokens):
            n_generated = len(self.generated) - len(new_tokens) + i + 1
            if token in self.eos_ids:
                self.finish_reason = "stop"
                return delta, i + 1
            piece = self.detok.add(token)
            text = self.text + delta + piece
            cut = _find_stop(text, self.opts.stop, len(self.text + delta))
            if cut is not None:
                self.finish_reason = "stop"
                return text[:cut][len(self.text):], i + 1
            delta += piece
            if n_generated >= self.opts.max_tokens or self.prompt_len + n_generated >= max_seq_len:
                self.finish_reason = "length"
                return delta, i + 1
        return delta, len(new_tokens)


def _find_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Where the first stop string ending in the new part of the text begins."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (best is None or at < best):
            best = at
    return best


class _Generation:
    def __init__(self, engine: Engine, sessions: list[Session], prompts: list[list[int]], opts: GenerateOptions):
        if len(sessions) > engine.max_batch_size:
            raise ValueError(f"a batch of {len(sessions)} exceeds the engine's max_batch_size {engine.max_batch_size}")
        self.engine = engine
        self.opts = opts
        self.draft = engine.draft if opts.speculative in (True, "draft", "tree") else None
        if opts.speculative in ("draft", "tree") and self.draft is None:
            raise ValueError(f"{engine.folder} has no draft model; use speculative='ngram' or compile with --draft")
        self.tree = opts.speculative == "tree"
        if self.tree and isinstance(self.draft, FeatureModel):
            raise ValueError(f"{engine.folder}'s draft is a feature draft (eagle), which proposes chains only; "
                             "use speculative='draft'")
        if self.tree and tree_size(opts.tree_width, opts.tree_depth) * len(sessions) > engine.prefill_chunk:
            raise ValueError(f"{len(sessions)} trees of {tree_size(opts.tree_width, opts.tree_depth)} nodes exceed "
                             f"the {engine.prefill_chunk} tokens a forward may carry; use a smaller tree or batch")
        self.decoder = SpeculativeDecoder(engine.target, self._proposer(engine, opts), opts.observer)
        self.adaptive = (engine.auto_draft_length(self.decoder.proposer)
                         if opts.draft_length == "auto" and not self.tree and self.decoder.proposer else None)
        self.stats = Stats()
        self.requests = []
        seeds = np.random.SeedSequence(opts.seed).spawn(len(sessions))
        for session, prompt, seed in zip(sessions, prompts, seeds):
            self._check_prompt(prompt)
            seq = Sequence(session.seq_id, session.tokens, np.random.default_rng(seed), opts.sampling)
            self.requests.append(_Request(session, seq, len(prompt), opts, engine.tokenizer, engine.eos_ids))
        self._prompts = prompts
        with engine._exclusive():
            for session in sessions:
                session._check_idle()
            for session in sessions:
                session._generation = self

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt) >= self.engine.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the KV cache holds {self.engine.max_seq_len} "
                             "per sequence; shorten the prompt or recompile with a larger --max-seq-len")
        vocab = self.engine.target.lib.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"token id {max(prompt) if max(prompt) >= vocab else min(prompt)} is outside the vocabulary (0..{vocab - 1})")

    def deltas(self) -> Iterator[str]:
        """Text deltas of a single request (a batch yields none). Between steps, where a stream may be
        left suspended, both caches of every sequence hold a prefix of its committed tokens."""
        start = time.perf_counter()
        try:
            with self._step():
                self._prefill()
            active = list(self.requests)
            while active:
                with self._step():
                    deltas = self._round(active)
                active = [r for r in active if r.finish_reason is None]
                if deltas[0] and len(self.requests) == 1:
                    yield deltas[0]
        finally:
            self.stats.total_seconds = time.perf_counter() - start
            for req in self.requests:
                req.session._generation = None
            _trim_memory_pool()

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """One step under the engine's lock; after an error (or a Ctrl-C) inside it, the caches are settled."""
        with self.engine._exclusive():
            if any(req.session._closed for req in self.requests):
                raise RuntimeError("the session was closed while this stream was suspended")
            try:
                yield
            except BaseException:
                for req in self.requests:
                    self._settle(req)
                raise

    def _round(self, active: list[_Request]) -> list[str]:
        """One speculative round over the active requests; each one's text delta."""
        k = self._draft_length(active)
        rstats = self.decoder.round([r.seq for r in active], k)
        self.stats.add_round(rstats)
        if self.adaptive is not None:
            self.adaptive.update(rstats)
        deltas = []
        for req, tokens in zip(active, rstats.tokens):
            delta, kept = req.accept(tokens, self.engine.max_seq_len)
            self._truncate(req, len(tokens) - kept)
            req.text += delta
            self.stats.tokens += kept
            deltas.append(delta)
        return deltas

    def _prefill(self) -> None:
        for req, prompt in zip(self.requests, self._prompts):
            session = req.session
            common = _common_prefix(session.tokens, prompt)
            session.tokens[:] = prompt
            # every model, a draft this request does not run too: a later one reuses its cache
            for m in self.engine._models():
                m.keep(req.seq, min(common, len(prompt) - 1))
            # The draft is fed by its proposer's catch-up when a round first drafts: under
            # draft_length="auto" a draft that does not pay never reads the prompt at all.
            self.decoder.target.prefill(req.seq, self.engine.prefill_chunk)

    def _models(self) -> list[Model]:
        return [self.decoder.target] + ([self.draft] if self.draft is not None else [])

    def _proposer(self, engine: Engine, opts: GenerateOptions):
        if self.tree:
            return DraftTree(self.draft, engine.prefill_chunk, opts.tree_width)
        if isinstance(self.draft, FeatureModel):
            return FeatureDraft(self.draft, engine.target, engine.prefill_chunk)
        if self.draft is not None:
            return DraftModel(self.draft, engine.prefill_chunk)
        if opts.speculative in (True, "ngram"):
            return NGramDraft(engine.target.lib.vocab_size, max_ngram=opts.ngram_size)
        return None

    def _draft_length(self, active: list[_Request]) -> int:
        """The chain's k or the tree's depth; never drafting past max_tokens or the cache's per-sequence length."""
        room = min(min(r.opts.max_tokens - len(r.generated), self.engine.max_seq_len - len(r.session.tokens))
                   for r in active)
        limit = max(0, room - 1)
        if self.decoder.proposer is None:
            return 0
        if self.adaptive is not None:
            return self.adaptive.choose(limit)
        return min(self.opts.tree_depth if self.tree else self.opts.draft_length, limit)

    def _truncate(self, req: _Request, drop: int) -> None:
        """A stop inside an accepted run: forget what came after it, in the caches too."""
        if drop > 0:
            del req.session.tokens[-drop:]
            for m in self._models():
                m.sync(req.seq)

    def _settle(self, req: _Request) -> None:
        """After an error: both caches hold a prefix of the committed tokens."""
        if not req.session._closed:
            for m in self.engine._models():
                m.sync(req.seq)

    def outputs(self) -> list[GenerationOutput]:
        stats = self.stats.as_dict()
        return [GenerationOutput(r.text, r.generated, r.finish_reason or "length", stats) for r in self.requests]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# TVM's pooled allocator, which holds every VM's intermediate buffers, keeps each freed buffer for a
# later one of the same size and frees none: every new prompt length, batch or tree size added buffers
# for good (1000 mixed calls grew a process from 634 MB to 2.9 GB). Its idle buffers are freed after each
# generation; those in use are untouched, so other threads' generations are safe. Freeing only once the
# process had grown ratcheted up (the heap fragments, +42% in 200 calls of tools/soak.py); freeing every
# time holds it flat, and allocating a generation's buffers again is lost in the noise of its forwards.
_trim_memory_pool = tvm.get_global_func("vm.builtin.memory_manager.clear")


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


def _read_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"  # there, at its recorded size: read_artifact checked
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ArtifactError(f"{path}: unreadable tokenizer ({_last_line(err)}); recompile the artifact") from None


def _last_line(err: BaseException) -> str:
    """The gist of a library's message (TVM's carry a C++ backtrace before it)."""
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__

