"""mlc_spec serve, live on 127.0.0.1, driven by the official openai client and by raw HTTP: completions and
chat, streamed and not, stops, seeds, usage; 48 concurrent mixed requests against their outputs alone;
bad input answered with OpenAI's error JSON while the server keeps serving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlc_spec import Engine

openai = pytest.importorskip("openai", reason='the server tests need pip install -e ".[test]" (openai, httpx)')
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason='mlc_spec serve needs pip install -e ".[serve]"')

TIMEOUT = 60  # seconds for any one HTTP call: a hang fails instead of blocking the suite
PROMPTS = ["once upon a time", "the quick brown fox", "speculative decoding drafts", "numbers like 12345",
           "a little cat", "the sun shines", "questions? and", "lived in a house"]


@pytest.fixture(scope="module")
def engine(partial_artifact) -> Engine:
    """The server's artifact in this process: what each request gives run alone through the Python API."""
    return Engine(partial_artifact, max_batch_size=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(partial_artifact, tmp_path_factory):
    port = free_port()
    logs = tmp_path_factory.mktemp("serve")
    out, err = open(logs / "stdout", "w+"), open(logs / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mlc_spec.cli", "serve", str(partial_artifact), "--port", str(port),
                             "--max-batch", "4", "--max-waiting", "64", "--draft-length", "3"],
                            stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err.seek(0)
            pytest.fail(f"the server did not start: {err.read()[-2000:]}")
        time.sleep(0.3)
    yield {"base": base, "proc": proc, "stdout": out, "stderr": err}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def metrics(server) -> dict[str, float]:
    text = httpx.get(server["base"] + "/metrics", timeout=TIMEOUT).text
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                     if line and not line.startswith("#"))}


