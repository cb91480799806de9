"""mlc_spec bench runs end to end on a tiny pair and writes the figures as JSON."""

from __future__ import annotations

import json

from mlc_spec.cli import main as cli


def test_bench_writes_valid_json(artifacts, tmp_path, capsys):
    target = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=320)
    draft = artifacts.checkpoint("perturbed", arch="llama", vocab_size=320, perturb_from=target, noise=0.1)
    artifact = artifacts.compile("spec-partial", target, draft, max_seq_len=128)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("once upon a time\nthe quick brown fox\n")
    out = tmp_path / "bench.json"
    assert cli(["bench", str(artifact), "--prompts", str(prompts), "--draft-length", "2", "4", "--max-tokens", "12",
                "--json", str(out), "--compare-hf", "--prefill-tokens", "40", "300"]) == 0
    table = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["prompts"] == 2 and r["memory_bandwidth_gbs"] > 0
    assert set(r["costs"]["verify_over_decode"]) == {str(k) for k in range(1, 9)}
    assert r["costs"]["target_decode_ms"] > 0 and r["costs"]["draft_over_target"] > 0
    # 300 tokens do not fit the artifact's max_seq_len of 128
    assert set(r["prefill"]) == {"40"} and len(r["prefill"]["40"]["chunk_seconds"]) == 1
    assert r["prefill"]["40"]["tokens_per_second"] > 0 and r["prefill"]["40"]["decode_ms_after"] > 0
    runs = r["end_to_end"]
    assert set(runs) == {"target_only", "draft k=2", "draft k=4", "draft k=2 c=0.2", "draft k=4 c=0.2", "tree w=2 d=2",
                         "tree w=2 d=4", "ngram k=2", "ngram k=4", "draft auto"}
    assert all(run["tokens"] == 24 for run in runs.values())
    assert runs["target_only"]["speedup"] == 1.0
    assert len(runs["draft k=4"]["acceptance_per_position"]) == len(runs["tree w=2 d=4"]["acceptance_per_position"]) == 4
    # the partially agreeing draft gets part of each tree accepted
    assert runs["tree w=2 d=4"]["acceptance_rate"] > 0
    assert 0 <= runs["draft k=4"]["host_share"] <= 1
    assert r["hf"]["plain_tokens_per_second"] > 0 and r["hf"]["assisted_tokens_per_second"] > 0
    assert "verify(k) / decode" in table and "draft k=4" in table and "tree w=2 d=4" in table
    assert "prefill 40 tokens" in table
    assert r["workload"] == "file"
    assert r["formats"] == {} and "target weights: float" in table


def test_weight_formats_count_each_linear_once_per_format():
    """The format row: a fused linear whose parts differ (Q4_K_M's q/k/v) counts in both formats."""
    from mlc_spec.bench import weight_formats

    assert weight_formats({"a": "q4_k", "b": ["q4_k", "q4_k", "q6_k"], "lm_head": "q6_k"}) == {"q4_k": 2, "q6_k": 2}


def test_repetitive_workload_repeats_a_passage(artifacts):
    from mlc_spec import Engine
    from mlc_spec.bench import PASSAGE, REPETITIVE_PROMPTS, _prompts

    target = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=320)
    engine = Engine(artifacts.compile("llama-gqa2-untied", target))
    prompts = _prompts(engine, None, "repetitive")
    assert len(prompts) == len(REPETITIVE_PROMPTS)
    passage = engine.encode(PASSAGE, add_special_tokens=False)
    assert all(_contains(p, passage[1:-1]) for p in prompts[:3])  # tokens at the passage's edges may merge


