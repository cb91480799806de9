"""mlc_spec chat: a streaming conversation with a compiled model, speculative when it has a draft.

With no --model it runs the default pair (SmolLM2-135M-Instruct and the shipped draft, see
default_model.py), compiled on first use. A conversation is one engine session: every turn sends the
whole rendered history and the session prefills only what is not cached yet.

With stdin piped, every line is a prompt (or a /command) and stdout holds only the replies, one after
another, each ending with a newline; the per-reply statistics and notes go to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .interface.artifact import ArtifactError, is_artifact
from .runtime.engine import Engine, GenerateOptions, Stats
from .runtime.speculative import SamplingParams
from .runtime.library import tvm_device

# Used when an artifact has no chat template: plain role-prefixed lines, the reply ending where the model
# starts a new user line. The assistant's text is rendered as generated (it begins with its own space).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Assistant:{{ m['content'] }}"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = "\nUser:"
STEP_TIMING_CONTEXT = 256  # the long context at which the speedup line times the target's step

HELP = """commands:
  /reset               start a new conversation
  /stats               acceptance per draft position, mean accepted length, tok/s (last turn, all turns)
  /set NAME VALUE      change an option: temperature, top_p, top_k, seed (or none), max_tokens,
                       draft_length, draft (on/off), draft_shape (chain/tree), tree_width, tree_depth,
                       system (the rest of the line; empty removes it)
  /set                 show the options
  /help                this list
  /exit                leave (Ctrl-D too); Ctrl-C stops a reply"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (no --model: the default SmolLM2 pair)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="artifact folder, or a Hugging Face folder / .gguf to compile first into dist/ "
                                   "(default: SmolLM2-135M-Instruct with the shipped draft, compiled on first use)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, vulkan, metal, opencl or webgpu (default cpu)")
    p.add_argument("--no-draft", action="store_true", help="run the target alone")
    p.add_argument("--draft-length", type=draft_length, default=Settings.draft_length,
                   help="tokens drafted per round, or auto: chosen from measured acceptance and costs (default auto)")
    p.add_argument("--draft", dest="draft_shape", type=draft_shape, default=Settings.draft_shape,
                   help="chain: the draft proposes --draft-length tokens; tree: a token tree of --tree-depth levels, "
                        "--tree-width children under the root and under each level's --tree-width likeliest "
                        "nodes, verified in one forward (default chain)")
    p.add_argument("--tree-width", type=int, default=Settings.tree_width, help="children per tree node (default %(default)s)")
    p.add_argument("--tree-depth", type=int, default=Settings.tree_depth,
                   help="levels of the tree below its root (default %(default)s)")
    p.add_argument("--temperature", type=float, default=Settings.temperature, help="0 is greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=Settings.top_p, help="nucleus sampling mass (default %(default)s: off)")
    p.add_argument("--top-k", type=int, default=Settings.top_k,
                   help="sample among the k likeliest tokens (default %(default)s: off)")
    p.add_argument("--seed", type=int, help="seed of the sampling (default: random)")
    p.add_argument("--max-tokens", type=int, default=Settings.max_tokens, help="longest reply in tokens (default %(default)s)")
    p.add_argument("--system", help="system message of every conversation")
    p.set_defaults(run=run)


@dataclasses.dataclass
class Settings:
    """The chat's options: the API's defaults (GenerateOptions) but for longer replies."""
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    top_k: int = SamplingParams.top_k
    seed: int | None = None
    max_tokens: int = 512
    draft_length: int | str = GenerateOptions.draft_length
    draft: bool = True
    system: str | None = None
    draft_shape: str = "chain"
    tree_width: int = GenerateOptions.tree_width
    tree_depth: int = GenerateOptions.tree_depth

    def options(self) -> dict:
        """Keyword arguments of Session.stream but `speculative` (see Chat); raises ValueError on a bad value."""
        options = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                       max_tokens=self.max_tokens, draft_length=self.draft_length, tree_width=self.tree_width,
                       tree_depth=self.tree_depth)
        GenerateOptions.make(**options)
        return options

    def set(self, name: str, value: str) -> None:
        name = name.replace("-", "_")
        if name not in SETTABLE:
            raise ValueError(f"no option {name!r}; settable: {', '.join(SETTABLE)}")
        try:
            parsed = SETTABLE[name](value)
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not a valid value") from None
        changed = dataclasses.replace(self, **{name: parsed})
        changed.options()
        setattr(self, name, parsed)


