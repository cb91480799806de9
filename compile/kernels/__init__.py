"""The registry of TensorIR kernels for sampling and exact speculative verification.

Each kernel is declared once below: its block-based TIR (sampling.py, chain_verify.py, tree_verify.py),
its CPU and GPU schedules (schedules.py), and its signature. From that entry the model exports it
(compile/model.py), the artifact records its signature (interface/artifact.py), and the runtime makes
its typed call (runtime/library.py). Adding a kernel is its TIR, its schedules and one entry here.

Every kernel takes symbolic row counts and the vocabulary V, float32 probabilities or logits and int32
token ids; results are passed last (destination-passing style). Sequence b of a verify batch owns target
rows indptr[b] .. indptr[b+1]-1 (its k_b drafts plus one bonus row) and draft slots
indptr[b]-b .. indptr[b]-b+k_b-1, so a chain's draft count is its row count minus the batch. The numpy
reference in tests/test_kernels.py is the executable specification. Inputs are assumed sane:
temperature > 0 (greedy decoding is argmax), 0 < top_p <= 1 (top_p <= 0 keeps just the most probable
tokens), probability rows with some positive entry (a row without one samples token 0), logit rows with
some entry above -inf (argmax of an all -inf row is -1). A draft id outside [0, V) is rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tvm
from tvm import s_tir

from ...interface.artifact import VOCAB, KernelSignature, TensorSpec
from . import schedules as sched
from .chain_verify import verify_greedy, verify_sampling
from .sampling import argmax, sample_from_probs, sampling_probs
from .tree_verify import tree_verify_greedy, tree_verify_sampling


@dataclasses.dataclass(frozen=True)
class Kernel:
    func: tvm.tirx.PrimFunc
    cpu_schedule: Callable
    gpu_schedule: Callable
    signature: KernelSignature


def _f32(name: str, *shape: str) -> TensorSpec:
    return TensorSpec(name, "float32", shape)


def _i32(name: str, *shape: str, host: bool = False) -> TensorSpec:
    return TensorSpec(name, "int32", shape, host)


def _kernel(func, cpu_schedule, gpu_schedule, args, results) -> tuple[str, Kernel]:
    name = func.attrs["global_symbol"]
    return name, Kernel(func, cpu_schedule, gpu_schedule, KernelSignature(name, tuple(args), tuple(results)))


# Decisions (accepted counts, leaves, tokens) come back to the host; probabilities stay on the device.
_DECISIONS = (_i32("accepted", "batch", host=True), _i32("next_token", "batch", host=True))
_TREE_DECISIONS = (_i32("leaf", "batch", host=True), _i32("next_token", "batch", host=True))

KERNELS: dict[str, Kernel] = dict([
    _kernel(sampling_probs, sched.cpu_sampling_probs, sched.gpu_sampling_probs,
            [_f32("logits", "n", VOCAB), _f32("temperature", "n"), _i32("top_k", "n"), _f32("top_p", "n")],
            [_f32("probs", "n", VOCAB)]),
    _kernel(sample_from_probs, sched.cpu_rows_parallel("chunks"), sched.gpu_sample_from_probs,
            [_f32("probs", "n", VOCAB), _f32("uniforms", "n")],
            [_i32("tokens", "n", host=True)]),
    _kernel(argmax, sched.cpu_rows_parallel("row_argmax"), sched.gpu_argmax_rows,
            [_f32("logits", "n", VOCAB)],
            [_i32("tokens", "n", host=True)]),
    _kernel(verify_greedy, sched.cpu_rows_parallel("row_argmax", "greedy_walk"), sched.gpu_verify_greedy,
            [_f32("logits", "rows", VOCAB), _i32("draft_tokens", "drafts"), _i32("indptr", "batch+1")],
            _DECISIONS),
    _kernel(verify_sampling, sched.cpu_rows_parallel("accept_walk", "residual_chunks", "target_chunks"),
            sched.gpu_verify_sampling,
            [_f32("p", "rows", VOCAB), _f32("q", "drafts", VOCAB), _i32("draft_tokens", "drafts"),
             _i32("indptr", "batch+1"), _f32("u_accept", "drafts"), _f32("u_sample", "batch")],
            _DECISIONS),
    _kernel(tree_verify_greedy, sched.cpu_rows_parallel("row_argmax", "tree_greedy_walk"),
            sched.gpu_tree_verify_greedy,
            [_f32("logits", "nodes", VOCAB), _i32("tokens", "nodes"), _i32("parents", "nodes"),
             _i32("indptr", "batch+1")],
            _TREE_DECISIONS),
    _kernel(tree_verify_sampling, sched.cpu_rows_parallel("tree_walk", "final_law", "law_chunks"),
            sched.gpu_tree_verify_sampling,
            [_f32("p", "nodes", VOCAB), _f32("q", "nodes", VOCAB), _i32("tokens", "nodes"), _i32("parents", "nodes"),
             _i32("indptr", "batch+1"), _f32("u_accept", "nodes"), _f32("u_sample", "batch")],
            _TREE_DECISIONS),
])
KERNEL_NAMES = tuple(KERNELS)


def signatures() -> tuple[KernelSignature, ...]:
    return tuple(k.signature for k in KERNELS.values())


def kernel(name: str) -> tvm.tirx.PrimFunc:
    """The unscheduled block-based PrimFunc; the caller gives it its symbol."""
    # A fresh copy each time: 0.27's s_tir.Schedule rewrites the PrimFunc it is given in place.
    return s_tir.renew_defs(KERNELS[name].func).without_attr("global_symbol")


def scheduled_kernels(target: tvm.target.Target) -> dict[str, tvm.tirx.PrimFunc]:
    """Every kernel scheduled for `target`: llvm gets the CPU schedule, anything else the GPU one.

    Marked scheduled so dlight leaves them alone ("tirx.is_scheduled" is what 0.27's dlight reads),
    and unnamed: the caller gives each its symbol.
    """
    cpu = target.kind.name == "llvm"
    scheduled = {}
    for name, k in KERNELS.items():
        sch = s_tir.Schedule(tvm.IRModule({"main": kernel(name)}))
        (k.cpu_schedule if cpu else k.gpu_schedule)(sch)
        # "tir.is_scheduled" is the pre-0.27 spelling some callers still look for.
        scheduled[name] = sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tir.is_scheduled": True})
    return scheduled
