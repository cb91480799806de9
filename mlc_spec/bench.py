"""mlc_spec bench: the figures that decide whether speculation pays, measured side by side in one run.

Everything is measured in the same process, and what is compared takes turns (forward sizes repeat by
repeat, end-to-end runs prompt by prompt), so ratios hold on a noisy machine: memory bandwidth (a large
numpy copy), target decode cost and the bandwidth it achieves, the cost of a verify forward of k+1
tokens against one decode, the draft's decode cost, acceptance per draft position, end-to-end greedy
tokens per second with and without speculation (draft chains, draft token trees and n-gram lookup side
by side, and llama.cpp's on the same GGUF), the share of time spent outside the compiled code (Python
and the host side of TVM calls), and the target's prefill of long prompts, chunk by chunk. The
repetitive workload asks for a passage repeated or lightly edited, where n-gram lookup and deep
acceptance pay most.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .runtime.arrays import to_device
from .runtime.engine import GenerateOptions
from .runtime.speculative import DRAFT_CONFIDENCE

DEFAULT_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Summarise the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between a virus and a bacterium?",
    "Describe a good morning routine.",
]
PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
           "the great lens until it shone, and wound the clockwork that turned the light. Ships far out at sea "
           "counted its flashes and knew exactly where the rocks lay.")
REPETITIVE_PROMPTS = [
    f"Repeat the following passage word for word:\n\n{PASSAGE}",
    f"Rewrite the following passage, changing 'lighthouse keeper' to 'old sailor' and nothing else:\n\n{PASSAGE}",
    f"Copy this passage, then copy it again:\n\n{PASSAGE}",
    f"Fix any mistakes in the following passage and return all of it:\n\n{PASSAGE.replace('the', 'teh', 2)}",
]
WORKLOADS = {"chat": DEFAULT_PROMPTS, "repetitive": REPETITIVE_PROMPTS}
PREFILL_TOKENS = (512, 2000)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure decode, verify, acceptance and speculative speedup")
    p.add_argument("artifact", nargs="?", help="artifact folder (default: the embedded default pair)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", help="a file with one prompt per line (default: the --workload's prompts)")
    p.add_argument("--workload", choices=WORKLOADS, default="chat",
                   help="built-in prompts: chat questions, or a passage to repeat or edit (default chat)")
    p.add_argument("--draft-length", type=int, nargs="+", default=[2, 4, 6],
                   help="k values (chains) and depths (trees) to run end to end")
    p.add_argument("--draft-confidence", type=float, nargs="+", default=[0.0, DRAFT_CONFIDENCE],
                   help="thresholds at which the draft's chains stop (0: every chain drafts k; default "
                        "%(default)s); draft auto runs with the API's own")
    p.add_argument("--tree-width", type=int, default=GenerateOptions.tree_width,
                   help="children per node of the token trees (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=list(PREFILL_TOKENS),
                   help="prompt lengths whose target prefill, and the decode after it, are timed (default %(default)s; "
                        "those that leave no room in the artifact's max_seq_len are skipped)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers plain and assisted generation")
    p.add_argument("--compare-llamacpp", action="store_true",
                   help="also time llama-cpp-python's plain generation (taking turns with ours), prefill and decode")
    p.set_defaults(run=run)


def run(args) -> int:
    from .runtime.engine import Engine

    _check_options(args)
    artifact = Path(args.artifact) if args.artifact else _default_artifact()
    engine = Engine(artifact, device=args.device)
    prompts = _prompts(engine, args.prompts, args.workload)
    results = {"artifact": str(artifact), "device": args.device, "prompts": len(prompts),
               "workload": "file" if args.prompts else args.workload, "max_tokens": args.max_tokens}
    results["formats"] = weight_formats(engine.config.models["target"].quantization)
    results["memory_bandwidth_gbs"] = memory_bandwidth()
    results["costs"] = forward_costs(engine)
    results["decode_bandwidth_gbs"] = (engine.config.models["target"].decode_bytes
                                       / results["costs"]["target_decode_ms"] / 1e6)
    results["prefill"] = prefill_costs(engine, args.prefill_tokens)
    llm = None
    if args.compare_llamacpp:
        llm = open_llamacpp(engine, list(results["prefill"]))
        results["llamacpp"] = compare_llamacpp(llm, engine, list(results["prefill"]))
    results["end_to_end"] = end_to_end(engine, prompts, args.max_tokens, args.draft_length, args.draft_confidence,
                                       args.tree_width, llm)
    if args.compare_hf:
        results["hf"] = compare_hf(engine, prompts, args.max_tokens)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def _check_options(args) -> None:
    """The API's own checks, before minutes of measuring rather than after."""
    for k in args.draft_length:
        GenerateOptions.make(max_tokens=args.max_tokens, draft_length=k)
    for confidence in args.draft_confidence:
        GenerateOptions.make(draft_confidence=confidence)
    GenerateOptions.make(tree_width=args.tree_width, tree_depth=1)