def draft_length(value: str) -> int | str:
    """k, or "auto": k chosen each round from measured acceptance and costs, never slower than the target alone."""
    return "auto" if value == "auto" else int(value)


def draft_shape(value: str) -> str:
    if value not in ("chain", "tree"):
        raise ValueError(value)
    return value


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "") else int(value)


def _on_off(value: str) -> bool:
    if value.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("on", "true", "1")


SETTABLE: dict[str, Callable[[str], object]] = {
    "temperature": float, "top_p": float, "top_k": int, "seed": _optional_int, "max_tokens": int,
    "draft_length": draft_length, "draft": _on_off, "system": lambda v: v or None, "draft_shape": draft_shape,
    "tree_width": int, "tree_depth": int,
}


class ChatTemplate:
    """A chat template rendered the way Hugging Face's apply_chat_template does."""

    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.is_fallback = source is None
        try:
            self.template = _jinja_environment().from_string(source or FALLBACK_TEMPLATE)
        except jinja2.TemplateSyntaxError as err:
            raise ArtifactError(f"the model's chat template does not parse ({err}); fix chat_template in "
                                "tokenizer_config.json and recompile") from None
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @classmethod
    def of(cls, engine: Engine) -> "ChatTemplate":
        special = engine.config.special_tokens
        return cls(engine.chat_template, special.bos_token, special.eos_token)

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as err:  # raise_exception(): e.g. a template without a system role
            raise ValueError(f"the chat template refuses this conversation: {err}") from None

    def encode(self, engine: Engine, messages: list[dict]) -> list[int]:
        # A template writes its own special tokens (HF tokenizes its output with add_special_tokens=False);
        # the plain fallback relies on the tokenizer's, as a plain prompt would.
        return engine.encode(self.render(messages), add_special_tokens=self.is_fallback)


def _jinja_environment():
    """transformers' _compile_jinja_template, less its {% generation %} tracker (only for training masks)."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Chat:
    """One conversation at a time over an engine: history, its cached session, and per-turn statistics."""

    def __init__(self, engine: Engine, settings: Settings, template: ChatTemplate):
        self.engine = engine
        self.settings = settings
        self.template = template
        self.session = engine.session()
        self.messages: list[dict] = []
        self.last: Stats | None = None
        self.prompt_tokens = 0  # the last turn's
        self.total = Stats()
        self.turns = 0

    @property
    def speculative(self) -> bool | str:
        """The runtime's speculative option: False, True (the draft's chain) or "tree"."""
        if not (self.settings.draft and self.engine.has_draft):
            return False
        return "tree" if self.settings.draft_shape == "tree" else True

    def target_step_seconds(self, context: float) -> float:
        """The target's one-token decoding step at this many tokens of context, from steps timed once
        on a scratch sequence at a short and a long context (a step's attention grows with its context:
        timed at 12 tokens alone it was 0.8 ms short of a step in a 250-token reply, and the speedup
        line said 0.87x of a chat that ran 1.1x the target alone)."""
        (short, short_s), (long, long_s) = self._step_timings
        if long <= short:  # a context too short for a second timing
            return short_s
        return short_s + (long_s - short_s) * (context - short) / (long - short)

    @functools.cached_property
    def _step_timings(self) -> tuple[tuple[int, float], tuple[int, float]]:
        sentence = self.engine.encode("The quick brown fox jumps over the lazy dog.")
        long = min(STEP_TIMING_CONTEXT, self.engine.max_seq_len // 2)
        timings = []
        with self.engine.session() as scratch:
            for token_ids in (sentence, (sentence * long)[:long]):
                for max_tokens in (2, 16):  # a first run warms up
                    out = scratch.generate(token_ids=token_ids, max_tokens=max_tokens, speculative=False,
                                           stop_at_eos=False)
                timings.append((len(token_ids) + 8, out.stats["verify_seconds"] / out.stats["rounds"]))
        return tuple(timings)

    def reset(self) -> None:
        self.session.close()
        self.session = self.engine.session()
        self.messages = []

    def conversation(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return system + self.messages + [{"role": "user", "content": user_text}]

    def reply(self, user_text: str, stop: "StopOnInterrupt | None" = None) -> Iterator[str]:
        """Stream the reply. It joins the history when it ends or is stopped (partial, as shown);
        a reply cut by an error or a second Ctrl-C does not, and the next turn's prefix match drops its tokens."""
        token_ids = self.template.encode(self.engine, self.conversation(user_text))
        self.prompt_tokens = len(token_ids)
        # True only with a draft model: the runtime may read True without one as another kind of drafting.
        options = self.settings.options() | {"speculative": self.speculative}
        if self.template.is_fallback:
            options["stop"] = FALLBACK_STOP
        deltas = self.session.stream(token_ids=token_ids, **options)
        text = ""
        stop = stop or StopOnInterrupt()
        try:
            stop.streaming = True
            for delta in deltas:
                text += delta
                yield delta
                if stop():
                    break
        finally:
            stop.streaming = False  # from here a Ctrl-C must not cut the bookkeeping below in half
            deltas.close()  # the runtime leaves both caches settled whatever happened
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        self.last = self.session.last_stats
        self.total.merge(self.last)
        self.turns += 1


