"""mlc_spec serve: an OpenAI-compatible HTTP server over continuous batching with exact speculation.

The engine runs on the scheduler's worker thread (runtime/scheduler.py); the ASGI handlers only submit
requests to it and await each one's events on an asyncio queue. Every request field is checked by the
Python API's own checks (runtime/options.py), so a bad field gets the same message here as there, in
OpenAI's error JSON. Logs go to stderr, one line per request; stdout stays empty.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, whose types are imported
# inside create_app (FastAPI is an optional extra), so they must be objects, not names.

import asyncio
import json
import logging
import sys
import time
import uuid

from .chat import FALLBACK_STOP, ChatTemplate, Settings, draft_length, draft_shape, resolve_model
from .runtime.engine import Engine, GenerateOptions
from .runtime.scheduler import QueueFull, Request, Scheduler

INSTALL_HINT = 'mlc_spec serve needs FastAPI and uvicorn: pip install -e ".[serve]"'
OPENAI_TEMPERATURE = 1.0  # OpenAI's default, not the Python API's greedy one
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's is the rest of the context
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop")
SPECULATION_FIELDS = ("speculative", "draft_length", "draft_confidence", "tree_width", "tree_depth", "ngram_size")
# OpenAI fields this server does not implement: refused unless left at their no-op value
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": False, "top_logprobs": 0, "suffix": "",
               "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "tools": [], "functions": []}
RETRY_AFTER_SECONDS = 1

log = logging.getLogger("mlc_spec.serve")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (no MODEL: the default SmolLM2 pair)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="artifact folder, or a Hugging Face folder / .gguf to compile first "
                                            "(default: SmolLM2-135M-Instruct with the shipped draft)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences generated at once; more requests wait in the queue (default %(default)s)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; beyond them the server answers 429 (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, vulkan, metal, opencl or webgpu (default cpu)")
    p.add_argument("--no-draft", action="store_true", help="run the target alone unless a request asks otherwise")
    p.add_argument("--draft-length", type=draft_length, default=Settings.draft_length,
                   help="tokens drafted per round, or auto (default auto; a request's draft_length overrides it)")
    p.add_argument("--draft", dest="draft_shape", type=draft_shape, default=Settings.draft_shape,
                   help="chain or tree, as in chat (default chain)")
    p.add_argument("--tree-width", type=int, default=Settings.tree_width, help="children per tree node (default %(default)s)")
    p.add_argument("--tree-depth", type=int, default=Settings.tree_depth, help="levels of the tree (default %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    defaults = speculation_defaults(args)
    GenerateOptions.make(**defaults)  # a bad option fails before anything is loaded
    _check_port(args.port)
    _log_to_stderr()
    artifact = resolve_model(args.model, args.device, log.info)
    engine = Engine(artifact, device=args.device, max_batch_size=args.max_batch)
    if not engine.has_draft and defaults["speculative"] == "tree":  # True falls back to n-gram lookup by itself
        log.info(f"note: {artifact.name} has no draft model: no token trees, the target runs alone")
        defaults["speculative"] = False
    scheduler = Scheduler(engine, max_waiting=_max_waiting(args.max_waiting), log=log.info)
    app = create_app(engine, scheduler, artifact.name, defaults)
    log.info(f"serving {artifact.name}, {args.max_batch} sequences at once; API under /v1")
    # uvicorn says where it listens once bound, or why it could not bind (exit 3)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, log_level="info")
    return 0


def speculation_defaults(args) -> dict:
    """The server's speculation settings, as chat's flags give them; a request's fields override them."""
    speculative = False if args.no_draft else ("tree" if args.draft_shape == "tree" else True)
    return dict(speculative=speculative, draft_length=args.draft_length, tree_width=args.tree_width,
                tree_depth=args.tree_depth)


def _check_port(port) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")


def _max_waiting(value: int) -> int:
    if value < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {value}")
    return value