def _default_artifact() -> Path:
    from .default_model import default_artifact

    return default_artifact()


def _prompts(engine, path: str | None, workload: str = "chat") -> list[list[int]]:
    """Each prompt as a user turn in the model's chat template (as chat sends it), raw without one."""
    from .chat import ChatTemplate

    texts = [t for t in (Path(path).read_text(errors="replace").splitlines() if path else WORKLOADS[workload])
             if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no prompts; write one per line, or leave out --prompts for the built-in ones")
    template = ChatTemplate.of(engine)
    if template.is_fallback:
        return [engine.encode(t) for t in texts]
    return [template.encode(engine, [{"role": "user", "content": t}]) for t in texts]


# -- measurements ---------------------------------------------------------------------------------------------
def weight_formats(quantization: dict) -> dict[str, int]:
    """Quantized linears of the target per format (a fused one whose parts differ counts in each)."""
    counts: dict[str, int] = {}
    for formats in quantization.values():
        for fmt in {formats} if isinstance(formats, str) else set(formats):
            counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def memory_bandwidth(megabytes: int = 256) -> float:
    """GB/s of a large numpy copy, read plus write, best of five."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_costs(engine, context: int = 64, repeats: int = 9) -> dict:
    """Median milliseconds of one decode and of verify forwards of k+1 tokens, on a live sequence. Each
    repeat times the decode and every verify in turn, so a machine that slows down during the run (its
    clock, its neighbours) weighs on all of them alike: timed one size after another, the default
    target's verify(4)/decode read 1.55 where interleaved it read 1.19 minutes apart."""
    costs = {}
    with engine.session() as session:
        session.tokens[:] = list(range(10, 10 + context))
        for role, model in (("target", engine.target), ("draft", engine.draft)):
            if model is None:
                continue
            kv, lib, seq = model.kv, model.lib, session.seq_id
            forward = _feature_forward(engine) if lib.kind == "eagle" else lib.forward_last
            forward(kv, [seq], [session.tokens])
            sizes = [1] + ([k + 1 for k in range(1, 9)] if role == "target" else [])
            seconds = {n: [] for n in sizes}
            for _ in range(repeats):
                for n in sizes:
                    seconds[n].append(_forward_seconds(model, seq, n, forward))
            decode = statistics.median(seconds[1])
            costs[f"{role}_decode_ms"] = decode * 1e3
            if role == "target":
                costs["verify_over_decode"] = {n - 1: statistics.median(seconds[n]) / decode for n in sizes[1:]}
    if "draft_decode_ms" in costs:
        costs["draft_over_target"] = costs["draft_decode_ms"] / costs["target_decode_ms"]
    return costs


def _forward_seconds(model, seq: int, n: int, forward_last=None) -> float:
    """Seconds of a forward of n tokens (a decode when n is 1, by forward_last: the library's own, or a
    feature draft's) on seq, undone after it."""
    tokens = list(range(200, 200 + n))
    forward_last = forward_last or model.lib.forward_last
    seconds = _timed(lambda: (model.lib.forward_all(model.kv, [seq], [tokens]) if n > 1
                              else forward_last(model.kv, [seq], [tokens])).numpy())
    model.kv.popn(seq, n)
    return seconds


def _feature_forward(engine):
    """A feature draft's forward_last for timing: the target's embeddings of the tokens, zero features
    (a chained step's own ones for one token per sequence, the target's for more)."""
    lib, entry = engine.draft.lib, engine.config.models["draft"]
    hidden = entry.config["hidden_size"]

    def forward(kv, seq_ids, token_lists):
        tokens = [t for tokens in token_lists for t in tokens]
        embeds = engine.target.lib.embed(tokens)
        if len(tokens) == len(seq_ids):
            g = to_device(np.zeros((len(tokens), hidden)), lib.dev, embeds.dtype)
            return lib.forward_own_features(kv, seq_ids, embeds, g)[0]
        features = np.zeros((len(tokens), hidden * (len(entry.feature_layers or ()) + 1)), embeds.dtype)
        return lib.forward_features(kv, seq_ids, [len(t) for t in token_lists], embeds, features)[0]

    return forward


DECODES_AFTER_PREFILL = 5  # timed after each prefill, ours and llama.cpp's; their median is reported


def prefill_costs(engine, lengths: list[int]) -> dict:
    """Seconds the target takes to prefill a prompt of n tokens, fed in the artifact's chunks as generate
    feeds them, with each chunk's seconds: a later chunk also attends to every token cached before it.
    Then the milliseconds of a decode after those n tokens, whose attention reads all of them."""
    model, chunk, costs = engine.target, engine.prefill_chunk, {}
    for n in (n for n in lengths if n < engine.max_seq_len):
        tokens = _prefill_prompt(engine, n)
        with engine.session() as session:
            chunks = [_timed(lambda lo=lo: model.lib.forward_last(model.kv, [session.seq_id],
                                                                  [tokens[lo:lo + chunk]]).numpy())
                      for lo in range(0, n, chunk)]
            decode = statistics.median(_forward_seconds(model, session.seq_id, 1)
                                       for _ in range(DECODES_AFTER_PREFILL))
        costs[n] = {"seconds": sum(chunks), "tokens_per_second": n / sum(chunks), "chunk_seconds": chunks,
                    "decode_ms_after": decode * 1e3}
    return costs


def _prefill_prompt(engine, n: int) -> list[int]:
    """n token ids, the same for every run and for llama.cpp: attention costs do not depend on them."""
    return [int(t) for t in np.random.default_rng(n).integers(0, engine.config.vocab_size, n)]


def end_to_end(engine, prompts: list[list[int]], max_tokens: int, draft_lengths: list[int],
               confidences: list[float], tree_width: int, llm=None) -> dict:
    """Per k: the draft's chain at each confidence threshold, its tree of depth k (where it fits TVM's
    tree size) and n-gram lookup; with llm, llama.cpp's plain generation too.

    The runs take turns: each prompt goes through every run before the next prompt. Run one after
    another, rows drifted 10-20% apart on a noisy machine (one such bench put the default pair's k = 1
    at 1.39x the target alone, which runs taking turns measured at 1.17-1.22x); taking turns spreads
    the drift over every row alike."""
    runs = _settings(engine, draft_lengths, confidences, tree_width)
    parts, llamacpp = {name: [] for name in runs}, []
    for ids in prompts:
        for name, opts in runs.items():
            parts[name].append(_generate(engine, ids, max_tokens, **opts))
        if llm is not None:
            llamacpp.append(_llamacpp_generate(llm, ids, max_tokens))
    totals = {name: _totals(parts[name], opts) for name, opts in runs.items()}
    if llamacpp:
        totals[LLAMACPP] = _llamacpp_totals(llamacpp)
    base = totals["target_only"]["tokens_per_second"]
    for r in totals.values():
        r["speedup"] = r["tokens_per_second"] / base
    return totals


def _settings(engine, draft_lengths: list[int], confidences: list[float], tree_width: int) -> dict[str, dict]:
    """Each run's name and generate options."""
    from .runtime.speculative import MAX_TREE_NODES, tree_size

    runs = {"target_only": dict(speculative=False, draft_length=0)}
    for k in draft_lengths:
        if engine.has_draft:
            for c in confidences:
                runs[f"draft k={k}" + (f" c={c:g}" if c else "")] = dict(speculative="draft", draft_length=k,
                                                                          draft_confidence=c)
            if engine.drafts_trees and tree_size(tree_width, k) <= MAX_TREE_NODES:
                runs[f"tree w={tree_width} d={k}"] = dict(speculative="tree", tree_width=tree_width, tree_depth=k)
        runs[f"ngram k={k}"] = dict(speculative="ngram", draft_length=k)
    if engine.has_draft:
        runs["draft auto"] = dict(speculative="draft", draft_length="auto")
    return runs


def _generate(engine, ids: list[int], max_tokens: int, **opts) -> dict:
    """One greedy generation: its tokens, rounds, acceptance counts and seconds, inside compiled calls
    and in all."""
    libs = [engine.target.lib] + ([engine.draft.lib] if engine.draft is not None else [])
    compiled_before, start = sum(lib.compiled_seconds for lib in libs), time.perf_counter()
    out = engine.generate(token_ids=ids, max_tokens=max_tokens, stop_at_eos=False, **opts)
    seconds = time.perf_counter() - start
    return {"tokens": len(out.token_ids), "rounds": out.stats["rounds"], "seconds": seconds,
            "compiled_seconds": sum(lib.compiled_seconds for lib in libs) - compiled_before,
            "accepted": np.array(out.stats["accepted_per_position"]),
            "drafted": np.array(out.stats["drafted_per_position"])}


def _totals(parts: list[dict], opts: dict) -> dict:
    """A run's figures over all its prompts."""
    tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    acc, drafted = sum(p["accepted"] for p in parts), sum(p["drafted"] for p in parts)
    k = opts.get("tree_depth", opts.get("draft_length"))
    k = int((drafted > 0).sum()) if k == "auto" else k
    return {
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "tokens_per_target_call": tokens / sum(p["rounds"] for p in parts),
        "acceptance_rate": float(acc.sum() / drafted.sum()) if drafted.sum() else 0.0,
        "acceptance_per_position": [float(x / y) if y else 0.0 for x, y in zip(acc[:k], drafted[:k])],
        "host_share": (seconds - sum(p["compiled_seconds"] for p in parts)) / seconds,
    }


def compare_hf(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """transformers on the same checkpoints, prompts and max tokens, greedy, plain and assisted."""
    import torch
    from transformers import AutoModelForCausalLM

    def load(role: str):
        source = Path(engine.config.models[role].source)
        if source.suffix == ".gguf":
            return AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)

    target = load("target")
    # transformers' assisted generation runs a draft model, not a feature draft
    assistant = load("draft") if engine.has_draft and engine.config.models["draft"].kind == "model" else None
    out = {}
    for name, extra in (("plain", {}), ("assisted", {"assistant_model": assistant})):
        if name == "assisted" and assistant is None:
            continue
        tokens, start = 0, time.perf_counter()
        for ids in prompts:
            with torch.no_grad():
                gen = target.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, **extra)
            tokens += gen.shape[1] - len(ids)
        out[f"{name}_tokens_per_second"] = tokens / (time.perf_counter() - start)
    return out


