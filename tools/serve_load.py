"""Aggregate throughput of a running `mlc_spec serve` at several numbers of concurrent streams, with
speculation on and off, measured interleaved in one run so the ratios hold on a shared machine.

    mlc_spec serve --max-batch 8 &          # the default pair
    python tools/serve_load.py --concurrency 1 4 8 --max-tokens 64 --json load.json

Each of C client threads sends chat requests one after another (greedy, the prompts of bench's
--workload, ignore_eos so every request makes max_tokens tokens), for --rounds rounds per setting; a setting's
figure is the completion tokens the server reported (usage) over the wall time of all C streams. The
settings run in turn, round by round (C=1 on, C=1 off, C=4 on, ...), so drift on a shared machine hits
them alike. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlc_spec.bench import WORKLOADS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="concurrent streams")
    p.add_argument("--requests", type=int, default=1, help="requests per stream and round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every setting (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workload", choices=WORKLOADS, default="chat",
                   help="bench's prompts: chat questions, or a passage to repeat or edit (default chat)")
    p.add_argument("--draft-length", default=None, help="a fixed draft length for speculation on (default: the server's)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    model = _get(args.url + "/v1/models")["data"][0]["id"]
    settings = [(c, spec) for c in args.concurrency for spec in (True, False)]
    figures: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for c, spec in settings:
            figures[c, spec].append(_measure(args, model, c, spec))
    table = _table(figures, args.concurrency)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "max_tokens": args.max_tokens, "workload": args.workload,
                                               "tokens_per_second": {f"{c}/{'on' if s else 'off'}": v
                                                                     for (c, s), v in figures.items()}}, indent=2))
    return 0


def _measure(args, model: str, concurrency: int, speculative: bool) -> float:
    """Aggregate completion tokens per second of `concurrency` streams."""
    tokens, errors = [], []

    def stream(index: int) -> None:
        try:
            for r in range(args.requests):
                prompts = WORKLOADS[args.workload]
                prompt = prompts[(index + r * concurrency) % len(prompts)]
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                        "max_tokens": args.max_tokens, "ignore_eos": True, "speculative": speculative}
                if speculative and args.draft_length is not None:
                    body["draft_length"] = "auto" if args.draft_length == "auto" else int(args.draft_length)
                tokens.append(_post(args.url + "/v1/chat/completions", body)["usage"]["completion_tokens"])
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit(f"error: a request failed: {errors[0]}")
    return sum(tokens) / seconds


def _table(figures, concurrency: list[int]) -> str:
    lines = ["| concurrent streams | speculation on (tok/s) | speculation off (tok/s) | on / off |",
             "| ---: | ---: | ---: | ---: |"]
    for c in concurrency:
        on, off = statistics.median(figures[c, True]), statistics.median(figures[c, False])
        lines.append(f"| {c} | {on:.1f} | {off:.1f} | {on / off:.2f} |")
    return "\n".join(lines)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


if __name__ == "__main__":
    sys.exit(main())