def wait_idle(server) -> dict[str, float]:
    """The metrics once nothing runs or waits (a cancelled stream is dropped at the server's next step)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        m = metrics(server)
        if m["mlc_spec_requests_running"] == 0 and m["mlc_spec_requests_waiting"] == 0 or time.monotonic() > deadline:
            return m


def assert_nothing_held(m: dict[str, float]) -> None:
    assert m["mlc_spec_requests_running"] == 0 and m["mlc_spec_requests_waiting"] == 0
    for role in ("target", "draft"):
        assert m[f'mlc_spec_kv_sequences{{model="{role}"}}'] == 0
        assert m[f'mlc_spec_kv_pages_in_use{{model="{role}"}}'] == 0


# -- the openai client -----------------------------------------------------------------------------------
def test_models_lists_the_artifact(client, partial_artifact):
    assert [m.id for m in client.models.list().data] == [partial_artifact.name]


def test_completions_streamed_or_not_are_the_api_output(client, model, engine):
    want = engine.generate(PROMPTS[0], max_tokens=12, temperature=0.0, stop_at_eos=False)
    out = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(engine.encode(PROMPTS[0])), 12)
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_streamed_or_not_uses_the_chat_template(client, model, engine):
    from mlc_spec.chat import FALLBACK_STOP, ChatTemplate

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[1]}]
    ids = ChatTemplate.of(engine).encode(engine, messages)
    want = engine.generate(token_ids=ids, max_tokens=10, temperature=0.0, stop=FALLBACK_STOP)
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want.token_ids)
    assert out.choices[0].finish_reason == want.finish_reason
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_a_stop_string_ends_the_text_before_it(client, model):
    full = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    out = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_a_seed_reproduces_a_sampled_completion(client, model, engine):
    """With a fixed draft length, the server's draws are the Python API's for that seed."""
    options = dict(max_tokens=20, temperature=0.9, top_p=0.95, seed=11)
    runs = [client.completions.create(model=model, prompt=PROMPTS[3], extra_body={"top_k": 40, "draft_length": 3},
                                      **options).choices[0].text for _ in range(2)]
    other = client.completions.create(model=model, prompt=PROMPTS[3], extra_body={"top_k": 40, "draft_length": 3},
                                      **{**options, "seed": 12}).choices[0].text
    assert runs[0] == runs[1] == engine.generate(PROMPTS[3], top_k=40, draft_length=3, **options).text
    assert other != runs[0]


# -- concurrency -------------------------------------------------------------------------------------------
def mixed_request(i: int) -> dict:
    """Greedy and seeded sampled, speculative on and off, different lengths, streamed or not."""
    body = dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=6 + (i * 7) % 30, ignore_eos=True)
    if i % 3 == 1:
        body.update(temperature=0.8, seed=i, draft_length=2 + i % 3)
    else:
        body.update(temperature=0)
    if i % 4 == 2:
        body["speculative"] = False
    body["stream"] = i % 5 == 0
    return body


def post_completion(server, body: dict) -> str:
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        if not body["stream"]:
            return json.loads(r.read())["choices"][0]["text"]
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


def test_48_concurrent_mixed_requests_get_their_outputs_alone(server, engine):
    bodies = [mixed_request(i) for i in range(48)]
    api_names = ("max_tokens", "temperature", "seed", "draft_length", "speculative")
    want = [engine.generate(b["prompt"], stop_at_eos=False, **{k: b[k] for k in api_names if k in b}).text
            for b in bodies]
    start = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda b: post_completion(server, b), bodies))
    assert time.monotonic() - start < 5 * TIMEOUT
    assert [i for i, (a, b) in enumerate(zip(got, want)) if a != b] == []
    m = wait_idle(server)
    assert_nothing_held(m)
    assert m["mlc_spec_generated_tokens_total"] >= sum(b["max_tokens"] for b in bodies)
    assert m["mlc_spec_mean_accepted_length"] > 1.0  # the partial draft is accepted now and then
    assert m['mlc_spec_drafted_tokens_total{position="1"}'] >= m['mlc_spec_accepted_tokens_total{position="1"}'] > 0


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{not json", 400, "the request body is not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "the request body must be a JSON object"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens must be >= 1, got -1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens must be between 1 and 2147483647"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 400, "lower max_tokens to at most"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "draft_confidence": 2}, 400, "draft_confidence must be in [0, 1]"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop must be a string or a list of strings"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n is not supported"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt must be a string or a list of token ids"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "the model `gpt-4` does not exist"),
    ("/v1/completions", {"prompt": "word " * 200}, 400, "but the KV cache holds 128 per sequence"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400,
     "stream must be true or false"),
    ("/v1/nowhere", {}, 404, "Not Found"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_an_openai_error_and_the_server_goes_on(server, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server["base"] + path, content=content, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    if status == 400 and error["param"]:
        assert error["param"] in error["message"]
    ok = httpx.post(server["base"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=TIMEOUT)
    assert ok.status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server):
    body = {"prompt": PROMPTS[4], "max_tokens": 110, "temperature": 0, "stream": True, "ignore_eos": True,
            "speculative": False}
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert next(r.iter_lines()).startswith("data: ")
    assert_nothing_held(wait_idle(server))
    assert httpx.post(server["base"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                      timeout=TIMEOUT).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(engine):
    """The app in this process over a scheduler that was never started and admits no one waiting."""
    from mlc_spec.runtime.scheduler import Scheduler
    from mlc_spec.serve import create_app

    app = create_app(engine, Scheduler(engine, max_waiting=0), "tiny", {})
    transport = httpx.ASGITransport(app=app)

    async def post():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=TIMEOUT)

    import asyncio

    r = asyncio.run(post())
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


# -- logs ---------------------------------------------------------------------------------------------------
def test_stdout_stays_empty_and_each_request_logs_one_line(server, client, model):
    client.completions.create(model=model, prompt=PROMPTS[5], max_tokens=4)
    wait_idle(server)
    server["stdout"].seek(0), server["stderr"].seek(0)
    assert server["stdout"].read() == ""
    lines = [line for line in server["stderr"].read().splitlines() if ": request " in line]
    assert lines and all("prompt tokens" in line and "tok/s" in line and "acceptance" in line for line in lines)


def test_serve_without_its_extra_says_how_to_install(monkeypatch, capsys):
    from mlc_spec.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == 'error: mlc_spec serve needs FastAPI and uvicorn: pip install -e ".[serve]"'
