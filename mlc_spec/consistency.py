"""Runtime-only helpers that hold one backend's artifact to another's: the same tokens, the same verify
decisions, and raw logits to compare. tests/test_cross_backend.py and tools/device_check.py (which runs on
a GPU machine with a runtime-only TVM) both use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .interface.artifact import read_artifact
from .runtime.engine import Engine
from .runtime.library import ModelLibrary, tvm_device
from .runtime.speculative import RoundStats


def generate_with_decisions(engine: Engine, prompts: list[list[int]], batch: int = 8, **options):
    """Each prompt's tokens, and every verify decision in order: (accepted drafts, token emitted)."""
    decisions = []

    def record(stats: RoundStats) -> None:
        decisions.extend(zip(stats.accepted, (tokens[-1] for tokens in stats.tokens)))

    tokens = []
    for i in range(0, len(prompts), batch):
        tokens += [o.token_ids for o in engine.generate(token_ids=prompts[i:i + batch], observer=record, **options)]
    return tokens, decisions


def target_library(folder: Path, device: str = "cpu") -> ModelLibrary:
    """The artifact's target library alone, without an engine's caches."""
    config = read_artifact(folder)
    return ModelLibrary(folder, config.models["target"], config.kernels, tvm_device(device))


def forward_logits(folder: Path, device: str, ids: list[int], split: tuple[int, int]) -> dict[str, np.ndarray]:
    """The target's raw logits: prefill ids[:a], decode ids[a], verify ids[a+1:b]."""
    lib = target_library(folder, device)
    kv = lib.create_kv_cache(max_batch_size=2, max_total_seq_len=256, prefill_chunk_size=64, page_size=16)
    kv.add_sequence(0)
    a, b = split
    out = {"prefill": lib.forward_last(kv, [0], [ids[:a]]).numpy()[0]}
    out["decode"] = lib.forward_last(kv, [0], [[ids[a]]]).numpy()[0]
    out["verify"] = lib.forward_all(kv, [0], [ids[a + 1:b]]).numpy()
    if kv.length(0) != b:
        raise AssertionError(f"the cache holds {kv.length(0)} tokens after the forwards, not {b}")
    return out


def differing(a: list, b: list) -> int:
    """How many items differ, counting any extra ones of the longer list."""
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


# -- against llama.cpp ------------------------------------------------------------------------------
def all_logits(folder: Path, ids: list[int], device: str = "cpu") -> np.ndarray:
    """The target's logits at every position of ids, in one forward from an empty cache."""
    lib = target_library(folder, device)
    kv = lib.create_kv_cache(max_batch_size=1, max_total_seq_len=len(ids) + 16, prefill_chunk_size=len(ids),
                             page_size=16)
    kv.add_sequence(0)
    return lib.forward_all(kv, [0], [ids]).numpy()


def llamacpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's own logits at every position of ids (llama-cpp-python, logits_all=True), its KV cache
    in float32 as ours is (its default, float16, rounds every cached key and value)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=max(512, len(ids)), logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def compare_with_llamacpp(folder: Path, gguf_path: Path, ids: list[int]) -> dict:
    """Our target's logits against llama.cpp's on the same file and tokens: the share of positions with
    the same argmax, the largest |difference| and the largest |logit| it compares with."""
    ours = all_logits(folder, ids)
    theirs = llamacpp_logits(gguf_path, ids)[:, :ours.shape[1]]
    return {"positions": len(ids), "same_argmax": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "max_abs_diff": float(np.abs(ours - theirs).max()), "max_abs_logit": float(np.abs(theirs).max())}
