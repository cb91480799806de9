"""Write a random-weight GGUF of Qwen2-1.5B's shape (or the tests' small one) and llama.cpp's own
quantizations of it, so that mlc_spec and llama.cpp are measured on the very same files.

    python tools/make_gguf.py OUT_DIR [--shape qwen2-1.5b|small] [--formats q4_0 q4_1 q8_0 q4_k_m] [--seed 0]

writes OUT_DIR/<shape>-f16.gguf (a tied Qwen2: random F16 weights, a small byte-level BPE vocabulary
padded with unused tokens to the shape's vocabulary), then OUT_DIR/<shape>-<format>.gguf for each
format with llama-cpp-python's llama_model_quantize (skipped, with a note, without llama_cpp). Random
weights are fine for costs; the 1.5B file takes about 3 GB and a few minutes. The writer is the tests'
(tests/gguf_files.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_files import LLAMA_FTYPES, QWEN2_1_5B_SHAPE, SMALL_SHAPE, quantize_with_llamacpp, write_random_gguf  # noqa: E402

SHAPES = {"qwen2-1.5b": QWEN2_1_5B_SHAPE, "small": SMALL_SHAPE}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=SHAPES, default="qwen2-1.5b")
    p.add_argument("--formats", nargs="+", choices=LLAMA_FTYPES, default=["q4_0", "q4_1", "q8_0", "q4_k_m"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"{args.shape}-f16.gguf"
    if not f16.exists():
        write_random_gguf(f16, SHAPES[args.shape], seed=args.seed)
    print(f"wrote {f16}")
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not installed (pip install llama-cpp-python): no quantized files", file=sys.stderr)
        return 0
    for fmt in args.formats:
        out = args.out / f"{args.shape}-{fmt}.gguf"
        if not out.exists():
            quantize_with_llamacpp(f16, out, fmt)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
