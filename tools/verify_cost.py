"""Target decode cost and verify(k)/decode of several artifacts, measured interleaved in one process.

`mlc_spec bench` takes medians of 9 runs, one artifact per process; on a shared machine a busy minute
moves one artifact's figures and not the other's. This tool loads every artifact given, then in each
round times one decode and one verify of k+1 tokens per k for each artifact in turn, and reports the
minimum (the run least disturbed) and the median over the rounds, so artifacts are compared under the
same load:

    python tools/verify_cost.py BEFORE_ARTIFACT AFTER_ARTIFACT [--rounds 30] [--k 1 2 3 4 8]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    p.add_argument("--context", type=int, default=64, help="tokens in the sequence before each forward")
    args = p.parse_args()

    from mlc_spec import Engine

    with contextlib.ExitStack() as stack:
        steppers = {a: stack.enter_context(_stepper(Engine(a), args.context)) for a in args.artifacts}
        times = {(a, n): [] for a in args.artifacts for n in [1] + [k + 1 for k in args.k]}
        for _ in range(args.rounds):
            for (artifact, n), seconds in times.items():
                seconds.append(steppers[artifact](n))
    for artifact in args.artifacts:
        decode = {f: f(times[artifact, 1]) for f in (min, statistics.median)}
        print(artifact)
        for f, name in ((min, "min"), (statistics.median, "median")):
            ratios = "  ".join(f"k={k}: {f(times[artifact, k + 1]) / decode[f]:.2f}x" for k in args.k)
            print(f"  {name:6s} decode {decode[f] * 1e3:6.2f} ms   verify(k)/decode {ratios}")


@contextlib.contextmanager
def _stepper(engine, context: int):
    """A function timing one target forward of n tokens on a live sequence, undone after each call."""
    with engine.session() as session:
        session.tokens[:] = list(range(10, 10 + context))
        kv, lib, seq = engine.target.kv, engine.target.lib, session.seq_id
        for lo in range(0, context, engine.prefill_chunk):  # one forward takes at most a chunk
            lib.forward_last(kv, [seq], [session.tokens[lo:lo + engine.prefill_chunk]])

        def step(n: int) -> float:
            tokens = list(range(200, 200 + n))
            start = time.perf_counter()
            (lib.forward_all(kv, [seq], [tokens]) if n > 1 else lib.forward_last(kv, [seq], [tokens])).numpy()
            seconds = time.perf_counter() - start
            kv.popn(seq, n)
            return seconds

        yield step


if __name__ == "__main__":
    main()
