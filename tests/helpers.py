"""Helpers the test modules share: reference logits, compiled forwards, one-line compile errors, prompts,
and the registry's kernels compiled for the CPU. (Checkpoints and GGUF files are written by
checkpoints.py and gguf_files.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import tvm

from mlc_spec.cli import main as cli
from mlc_spec.compile import kernels
from mlc_spec.consistency import forward_logits

# The tiny models the compile tests cover: name -> (architecture, checkpoint options).
SHAPES = {
    "llama-gqa2-untied": ("llama", dict(vocab_size=320)),
    "llama-mha-tied-v301": ("llama", dict(vocab_size=301, num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-gqa3-v333": ("mistral", dict(vocab_size=333, hidden_size=96, num_attention_heads=6,
                                          num_key_value_heads=2)),
    "qwen2-bias-tied": ("qwen2", dict(vocab_size=290, tie_word_embeddings=True)),
    "llama-headdim32": ("llama", dict(vocab_size=320, head_dim=32)),
    "llama3-rope-scaling": ("llama", dict(vocab_size=320, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
}


def hf_logits(checkpoint: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def run_forwards(artifact: Path, ids: list[int], split: tuple[int, int]) -> dict[str, np.ndarray]:
    """prefill ids[:a], decode ids[a], verify ids[a+1:b] through the compiled library."""
    return forward_logits(artifact, "cpu", ids, split)


def compile_error(capsys, args: list[str]) -> str:
    capsys.readouterr()  # drop what fixtures printed
    assert cli(["compile", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_empty(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


VOCAB = 320


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Mixed lengths, including ones that end on and just past the 16-token page boundaries."""
    rng = np.random.default_rng(seed)
    edges = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48]
    lengths = edges + rng.integers(1, 60, max(0, n - len(edges))).tolist()
    return [rng.integers(2, VOCAB, n_tok).tolist() for n_tok in lengths[:n]]


def top_k_probs(ckpt, temperature, top_k):
    """A function of a prompt: the model's next-token distribution (transformers, float64) at that
    temperature, restricted to its top_k tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64)

    def probs(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].numpy() / temperature
        keep = logits >= np.sort(logits)[-top_k]
        p = np.where(keep, np.exp(logits - logits.max()), 0.0)
        return p / p.sum()

    return probs


def exact_first(ckpt, prompt, temperature, top_k, n: int = 2) -> dict[tuple, float]:
    """The target's distribution of its first n sampled tokens."""
    probs = top_k_probs(ckpt, temperature, top_k)
    joint = {(): 1.0}
    for _ in range(n):
        joint = {seq + (int(t),): p * pt for seq, p in joint.items()
                 for t, pt in enumerate(probs(prompt + list(seq))) if pt > 0}
    return joint


def fail_kernel_call(monkeypatch, lib, name: str, n: int) -> None:
    """Make the n-th call of one of the library's kernels raise RuntimeError("injected")."""
    real, calls = getattr(lib.kernels, name), []

    def failing(*args):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(lib.kernels, name, failing)


def generate_all(engine, batch: list[list[int]], **opts) -> list[list[int]]:
    out = []
    for i in range(0, len(batch), 8):
        out += [o.token_ids for o in engine.generate(token_ids=batch[i:i + 8], **opts)]
    return out


class CpuKernels:
    """The registry's kernels built for generic LLVM, called as the runtime calls them: by name, with
    results shaped from each kernel's signature."""

    def __init__(self):
        target = tvm.target.Target({"kind": "llvm"})
        funcs = kernels.scheduled_kernels(target)
        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
        self._lib = tvm.compile(mod, target=target)
        self._dev = tvm.cpu()

    def __getattr__(self, name):
        if name not in kernels.KERNELS:
            raise AttributeError(name)
        signature = kernels.KERNELS[name].signature
        return lambda *args: self._call_signature(signature, args)

    def _call_signature(self, signature, args):
        inputs = [np.ascontiguousarray(a, spec.dtype) for a, spec in zip(args, signature.args)]
        shapes = signature.result_shapes([i.shape for i in inputs])
        return self._call(signature.name, inputs, [(shape, r.dtype) for shape, r in zip(shapes, signature.results)])

    def _call(self, name, inputs, outputs):
        args = [tvm.runtime.tensor(a, self._dev) for a in inputs]
        outs = [tvm.runtime.empty(shape, dtype, self._dev) for shape, dtype in outputs]
        self._lib[name](*args, *outs)
        results = [o.numpy() for o in outs]
        return results[0] if len(results) == 1 else tuple(results)
