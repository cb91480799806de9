"""Target decode tok/s of artifacts against llama.cpp's decode of the GGUF each was compiled from,
measured interleaved in one process (same threads, same context length), and each artifact's weight
bytes against its file's size:

    python tools/decode_vs_llamacpp.py ARTIFACT [ARTIFACT ...] [--rounds 8] [--tokens 8] [--context 64]

In each round, each artifact decodes --tokens tokens one at a time after --context tokens, then
llama.cpp does the same on the same file; the median round's tok/s is reported, so both sides see
the same load on a shared machine. Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", type=Path)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--context", type=int, default=64)
    args = p.parse_args()

    from llama_cpp import Llama

    from mlc_spec import Engine

    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count()))
    runs = []
    for folder in args.artifacts:
        engine = Engine(folder)
        source = engine.config.models["target"].source
        llm = Llama(model_path=source, n_threads=threads, n_ctx=args.context + args.tokens + 8, verbose=False)
        runs.append((folder, engine, llm, {"ours": [], "llama.cpp": []}))
    context = list(range(10, 10 + args.context))
    for _ in range(args.rounds):
        for folder, engine, llm, times in runs:
            times["ours"].append(_ours(engine, context, args.tokens))
            times["llama.cpp"].append(_llamacpp(llm, context, args.tokens))
    print(f"threads {threads}, context {args.context}, {args.rounds} rounds of {args.tokens} tokens")
    for folder, engine, llm, times in runs:
        model = engine.config.models["target"]
        ours, theirs = (args.tokens / statistics.median(times[k]) for k in ("ours", "llama.cpp"))
        file_bytes = os.path.getsize(model.source)
        print(f"{folder.name}: decode {ours:.1f} tok/s, llama.cpp {theirs:.1f} tok/s ({ours / theirs:.2f}x); "
              f"weights {model.param_bytes / 2**20:.0f} MiB, file {file_bytes / 2**20:.0f} MiB "
              f"({model.param_bytes / file_bytes:.2f}x)")


def _ours(engine, context: list[int], tokens: int) -> float:
    model = engine.target
    with engine.session() as session:
        lib, kv, seq = model.lib, model.kv, session.seq_id
        lib.forward_last(kv, [seq], [context]).numpy()
        start = time.perf_counter()
        for token in range(200, 200 + tokens):
            lib.forward_last(kv, [seq], [[token]]).numpy()
        elapsed = time.perf_counter() - start
        kv.popn(seq, len(context) + tokens)
    return elapsed


def _llamacpp(llm, context: list[int], tokens: int) -> float:
    llm.reset()
    llm.eval(context)
    start = time.perf_counter()
    for token in range(200, 200 + tokens):
        llm.eval([token])
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
