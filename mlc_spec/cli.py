"""The mlc_spec command: compile, chat, serve, bench, train-draft."""

from __future__ import annotations

import argparse
import signal
import sys

from . import bench, chat, serve, train_draft


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every cleanup (a compile's staging
    folder, the caches) runs; not a KeyboardInterrupt, which chat takes as "stop this reply"."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlc_spec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    chat.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    train_draft.add_parser(sub)
    args = parser.parse_args(argv)
    received: list[int] = []
    previous = _catch_signals(received)
    try:
        return args.run(args)
    except (KeyboardInterrupt, Terminated):
        return _interrupted(received)
    except (ValueError, RuntimeError, OSError) as err:
        if received:  # TVM turns a signal's exception inside its Python callbacks (the compiler's passes) into an error
            return _interrupted(received)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _catch_signals(received: list[int]) -> dict:
    """Ctrl-C and SIGTERM as exceptions, noting which came; returns the handlers they replace."""
    def interrupt(signum, _frame):
        received.append(signum)
        raise KeyboardInterrupt

    def terminate(signum, _frame):
        received.append(signum)
        raise Terminated

    # a signal ignored from the start (nohup, a background job of a script) stays ignored
    return {signum: signal.signal(signum, handler)
            for signum, handler in ((signal.SIGINT, interrupt), (signal.SIGTERM, terminate))
            if signal.getsignal(signum) is not signal.SIG_IGN}


def _interrupted(received: list[int]) -> int:
    """The shell's convention: 128 + the signal's number."""
    if received and received[-1] == signal.SIGTERM:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a target (and draft) checkpoint into a model library folder")
    p.add_argument("target", help="Hugging Face model folder or .gguf file")
    p.add_argument("--draft", help="draft model folder or .gguf file (same tokenizer as the target)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, vulkan, metal, opencl or webgpu (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 or float16 (default float32)")
    p.add_argument("--output", help="artifact folder (default dist/<name>-<dtype>-<device>)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sequence in the KV cache (default 2048)")
    p.add_argument("--page-size", type=int, default=16, help="KV cache page size in tokens (default 16)")
    p.add_argument("--cuda-arch", default="sm_90", help="CUDA architecture for --device cuda (default sm_90)")
    p.add_argument("--quantization", default="keep",
                   help="weights: keep (a GGUF's Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K blocks stay as they are, the rest "
                        "is --dtype), none (all --dtype), or q4_0, q4_1, q8_0 (every linear in that format; CPU only). Default keep")
    p.add_argument("--draft-quantization", help="the draft's weights, as --quantization (default: the same)")
    p.set_defaults(run=_run_compile)


def _run_compile(args) -> int:
    import time

    from .compile.build import CompileOptions, compile_artifact

    start = time.perf_counter()
    opts = CompileOptions(device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                          page_size=args.page_size, cuda_arch=args.cuda_arch, quantization=args.quantization,
                          draft_quantization=args.draft_quantization)
    out = compile_artifact(args.target, args.draft, args.output, opts, log=lambda m: print(m, flush=True))
    print(f"done in {time.perf_counter() - start:.1f}s: {out}")
    print(f"run it:  mlc_spec chat --model {out} --device {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