def estimated_speedup(stats: dict, target_step_seconds: float) -> float | None:
    """Time the target alone would have taken over the time taken.

    The decoding rounds are replaced by one target step per generated token at the measured cost of a
    one-token step; prefill and overheads stay as measured (they include the draft's prefill, which
    the target alone would not pay). The verify forward is no stand-in for that step: it carries k+1
    tokens and on a CPU costs up to twice as much at k=4."""
    if not stats["total_seconds"]:
        return None
    other = stats["total_seconds"] - stats["draft_seconds"] - stats["verify_seconds"]
    return (other + stats["tokens"] * target_step_seconds) / stats["total_seconds"]


def summary_line(chat: Chat) -> str:
    s = chat.last.as_dict()
    line = f"{s['tokens']} tokens, {s['tokens_per_second']:.1f} tok/s"
    if not chat.speculative:
        return line + ", target alone"
    line += f", acceptance {s['acceptance_rate']:.2f} ({s['mean_accepted_length']:.2f} tokens per target forward)"
    speedup = estimated_speedup(s, chat.target_step_seconds(chat.prompt_tokens + s["tokens"] / 2))
    return line + (f", ~{speedup:.2f}x the target alone" if speedup else "")


def stats_report(chat: Chat) -> str:
    if chat.last is None:
        return "no turns yet"
    lines = []
    for label, stats in (("last turn", chat.last), (f"all {chat.turns} turns", chat.total)):
        s = stats.as_dict()
        lines.append(f"{label}: {s['tokens']} tokens in {s['total_seconds']:.2f} s, {s['tokens_per_second']:.1f} tok/s, "
                     f"acceptance {s['acceptance_rate']:.2f}, mean accepted length {s['mean_accepted_length']:.2f}")
    s = chat.total.as_dict()
    positions = [f"{i + 1}: {rate:.2f}" for i, (rate, drafted)
                 in enumerate(zip(s["acceptance_per_position"], s["drafted_per_position"])) if drafted]
    lines.append("acceptance per draft position (all turns): " + ("  ".join(positions) or "nothing drafted"))
    return "\n".join(lines)


