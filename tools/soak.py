"""Memory soak: many short, mixed generate calls on one engine, the process's RSS after each block.

    python tools/soak.py [ARTIFACT] [--calls 1000] [--every 100] [--warmup 100] [--json OUT]

Without ARTIFACT it runs the default pair. The calls mix what the runtime serves: the draft's chain,
its token tree, n-gram lookup, draft_length="auto" and the target alone, greedy and sampled, batches of
1 to 4 prompts of 1 to 512 tokens (capped by the engine's max_seq_len), 1 to 16 new tokens. Every
distinct shape a compiled function sees would keep a buffer in TVM's memory pool for good; the figure
to watch is the growth after warm-up (the issue measured 634 MB -> 2.9 GB over 1000 calls). Exits 1
when the final RSS is more than --tolerance above its value after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

KINDS = [dict(speculative=False), dict(speculative="draft", draft_length=4), dict(speculative="draft", draft_length="auto"),
         dict(speculative="tree", tree_width=2, tree_depth=3), dict(speculative="ngram", draft_length=4)]


def rss_mb() -> float:
    """Resident memory now (Linux), not the peak that getrusage reports."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_call(engine, rng: np.random.Generator) -> None:
    kind = KINDS[rng.integers(len(KINDS))]
    if not engine.has_draft and kind.get("speculative") in ("draft", "tree"):
        kind = dict(speculative="ngram", draft_length=4)
    max_tokens = int(rng.integers(1, 17))
    longest = min(512, engine.max_seq_len - max_tokens - 1)
    vocab = engine.target.lib.vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, longest + 1, int(rng.integers(1, 5)))]
    sampled = bool(rng.random() < 0.5)
    engine.generate(token_ids=prompts, max_tokens=max_tokens, stop_at_eos=False, temperature=0.8 if sampled else 0.0,
                    seed=int(rng.integers(2**31)), **kind)


def soak(engine, calls: int, every: int, warmup: int, seed: int = 0, log=print) -> dict:
    rng = np.random.default_rng(seed)
    figures, start = [], time.perf_counter()
    for i in range(1, calls + 1):
        one_call(engine, rng)
        if i % every == 0 or i == warmup:
            figures.append({"calls": i, "rss_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)})
            log(f"{i:>6} calls  {figures[-1]['rss_mb']:>8.1f} MB  {figures[-1]['seconds']:>7.1f} s")
    after_warmup = next(f["rss_mb"] for f in figures if f["calls"] == warmup)
    usage = engine.cache_usage()
    return {"figures": figures, "rss_after_warmup_mb": after_warmup, "rss_final_mb": figures[-1]["rss_mb"],
            "growth": figures[-1]["rss_mb"] / after_warmup - 1,
            "sequences_left": sum(u["sequences"] for u in usage.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", help="artifact folder (default: the default pair)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="report RSS every N calls")
    parser.add_argument("--warmup", type=int, default=100, help="calls before the reference RSS")
    parser.add_argument("--tolerance", type=float, default=0.2, help="allowed growth after warm-up (default 0.2)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    from mlc_spec import Engine

    if args.artifact:
        artifact = Path(args.artifact)
    else:
        from mlc_spec.default_model import default_artifact

        artifact = default_artifact()
    engine = Engine(artifact, max_batch_size=4)
    print(f"{artifact}: start {rss_mb():.1f} MB")
    result = soak(engine, args.calls, args.every, args.warmup)
    print(f"after warm-up {result['rss_after_warmup_mb']:.1f} MB, final {result['rss_final_mb']:.1f} MB "
          f"({result['growth']:+.1%}), sequences left {result['sequences_left']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["growth"] <= args.tolerance and result["sequences_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
