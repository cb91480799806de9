"""By hand, not in CI: a compiled GGUF artifact's greedy output equals transformers' on a few prompts.

    mlc_spec compile SmolLM2-135M-Instruct.Q4_1.gguf --output dist/smol
    python tools/check_real_model.py dist/smol path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Needs transformers, torch, gguf and accelerate (transformers' GGUF loader is the reference).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlc_spec import Engine

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("gguf")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    gguf = Path(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    engine = Engine(args.artifact)
    failures = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            want = reference.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False)[0, len(ids):]
        got = engine.generate(token_ids=ids, max_tokens=args.max_tokens, speculative=False).token_ids
        same = got == want.tolist()[:len(got)] and (len(got) == len(want) or got[-1] in engine.eos_ids)
        failures += not same
        print(f"{'same' if same else 'DIFFERENT'}: {len(got)} tokens for {prompt!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
