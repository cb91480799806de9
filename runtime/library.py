"""A compiled model library loaded with a runtime-only TVM: the VM, its parameters, its functions.

Only tvm.runtime is used here (never tvm.relax), so an artifact runs where just libtvm_runtime is
installed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import tvm
from safetensors.numpy import load_file
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from ..interface.artifact import DEVICES, ArtifactError, KernelSignature, ModelEntry
from .arrays import to_device, to_host
from .kv_cache import PagedKVCache


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


def missing_cpu_features(required) -> list[str]:
    """The CPU features an artifact's code uses that this host lacks (numpy asks the CPU itself)."""
    from numpy._core._multiarray_umath import __cpu_features__

    return [f for f in required if not __cpu_features__.get(f)]


class Kernels:
    """Typed calls of a library's registry kernels (compile/kernels/), made from the signatures its
    artifact records: arguments converted to their dtypes on the device, decisions back on the host."""

    def __init__(self, library: "ModelLibrary", signatures: tuple[KernelSignature, ...]):
        self._library = library
        self._signatures = {s.name: s for s in signatures}

    def __getattr__(self, name: str):
        try:
            signature = self._signatures[name]
        except KeyError:
            raise AttributeError(f"no kernel {name!r} in this artifact") from None
        return lambda *args: self._call(signature, args)

    def _call(self, signature: KernelSignature, args):
        lib = self._library
        tensors = [a if isinstance(a, tvm.runtime.Tensor) else to_device(a, lib.dev, spec.dtype)
                   for a, spec in zip(args, signature.args)]
        results = lib.call(signature.name, *tensors)
        results = [results] if len(signature.results) == 1 else list(results)
        out = [to_host(r) if spec.host else r for r, spec in zip(results, signature.results)]
        return out[0] if len(out) == 1 else tuple(out)