def _log_to_stderr() -> None:
    """Our lines and uvicorn's, all on stderr with a timestamp: stdout stays empty for a process manager."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in ("mlc_spec", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


class ApiError(Exception):
    """An error answered in OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(engine: Engine, scheduler: Scheduler, model_name: str, defaults: dict):
    """The ASGI app; the scheduler's worker runs from startup to shutdown."""
    import contextlib

    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    api = Api(engine, scheduler, model_name, defaults)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="mlc_spec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):  # unknown paths and methods, in OpenAI's shape too
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            raise ApiError(503, "the scheduler has stopped", kind="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "mlc_spec", "max_model_len": engine.max_seq_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(await asyncio.to_thread(api.metrics), media_type="text/plain; version=0.0.4")

    async def complete(http: HttpRequest, chat: bool):
        job = await api.start(await _json_body(http), chat)
        if job.stream:
            return StreamingResponse(api.stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await api.wait(job, http))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    return app


async def _json_body(http) -> dict:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class Job:
    """One HTTP request's generation: its scheduler request and the queue its events arrive on."""

    def __init__(self, chat: bool, request: Request, events: asyncio.Queue, stream: bool, include_usage: bool):
        self.chat = chat
        self.request = request
        self.events = events  # (kind, text so far, finish_reason, tokens generated, error) from the scheduler
        self.stream = stream
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent = 0  # characters of the text already sent


class Api:
    """The endpoints' work, apart from the framework: parse and check a request, submit it, shape the answers."""

    def __init__(self, engine: Engine, scheduler: Scheduler, model_name: str, defaults: dict):
        self.engine = engine
        self.scheduler = scheduler
        self.model_name = model_name
        self.defaults = defaults
        self.template = ChatTemplate.of(engine)
        self.created = int(time.time())

    async def start(self, body: dict, chat: bool) -> Job:
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}` "
                                "(GET /v1/models)", "model", "model_not_found")
        _refuse_unsupported(body)
        prompt = self._chat_prompt(body) if chat else self._completion_prompt(body)
        options = self._options(body, chat, len(prompt))
        stream = _flag(body, "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ApiError(400, "stream_options must be an object such as {\"include_usage\": true}", "stream_options")
        include_usage = stream and _flag(stream_options, "include_usage")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(kind: str, req: Request) -> None:  # on the scheduler's thread: a snapshot of the request
            item = (kind, req.text, req.finish_reason, len(req.generated), req.error)
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        try:
            request = Request(self.engine, prompt, GenerateOptions.make(**options))
            self.scheduler.submit(request, listener)
        except ValueError as err:
            raise _bad_field(str(err)) from None
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        return Job(chat, request, events, stream, include_usage)

    def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.engine.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request), "
                            f"got {json.dumps(prompt)[:80]}", "prompt")

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string role", "messages")
            rendered.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
        try:
            return self.template.encode(self.engine, rendered)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None

    def _options(self, body: dict, chat: bool, prompt_len: int) -> dict:
        options = {"temperature": OPENAI_TEMPERATURE, **self.defaults}
        options.update({name: body[name] for name in SAMPLING_FIELDS + SPECULATION_FIELDS
                        if body.get(name) is not None})
        max_tokens = body.get("max_completion_tokens") if chat else None
        max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.engine.max_seq_len - prompt_len) if chat else COMPLETIONS_MAX_TOKENS
        options["max_tokens"] = max_tokens
        options["stop_at_eos"] = not _flag(body, "ignore_eos")  # vLLM's extra field
        if chat and self.template.is_fallback:
            stops = options.get("stop") or []
            options["stop"] = ([stops] if isinstance(stops, str) else list(stops)) + [FALLBACK_STOP]
        return options

    # -- answers ----------------------------------------------------------------------------------------
    async def wait(self, job: Job, http) -> dict:
        """The whole completion; a client that hangs up cancels its request."""
        while True:
            try:
                kind, text, finish, tokens, error = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    job.request.cancel()
                    raise ApiError(499, "the client closed the request") from None
                continue
            if kind == "error":
                raise ApiError(500, error, kind="server_error")
            if kind == "done":
                return self._completion(job, text, finish, tokens)

    async def stream(self, job: Job):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]. A client that disconnects
        ends this generator, which cancels its request."""
        try:
            if job.chat:
                yield _sse(self._chunk(job, {"role": "assistant", "content": ""}, None))
            while True:
                kind, text, finish, tokens, error = await job.events.get()
                if kind == "error":
                    yield _sse(ApiError(500, error, kind="server_error").body())
                    break
                delta, job.sent = text[job.sent:], len(text)
                if delta or kind == "done":
                    yield _sse(self._chunk(job, {"content": delta} if job.chat else delta,
                                           _finish_reason(finish) if kind == "done" else None))
                if kind == "done":
                    if job.include_usage:
                        yield _sse({**self._chunk(job, None, None), "choices": [], "usage": self._usage(job, tokens)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.request.cancel()  # a no-op once it finished

    def _chunk(self, job: Job, delta, finish: str | None) -> dict:
        if job.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        return {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                "created": job.created, "model": self.model_name, "choices": [choice]}

    def _completion(self, job: Job, text: str, finish: str, tokens: int) -> dict:
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": _finish_reason(finish)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(finish)}
        return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
                "model": self.model_name, "choices": [choice], "usage": self._usage(job, tokens)}

    def _usage(self, job: Job, tokens: int) -> dict:
        prompt = len(job.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}

    def metrics(self) -> str:
        """Prometheus text: requests, tokens, acceptance per draft position, KV pages."""
        counts = self.scheduler.counts()
        stats = self.scheduler.batch.stats.as_dict()
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP mlc_spec_{name} {help_}", f"# TYPE mlc_spec_{name} {kind}"])
            lines.extend(f"mlc_spec_{name}{labels} {value}" for labels, value in samples)

        metric("requests_running", "gauge", "Requests in the running batch.", [("", counts["running"])])
        metric("requests_waiting", "gauge", "Requests waiting for a sequence slot.", [("", counts["waiting"])])
        metric("requests_finished_total", "counter", "Finished requests by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.scheduler.finished.items())])
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", stats["tokens"])])
        drafted = [(i, d) for i, d in enumerate(stats["drafted_per_position"]) if d]
        metric("drafted_tokens_total", "counter", "Draft tokens verified, by draft position.",
               [(f'{{position="{i + 1}"}}', d) for i, d in drafted])
        metric("accepted_tokens_total", "counter", "Draft tokens accepted, by draft position.",
               [(f'{{position="{i + 1}"}}', stats["accepted_per_position"][i]) for i, _ in drafted])
        metric("acceptance_rate", "gauge", "Accepted over drafted, by draft position.",
               [(f'{{position="{i + 1}"}}', stats["acceptance_per_position"][i]) for i, _ in drafted])
        metric("mean_accepted_length", "gauge", "Tokens committed per sequence and target forward.",
               [("", stats["mean_accepted_length"])])
        usage = self.engine.cache_usage()
        for name, key, help_ in (("kv_sequences", "sequences", "Sequences held by the KV cache."),
                                 ("kv_pages_free", "free_pages", "Free KV cache pages.")):
            metric(name, "gauge", help_, [(f'{{model="{m}"}}', u[key]) for m, u in usage.items()])
        metric("kv_pages_in_use", "gauge", "KV cache pages in use.",
               [(f'{{model="{m}"}}', u["total_pages"] - u["free_pages"]) for m, u in usage.items()])
        return "\n".join(lines) + "\n"


def _message_text(content, i: int) -> str:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are taken."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def _refuse_unsupported(body: dict) -> None:
    for name, no_op in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != no_op:
            hint = " (one choice per request)" if name == "n" else ""
            raise ApiError(400, f"{name} is not supported by this server{hint}; leave it out", name)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(value)[:40]}", name)
    return value


def _bad_field(message: str) -> ApiError:
    """A 400 naming the field the API's check names first (its messages start with the option's name)."""
    name = message.split(" ", 1)[0]
    known = SAMPLING_FIELDS + SPECULATION_FIELDS + ("max_tokens",)
    if "KV cache holds" in message:
        return ApiError(400, message, None, "context_length_exceeded")
    return ApiError(400, message, name if name in known else None)


def _finish_reason(finish: str | None) -> str:
    return finish if finish in ("stop", "length") else "stop"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