LLAMACPP = "llama.cpp"  # its row among the end-to-end runs


def _llamacpp_totals(parts: list[dict]) -> dict:
    """llama.cpp's figures over all the prompts: end to end, and its decode alone."""
    tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    decode = sum(p["decode_seconds"] for p in parts)
    return {"tokens": tokens, "tokens_per_second": tokens / seconds,
            "decode_tokens_per_second": sum(p["tokens"] - 1 for p in parts) / decode}


def open_llamacpp(engine, prefill_lengths: list[int]):
    """llama-cpp-python's model of the target's GGUF file, with our thread count and room for the
    longest prefill and the decodes after it; None where the target was not compiled from a GGUF file."""
    from llama_cpp import Llama

    source = engine.config.models["target"].source
    if not source.endswith(".gguf"):
        return None
    return Llama(model_path=source, n_threads=_llamacpp_threads(),
                 n_ctx=max([2048, *(n + DECODES_AFTER_PREFILL for n in prefill_lengths)]), verbose=False)


def _llamacpp_threads() -> int:
    import os

    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count()))


def compare_llamacpp(llm, engine, prefill_lengths: list[int]) -> dict:
    """llama.cpp's prefill of the prompts prefill_costs timed (in its default batches of 512 tokens, as
    ours are chunked), each from an empty cache, with the decode after it (attention over the whole
    prompt: a long chat's decode). Its end-to-end generation takes turns with ours in end_to_end."""
    if llm is None:
        return {"skipped": "the target was not compiled from a GGUF file"}
    prefill, decode_after = {}, {}
    for n in prefill_lengths:
        llm.reset()
        prompt = _prefill_prompt(engine, n)
        prefill[n] = _timed(lambda: llm.eval(prompt))
        decode_after[n] = 1e3 * statistics.median(_timed(lambda: llm.eval(prompt[-1:]))
                                                  for _ in range(DECODES_AFTER_PREFILL))
    return {"threads": _llamacpp_threads(), "prefill_seconds": prefill, "decode_ms_after": decode_after}


