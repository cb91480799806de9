"""A compiled model library loaded with a runtime-only TVM: the VM, its parameters, its functions.

Only tvm.runtime is used here (never tvm.relax), so an artifact runs where just libtvm_runtime is
installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tvm
from safetensors.numpy import load_file
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from .kv_cache import PagedKVCache

DEVICES = ("cpu", "cuda", "vulkan", "metal", "opencl", "webgpu")


def _physical_cores() -> int:
    """Cores this process may run on, counting a core's hyperthreads once (llama.cpp's default too)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(cores)


# TVM's CPU thread pool, created at the first parallel kernel, otherwise takes half the hardware
# threads: one thread on a 2-core machine without hyperthreads. (Measured here: SmolLM2 Q4_1 decode
# 10.2 ms with the default, 7.8 ms with 2 threads.) TVM_NUM_THREADS still overrides.
os.environ.setdefault("TVM_NUM_THREADS", str(_physical_cores()))


def tvm_device(name: str):
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    dev = tvm.device(name, 0)
    if not dev.exist:
        raise RuntimeError(f"device {name!r} is not available on this machine (no driver or no {name} runtime in this TVM)")
    return dev


def _array(values, dtype: str, dev):
    return tvm.runtime.tensor(np.asarray(values, dtype=dtype), dev)


class ModelLibrary:
    """One compiled model (target or draft) of an artifact."""

    def __init__(self, folder: Path, entry: dict, dev):
        self.dev = dev
        self.entry = entry
        self.vocab_size = int(entry["output_vocab_size"])
        self.embed_vocab_size = int(entry["config"]["vocab_size"])
        self.vm = VirtualMachine(tvm.runtime.load_module(str(folder / entry["library"])), dev)
        weights = load_file(str(folder / entry["params"]))
        self.params = [tvm.runtime.tensor(weights[name], dev) for name in entry["param_names"]]
        # The VM functions the runtime calls, by name (bench wraps them to time compiled code).
        self.functions = {name: self.vm[name] for name in (
            "prefill", "batch_decode", "verify", "sampling_probs", "sample_from_probs", "argmax",
            "verify_greedy", "verify_sampling", "tree_verify_greedy", "tree_verify_sampling",
            *(f"verify_{r}" for r in entry.get("verify_row_blocks", ())))}

    def create_kv_cache(self, *, max_batch_size: int, max_total_seq_len: int, prefill_chunk_size: int,
                        page_size: int) -> PagedKVCache:
        handle = self.vm["create_paged_kv_cache"](
            ShapeTuple([max_batch_size]), ShapeTuple([max_total_seq_len]), ShapeTuple([prefill_chunk_size]),
            ShapeTuple([page_size]), ShapeTuple([0]))
        return PagedKVCache(handle, max_total_seq_len=max_total_seq_len, page_size=page_size,
                            max_batch_size=max_batch_size)

    def ids(self, tokens) -> tvm.runtime.Tensor:
        # A draft narrower than its target's vocabulary may be fed a token it has no row for: feed its
        # last row instead. Only the draft's proposals change; the target still decides.
        tokens = np.minimum(np.asarray(tokens, dtype=np.int32), self.embed_vocab_size - 1)
        return tvm.runtime.tensor(tokens, self.dev)

    # -- forwards: each returns float32 logits on the device ------------------------------------------
    def forward_last(self, kv: PagedKVCache, seq_ids: list[int], token_lists: list[list[int]]):
        """Feed each sequence its tokens; logits at each sequence's last token, [batch, vocab]."""
        lengths = [len(t) for t in token_lists]
        flat = [t for tokens in token_lists for t in tokens]
        with kv.forward(seq_ids, lengths):
            if all(n == 1 for n in lengths):
                logits, _ = self.functions["batch_decode"](self.ids(flat), kv.handle, self.params)
            else:
                last = np.cumsum(lengths) - 1
                logits, _ = self.functions["prefill"](self.ids(flat), _array(last, "int32", self.dev), kv.handle, self.params)
        return logits

    def forward_all(self, kv: PagedKVCache, seq_ids: list[int], token_lists: list[list[int]],
                    tree_parents: list[int] | None = None):
        """Feed each sequence its tokens (a chain, or a tree given parent pointers); logits at every token."""
        lengths = [len(t) for t in token_lists]
        flat = [t for tokens in token_lists for t in tokens]
        # a quantized model's verify_<n> computes exactly n rows per weight pass (compile/model.py)
        verify = self.functions.get(f"verify_{len(flat)}", self.functions["verify"])
        with kv.forward(seq_ids, lengths, tree_parents):
            logits, _ = verify(self.ids(flat), kv.handle, self.params)
        return logits

    # -- kernels (compile/kernels.py) ----------------------------------------------------------------
    def argmax(self, logits) -> np.ndarray:
        return self.functions["argmax"](logits).numpy()

    def sampling_probs(self, logits, temperature, top_k, top_p):
        dev = self.dev
        return self.functions["sampling_probs"](logits, _array(temperature, "float32", dev), _array(top_k, "int32", dev),
                                          _array(top_p, "float32", dev))

    def sample_from_probs(self, probs, uniforms) -> np.ndarray:
        return self.functions["sample_from_probs"](probs, _array(uniforms, "float32", self.dev)).numpy()

    def verify_greedy(self, logits, draft_tokens, indptr) -> tuple[np.ndarray, np.ndarray]:
        accepted, nxt = self.functions["verify_greedy"](logits, _array(draft_tokens, "int32", self.dev),
                                                  _array(indptr, "int32", self.dev))
        return accepted.numpy(), nxt.numpy()

    def verify_sampling(self, p, q, draft_tokens, indptr, u_accept, u_sample) -> tuple[np.ndarray, np.ndarray]:
        dev = self.dev
        accepted, nxt = self.functions["verify_sampling"](
            p, q, _array(draft_tokens, "int32", dev), _array(indptr, "int32", dev),
            _array(u_accept, "float32", dev), _array(u_sample, "float32", dev))
        return accepted.numpy(), nxt.numpy()

    def tree_verify_greedy(self, logits, tokens, parents, indptr) -> tuple[np.ndarray, np.ndarray]:
        dev = self.dev
        leaf, nxt = self.functions["tree_verify_greedy"](
            logits, _array(tokens, "int32", dev), _array(parents, "int32", dev), _array(indptr, "int32", dev))
        return leaf.numpy(), nxt.numpy()

    def tree_verify_sampling(self, p, q, tokens, parents, indptr, u_accept, u_sample) -> tuple[np.ndarray, np.ndarray]:
        dev = self.dev
        leaf, nxt = self.functions["tree_verify_sampling"](
            p, q, _array(tokens, "int32", dev), _array(parents, "int32", dev), _array(indptr, "int32", dev),
            _array(u_accept, "float32", dev), _array(u_sample, "float32", dev))
        return leaf.numpy(), nxt.numpy()
