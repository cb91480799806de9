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

from tokenizers import Tokenizer

from ..interface.artifact import ArtifactError, read_artifact
from . import options as check
from .kv_cache import CacheFullError, pages_for
from .library import ModelLibrary, last_line, missing_cpu_features, tvm_device
from .adaptive import AdaptiveDraftLength
from .scheduler import MAX_DRAFT_LENGTH, Batch, Request, Stats, trim_memory_pool
from .speculative import DRAFT_CONFIDENCE, MAX_TREE_NODES, FeatureModel, Model, RoundStats, SamplingParams, tree_size

AUTO_MAX_DRAFT = 8


@dataclasses.dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stats: dict


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
                             f"{self.max_seq_len} tokens ({last_line(err)}); lower max_batch_size or max_seq_len") from None
        return (FeatureModel if lib.kind == "eagle" else Model)(lib, kv)

    @property
    def has_draft(self) -> bool:
        return self.draft is not None

    @property
    def drafts_trees(self) -> bool:
        """Whether its draft proposes token trees (a feature draft compiled before it could does not)."""
        return self.has_draft and self.draft.lib.drafts_trees

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
    # auto, not a fixed k: on the default pair k = 4 ran 0.84-0.97x the target alone, auto 1.08-1.17x
    draft_length: int | str = "auto"
    draft_confidence: float | None = None
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
             draft_length: int | str = draft_length, draft_confidence: float | None = draft_confidence,
             stop_at_eos: bool = stop_at_eos, ngram_size: int = ngram_size,
             tree_width: int = tree_width, tree_depth: int = tree_depth,
             observer: Callable[[RoundStats], None] | None = observer) -> "GenerateOptions":
        """speculative: True (the draft model, or n-gram lookup when the artifact has none), "draft",
        "ngram", "tree" (the draft proposes a token tree of tree_depth levels: tree_width children under
        the root and under each level's tree_width likeliest nodes, verified in one forward; draft_length
        does not apply), or False (the target alone). draft_length: k, or "auto" (the default) to choose
        k each round from measured acceptance and costs (runtime/adaptive.py). draft_confidence: a draft model's chain stops early,
        before the first draft where the product of the draft's top probabilities falls below it
        (runtime/speculative.py's ChainStop); 0 always drafts k; None (the default): DRAFT_CONFIDENCE
        with draft_length="auto", which leaves how much to draft to the runtime, else 0. Sampled tokens
        depend on k, the chains' stops and the tree's shape (the uniforms are drawn per round), so a seed
        reproduces a sampled output with a fixed k, confidence or shape; greedy output never depends on
        them. observer: called with every round's RoundStats (each sequence's drafts, acceptances and
        committed tokens, and the round's timing)."""
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
                   draft_length, check.optional_real("draft_confidence", draft_confidence, 0.0, 1.0),
                   check.flag("stop_at_eos", stop_at_eos), check.integer("ngram_size", ngram_size, 1),
                   tree_width, tree_depth, observer)

    @property
    def chain_confidence(self) -> float:
        """The threshold its chains stop at (draft_confidence, its default resolved)."""
        if self.draft_confidence is not None:
            return self.draft_confidence
        return DRAFT_CONFIDENCE if self.draft_length == "auto" else 0.0


class Session:
    """One conversation: its tokens stay cached between calls. One generate or stream at a time: a
    second one while a stream is suspended would build on the other's context, so it is refused."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.seq_id = engine._add_sequence()
        self.tokens: list[int] = []
        self.last_stats: Stats | None = None  # of the latest generate or stream call
        self._generation: Request | None = None  # the generate or stream in progress
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
        prompts, opts = self._request(prompt, token_ids, options)
        batch = Batch(self.engine)
        self.last_stats = batch.stats
        with contextlib.closing(_steps(batch, [self], [Request(self.engine, prompts[0], opts)])) as steps:
            for step in steps:
                for _, delta in step:
                    if delta:
                        yield delta

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
    if len(sessions) > engine.max_batch_size:
        raise ValueError(f"a batch of {len(sessions)} exceeds the engine's max_batch_size {engine.max_batch_size}")
    requests = [Request(engine, prompt, opts, index) for index, prompt in enumerate(prompts)]
    batch = Batch(engine)
    for session in sessions:
        session.last_stats = batch.stats
    for _ in _steps(batch, sessions, requests):
        pass
    stats = batch.stats.as_dict()
    return [GenerationOutput(r.text, r.generated, r.finish_reason or "length", stats) for r in requests]


def _steps(batch: Batch, sessions: list[Session], requests: list[Request]) -> Iterator[list[tuple[Request, str]]]:
    """The requests, all joining at the first step, run to the end on these sessions a step at a time
    (a caller may leave the iterator suspended between steps); each step's deltas."""
    with batch.engine._exclusive():
        for session in sessions:
            session._check_idle()
        for session, request in zip(sessions, requests):
            session._generation = request
            request.bind(session)
            batch.join(request)
    start = time.perf_counter()
    try:
        while batch.active:
            yield batch.step()
    finally:
        batch.stats.total_seconds = time.perf_counter() - start
        for session in sessions:
            session._generation = None
        trim_memory_pool()


def _read_tokenizer(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"  # there, at its recorded size: read_artifact checked
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ArtifactError(f"{path}: unreadable tokenizer ({last_line(err)}); recompile the artifact") from None