def _llamacpp_generate(llm, ids: list[int], max_tokens: int) -> dict:
    """One greedy generation by llama.cpp from an empty cache: its seconds in all (prompt included, as
    ours) and after its first token (one decode per token from there)."""
    llm.reset()
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1)):
        if i == 0:
            first = time.perf_counter()
        if i + 1 >= max_tokens:
            break
    end = time.perf_counter()
    return {"tokens": max_tokens, "seconds": end - start, "decode_seconds": end - first}


# -- report ---------------------------------------------------------------------------------------------------
def format_table(r: dict) -> str:
    c = r["costs"]
    lines = [
        f"artifact: {r['artifact']} ({r['prompts']} {r['workload']} prompts, {r['max_tokens']} tokens each, greedy)",
        "target weights: " + (", ".join(f"{fmt} {n} linears" for fmt, n in sorted(r["formats"].items()))
                              or "float"),
        f"memory bandwidth (numpy copy): {r['memory_bandwidth_gbs']:.1f} GB/s",
        f"target decode: {c['target_decode_ms']:.2f} ms/token, weights read at {r['decode_bandwidth_gbs']:.1f} GB/s "
        f"({r['decode_bandwidth_gbs'] / r['memory_bandwidth_gbs']:.0%} of the copy bandwidth)",
        "verify(k) / decode: " + "  ".join(f"k={k}: {v:.2f}x" for k, v in c["verify_over_decode"].items()),
    ]
    if "draft_over_target" in c:
        lines.append(f"draft decode: {c['draft_decode_ms']:.2f} ms/token = {c['draft_over_target']:.2f} of the target's")
    llamacpp = r.get("llamacpp", {})
    for n, p in r["prefill"].items():
        lines.append(f"prefill {n} tokens: {p['seconds']:.2f} s, {p['tokens_per_second']:.0f} tok/s "
                     f"(chunks: {' '.join(f'{s:.2f}' for s in p['chunk_seconds'])} s), "
                     f"then decode {p['decode_ms_after']:.2f} ms/token"
                     + _llamacpp_long_context(llamacpp, n))
    lines.append(f"{'run':<16}{'tok/s':>8}{'speedup':>9}{'accept':>8}{'tok/call':>10}{'host':>7}  acceptance per position")
    lines += [_row(name, e) for name, e in r["end_to_end"].items()] + _fastest(r["end_to_end"])
    for name in ("hf", "llamacpp"):
        if name in r:
            lines.append(f"{name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in r[name].items() if k not in LONG_CONTEXT))
    return "\n".join(lines)


def _row(name: str, e: dict) -> str:
    head = f"{name:<16}{e['tokens_per_second']:>8.1f}{e['speedup']:>8.2f}x"
    if name == LLAMACPP:
        return f"{head}{'':>25}  decode {e['decode_tokens_per_second']:.1f} tok/s"
    per = " ".join(f"{a:.2f}" for a in e["acceptance_per_position"])
    return f"{head}{e['acceptance_rate']:>8.2f}{e['tokens_per_target_call']:>10.2f}{e['host_share']:>7.1%}  {per}"


def _fastest(runs: dict) -> list[str]:
    """The fastest speculative run, against the target alone and llama.cpp."""
    spec = [n for n in runs if n not in ("target_only", LLAMACPP)]
    if not spec:
        return []
    best = max(spec, key=lambda n: runs[n]["tokens_per_second"])
    line = f"fastest speculative run: {best}, {runs[best]['speedup']:.2f}x the target alone"
    if LLAMACPP in runs:
        ratio = runs[best]["tokens_per_second"] / runs[LLAMACPP]["tokens_per_second"]
        line += f", {ratio:.2f}x llama.cpp end to end"
    return [line]


LONG_CONTEXT = ("prefill_seconds", "decode_ms_after")  # llama.cpp's figures printed beside ours, per prompt length


def _llamacpp_long_context(llamacpp: dict, n) -> str:
    seconds, decode = llamacpp.get("prefill_seconds", {}), llamacpp.get("decode_ms_after", {})
    if n not in seconds:
        return ""
    return f"; llama.cpp {seconds[n]:.2f} s, {int(n) / seconds[n]:.0f} tok/s, then decode {decode[n]:.2f} ms/token"