class Console:
    """Where each kind of output goes: replies to stdout; notes to stdout only when a person types."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.notes = sys.stdout if interactive else sys.stderr
        self.dim = self.notes.isatty()
        self.partial = False  # part of a reply is on the current line

    def piece(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.partial = True

    def end_reply(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.partial = False

    def cut_reply(self) -> None:
        """After an error or an interrupt: end the line if part of the reply is on it (piped, a failed
        turn with nothing shown adds no empty reply)."""
        if self.partial:
            self.end_reply()

    def note(self, text: str) -> None:
        print(text, file=self.notes, flush=True)

    def faint(self, text: str) -> None:
        self.note(f"\033[2m{text}\033[0m" if self.dim else text)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)


class StopOnInterrupt:
    """Ctrl-C during a turn. The first asks the reply to stop after the current token, so the runtime
    settles the caches as on any stop; a second one while the reply still streams interrupts it at once
    (KeyboardInterrupt) and drops it. Any other in the turn is ignored: two quick presses must not end
    the chat."""

    def __init__(self):
        self.requested = False
        self.streaming = False  # set by Chat.reply while its stream runs

    def __enter__(self) -> "StopOnInterrupt":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
        elif self.streaming:
            self.streaming = False  # raised once per turn, so the cleanup it triggers runs uninterrupted
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def __call__(self) -> bool:
        return self.requested


def run(args) -> int:
    settings = Settings(args.temperature, args.top_p, args.top_k, args.seed, args.max_tokens, args.draft_length,
                        not args.no_draft, args.system, args.draft_shape, args.tree_width, args.tree_depth)
    settings.options()  # a bad option or device fails before anything is loaded or compiled
    tvm_device(args.device)
    console = Console(interactive=sys.stdin.isatty())
    if isinstance(sys.stdin, io.TextIOWrapper):  # a stray invalid byte in the input becomes U+FFFD, not a crash
        sys.stdin.reconfigure(errors="replace")
    artifact = resolve_model(args.model, args.device, _log)
    # Two sequences: the conversation, and a scratch one that times the target's step for the speedup.
    engine = Engine(artifact, device=args.device, max_batch_size=2)
    if args.model is None and not engine.has_draft:
        _log("note: no default draft is shipped (mlc_spec/default/draft/ is missing): the target runs alone")
    chat = Chat(engine, settings, ChatTemplate.of(engine))
    if chat.template.is_fallback:
        _log(f"note: {artifact.name} has no chat template: using plain 'User: ...' / 'Assistant:' lines")
    if console.interactive:
        import readline  # noqa: F401  (line editing and history for input())

        draft = "with its draft" if engine.has_draft else "target alone"
        console.note(f"mlc_spec chat: {artifact.name} ({draft}) on {args.device}. /help for commands, Ctrl-D to leave.")
    return loop(chat, console)


def _log(message: str) -> None:
    """Compile progress and notes: stderr, so that piped stdout holds only the replies."""
    print(message, file=sys.stderr, flush=True)


def resolve_model(model: str | None, device: str, log: Callable[[str], None]) -> Path:
    if model is None:
        from .default_model import default_artifact

        return default_artifact(device, log)
    path = Path(model)
    if is_artifact(path):
        return path
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or folder; give an artifact folder (from mlc_spec compile), "
                            "a Hugging Face model folder or a .gguf file")
    from .compile.build import CompileOptions, compile_artifact

    start = time.perf_counter()
    out = compile_artifact(path, None, None, CompileOptions(device=device), log=log)
    log(f"compiled in {time.perf_counter() - start:.1f}s; next time skip the compile with --model {out}")
    return out


def loop(chat: Chat, console: Console) -> int:
    # From here Ctrl-C is the chat's (a turn's StopOnInterrupt, else drop the line), never the command's exit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    while True:
        try:
            line = read_line(console)
            if line is None or handle(chat, console, line) == "exit":
                return 0
        except KeyboardInterrupt:  # at the prompt or between turns: drop the line, as a shell does
            console.note("")


def read_line(console: Console) -> str | None:
    """The next line, stripped; None at the end of the input."""
    try:
        line = input("> ") if console.interactive else sys.stdin.readline()
    except EOFError:
        console.note("")
        return None
    if not console.interactive and not line:
        return None
    return line.strip()


def handle(chat: Chat, console: Console, line: str) -> str | None:
    if line.startswith("/"):
        return command(chat, console, line)
    if line:
        turn(chat, console, line)
    return None


def turn(chat: Chat, console: Console, text: str) -> None:
    """One reply. Its errors are reported and the chat goes on: piped, the next line is read."""
    with StopOnInterrupt() as stop:
        try:
            for delta in chat.reply(text, stop):
                console.piece(delta)
        except KeyboardInterrupt:  # a second Ctrl-C: the runtime still settled the caches on the way out
            console.cut_reply()
            console.note("(interrupted; this reply is not kept in the conversation)")
            return
        except (ValueError, RuntimeError) as err:
            console.cut_reply()
            console.error(f"{err} (/reset starts a new conversation)")
            return
        console.end_reply()
        if stop():
            console.note("(stopped)")
        console.faint(summary_line(chat))


def command(chat: Chat, console: Console, line: str) -> str | None:
    name, _, rest = line[1:].partition(" ")
    if name in ("exit", "quit"):
        return "exit"
    if name == "reset":
        chat.reset()
        console.note("(new conversation)")
    elif name == "stats":
        console.note(stats_report(chat))
    elif name == "help":
        console.note(HELP)
    elif name == "set" and not rest.strip():
        console.note("  ".join(f"{k}={v}" for k, v in dataclasses.asdict(chat.settings).items()))
    elif name == "set":
        option, _, value = rest.strip().partition(" ")
        try:
            chat.settings.set(option, value.strip())
        except ValueError as err:
            console.error(str(err))
            return None
        if option.replace("-", "_") == "draft" and chat.settings.draft and not chat.engine.has_draft:
            console.note("(this model has no draft: the target runs alone)")
        console.note(f"({option} = {getattr(chat.settings, option.replace('-', '_'))})")
    else:
        console.error(f"unknown command /{name}; /help lists the commands")
    return None