def _contains(tokens, part):
    return any(tokens[i:i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_blank_prompts_file_is_one_error_line(artifacts, tmp_path, capsys):
    target = artifacts.checkpoint("llama-gqa2-untied", arch="llama", vocab_size=320)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    artifact = artifacts.compile("llama-gqa2-untied", target)
    capsys.readouterr()  # drop what the fixtures printed
    assert cli(["bench", str(artifact), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no prompts" in err


def test_a_bad_option_is_refused_before_measuring(tmp_path, capsys):
    assert cli(["bench", str(tmp_path / "never-loaded"), "--draft-length", "2", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draft_length must be between 0 and 32" in err


def test_ctrl_c_inside_tvm_is_interrupted_not_an_error(capsys, monkeypatch):
    """FM: TVM turns the KeyboardInterrupt of a Ctrl-C inside its Python callbacks (the compiler's passes)
    into an empty RuntimeError, which was reported as `error: ` with exit status 2."""
    import os
    import signal
    import time

    import tvm

    from mlc_spec import bench

    @tvm.register_global_func("mlc_spec_test.ctrl_c", override=True)
    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs here, inside the callback

    monkeypatch.setattr(bench, "_check_options", lambda _args: tvm.get_global_func("mlc_spec_test.ctrl_c")())
    # Python's own Ctrl-C handler, as in a terminal, also where the suite runs as a background job (SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli(["bench"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == "interrupted\n"


# what format_table needs of a bench run, no end-to-end rows
TABLE = {"artifact": "a", "prompts": 1, "workload": "chat", "max_tokens": 4, "formats": {},
         "memory_bandwidth_gbs": 10.0, "decode_bandwidth_gbs": 5.0,
         "costs": {"target_decode_ms": 1.0, "verify_over_decode": {}}, "prefill": {}, "end_to_end": {}}
PREFILL = {"seconds": 1.0, "tokens_per_second": 2000.0, "chunk_seconds": [1.0], "decode_ms_after": 3.0}


def test_llamacpp_prefill_is_timed_on_the_same_prompts(monkeypatch):
    """compare_llamacpp feeds llama.cpp the prompts prefill_costs times, from an empty cache each, then
    times single-token decodes after each, which the table prints beside ours."""
    from mlc_spec.bench import _prefill_prompt, compare_llamacpp, format_table, open_llamacpp

    llama, engine = _fake_llamacpp(monkeypatch)
    llm = open_llamacpp(engine, [40, 2000])
    assert llm.n_ctx >= 2005  # the longest prompt and the decodes after it
    out = compare_llamacpp(llm, engine, [40, 2000])
    assert set(out["prefill_seconds"]) == set(out["decode_ms_after"]) == {40, 2000}
    short, long = _prefill_prompt(engine, 40), _prefill_prompt(engine, 2000)
    assert llama.calls[:14] == ["reset", short, *[short[-1:]] * 5, "reset", long, *[long[-1:]] * 5]
    line = next(l for l in format_table({**TABLE, "prefill": {2000: PREFILL}, "llamacpp": out}).splitlines()
                if l.startswith("prefill 2000 tokens:"))
    assert line.count("then decode") == 2, line
    assert "decode_ms_after" not in format_table({**TABLE, "llamacpp": out})


def test_end_to_end_runs_take_turns_prompt_by_prompt(monkeypatch):
    """Every prompt goes through every run, llama.cpp's included, before the next prompt: run one after
    another, rows drifted 10-20% apart on a noisy machine. The table names the fastest speculative run
    against the target alone and llama.cpp."""
    import types

    from mlc_spec import bench

    llama, engine = _fake_llamacpp(monkeypatch)
    order = []

    def generate(token_ids, max_tokens, stop_at_eos, speculative, draft_length=0, **opts):
        order.append((token_ids[0], "target_only" if not speculative else f"{speculative} {draft_length}"))
        llama.calls.append(None)  # llama.cpp's turn comes after every run of ours on that prompt
        stats = {"rounds": max_tokens, "accepted_per_position": [0] * 4, "drafted_per_position": [0] * 4}
        return types.SimpleNamespace(token_ids=[0] * max_tokens, stats=stats)

    engine.generate, engine.has_draft, engine.drafts_trees = generate, False, False
    engine.target, engine.draft = types.SimpleNamespace(lib=types.SimpleNamespace(compiled_seconds=0.0)), None
    runs = bench.end_to_end(engine, [[1], [2]], 4, [1, 2], [0.0], 2, llm=bench.open_llamacpp(engine, []))
    assert order == [(p, run) for p in (1, 2) for run in ("target_only", "ngram 1", "ngram 2")]
    assert [c for c in llama.calls if c != "reset"] == [None] * 3 + [[1]] + [None] * 3 + [[2]]
    assert list(runs) == ["target_only", "ngram k=1", "ngram k=2", "llama.cpp"]
    assert runs["llama.cpp"]["tokens"] == 8 and runs["llama.cpp"]["decode_tokens_per_second"] > 0
    table = bench.format_table({**TABLE, "end_to_end": runs}).splitlines()
    assert table[-1].startswith("fastest speculative run: ngram k=") and table[-1].endswith("x llama.cpp end to end")
    assert next(l for l in table if l.startswith("llama.cpp")).endswith("tok/s")


def _fake_llamacpp(monkeypatch):
    """llama_cpp with a Llama that records what it is asked, and an engine of a GGUF target for it."""
    import sys
    import types

    calls = []

    class Llama:
        def __init__(self, model_path, n_threads, n_ctx, verbose):
            self.n_ctx = n_ctx

        def reset(self):
            calls.append("reset")

        def eval(self, tokens):
            calls.append(list(tokens))

        def generate(self, ids, temp, top_k):
            calls.append(list(ids))
            yield from range(100)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    target = types.SimpleNamespace(source="model.gguf")
    engine = types.SimpleNamespace(config=types.SimpleNamespace(models={"target": target}, vocab_size=320))
    return types.SimpleNamespace(calls=calls), engine