class ModelLibrary:
    """One compiled model (target or draft) of an artifact: its forwards and its kernels."""

    def __init__(self, folder: Path, entry: ModelEntry, kernels: tuple[KernelSignature, ...], dev):
        self.dev = dev
        self.vocab_size = entry.output_vocab_size
        self.embed_vocab_size = entry.embed_vocab_size
        self.vm = VirtualMachine(tvm.runtime.load_module(str(folder / entry.library)), dev)
        weights = load_file(str(folder / entry.params))
        missing = [name for name in entry.param_names if name not in weights]
        if missing:
            raise ArtifactError(f"{folder / entry.params}: lacks {missing[0]}; recompile the artifact")
        self.params = [tvm.runtime.tensor(weights[name], dev) for name in entry.param_names]
        self.verify_row_blocks = frozenset(entry.verify_row_blocks)
        self.kind = entry.kind
        # a feature draft's head: the target token id of each of its output rows
        self.token_ids = weights["token_ids"].astype(np.int64) if "token_ids" in weights else None
        self.kernels = Kernels(self, kernels)
        self._functions: dict = {}
        # Time spent inside compiled calls, for the share of a run spent elsewhere (bench's host share).
        self.compiled_seconds = 0.0
        # the target of a feature draft exports its hidden states (compile/model.py's *_hidden forwards)
        self.exports_hidden = self.vm.module.implements_function("prefill_hidden")

    def call(self, name: str, *args):
        function = self._functions.get(name) or self._functions.setdefault(name, self.vm[name])
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.compiled_seconds += time.perf_counter() - start

    def create_kv_cache(self, *, max_batch_size: int, max_total_seq_len: int, prefill_chunk_size: int,
                        page_size: int) -> PagedKVCache:
        handle = self.call("create_paged_kv_cache",
                           ShapeTuple([max_batch_size]), ShapeTuple([max_total_seq_len]), ShapeTuple([prefill_chunk_size]),
                           ShapeTuple([page_size]), ShapeTuple([0]))
        return PagedKVCache(handle, page_size=page_size, max_batch_size=max_batch_size)

    def ids(self, tokens) -> tvm.runtime.Tensor:
        # A draft narrower than its target's vocabulary may be fed a token it has no row for: feed its
        # last row instead. Only the draft's proposals change; the target still decides.
        tokens = np.minimum(np.asarray(tokens, dtype=np.int32), self.embed_vocab_size - 1)
        return to_device(tokens, self.dev)

    # -- forwards: each returns float32 logits on the device ------------------------------------------
    # With hidden=True (a library that exports_hidden), also the hidden state of every token fed, [n, hidden].
    def forward_last(self, kv: PagedKVCache, seq_ids: list[int], token_lists: list[list[int]], hidden: bool = False):
        """Feed each sequence its tokens; logits at each sequence's last token, [batch, vocab]."""
        lengths = [len(t) for t in token_lists]
        flat = [t for tokens in token_lists for t in tokens]
        suffix = "_hidden" if hidden else ""
        with kv.forward(seq_ids, lengths):
            if all(n == 1 for n in lengths):
                out = self.call("batch_decode" + suffix, self.ids(flat), kv.handle, self.params)
            else:
                last = to_device(np.cumsum(lengths, dtype=np.int32) - 1, self.dev)
                out = self.call("prefill" + suffix, self.ids(flat), last, kv.handle, self.params)
        return (out[0], out[1]) if hidden else out[0]

    def forward_all(self, kv: PagedKVCache, seq_ids: list[int], token_lists: list[list[int]],
                    tree_parents: list[int] | None = None, hidden: bool = False):
        """Feed each sequence its tokens (a chain, or a tree given parent pointers); logits at every token."""
        lengths = [len(t) for t in token_lists]
        flat = [t for tokens in token_lists for t in tokens]
        # a quantized model's verify_<n> computes exactly n rows per weight pass (compile/model.py)
        verify = f"verify_{len(flat)}" if len(flat) in self.verify_row_blocks else "verify"
        with kv.forward(seq_ids, lengths, tree_parents):
            out = self.call(verify + ("_hidden" if hidden else ""), self.ids(flat), kv.handle, self.params)
        return (out[0], out[1]) if hidden else out[0]

    def embed(self, tokens) -> tvm.runtime.Tensor:
        """The token embeddings a feature draft reads, [n, hidden]."""
        return self.call("embed_tokens", self.ids(tokens), self.params)

    # -- a feature draft's forwards: its logits over its head's tokens and its own feature, at each
    # sequence's last row
    def forward_features(self, kv: PagedKVCache, seq_ids: list[int], lengths: list[int], embeds, features):
        """Each sequence's rows of (embedding, the target's features), flat."""
        features = to_device(features, self.dev)
        with kv.forward(seq_ids, lengths):
            if all(n == 1 for n in lengths):
                logits, g, _ = self.call("batch_decode_target", embeds, features, kv.handle, self.params)
            else:
                last = to_device(np.cumsum(lengths, dtype=np.int32) - 1, self.dev)
                logits, g, _ = self.call("prefill", embeds, features, last, kv.handle, self.params)
        return logits, g

    def forward_own_features(self, kv: PagedKVCache, seq_ids: list[int], embeds, g):
        """One row per sequence: (embedding, the draft's own feature from its step before)."""
        with kv.forward(seq_ids, [1] * len(seq_ids)):
            logits, g, _ = self.call("batch_decode", embeds, g, kv.handle, self.params)
        return logits, g

    def forward_own_tree(self, kv: PagedKVCache, seq_ids: list[int], token_lists: list[list[int]],
                         tree_parents: list[int], embeds, g, positions: list[int]):
        """Each sequence's token tree (rows flat), every row fed (embedding, the draft's own feature of its
        parent); logits and features at the flat rows of positions. The tree stays in the cache,
        uncommitted, for the caller to discard."""
        with kv.forward(seq_ids, [len(t) for t in token_lists], tree_parents):
            logits, g, _ = self.call("prefill_own", embeds, to_device(g, self.dev),
                                     to_device(np.asarray(positions, np.int32), self.dev), kv.handle, self.params)
        return logits, g

    @property
    def drafts_trees(self) -> bool:
        """Whether it can draft token trees: a model draft can, a feature draft compiled with prefill_own."""
        return self.kind != "eagle" or self.vm.module.implements_function("prefill_own")


def last_line(err: BaseException) -> str:
    """The gist of a library's message (TVM's carry a C++ backtrace before it)."""
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__
