"""The TVM 0.27 bugs compile/workarounds.py works around are still there, and each workaround repairs its bug.

A test here failing after a TVM upgrade means upstream fixed or changed that behaviour: re-check the
workaround it names, and remove it if it is no longer needed.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import TensorLoad
from tvm.relax.frontend.nn.llm import kv_cache
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from mlc_spec.compile import rope, workarounds


def _cpu_paged_prefill() -> tvm.IRModule:
    return tvm.IRModule({"prefill": _attention_prefill_cpu(2, 4, 16, "float32", False, {})})


def _loads_from_one_element_buffers(mod: tvm.IRModule) -> list:
    loads = []

    def visit(load):
        shape = load.source.shape
        if len(shape) == 1 and isinstance(shape[0], tirx.IntImm) and shape[0].value == 1:
            loads.append(load.indices[0])

    tvm_ffi.structural_walk(mod["prefill"], (TensorLoad, visit))
    return loads


def test_cpu_prefill_reads_a_one_element_buffer_past_index_zero():
    """workarounds.one_element_loads_at_zero: TVM's CPU paged prefill reads scale_O[d_idx]."""
    mod = _cpu_paged_prefill()
    assert any(not (isinstance(i, tirx.IntImm) and i.value == 0) for i in _loads_from_one_element_buffers(mod))
    fixed = workarounds.one_element_loads_at_zero(mod)
    indices = _loads_from_one_element_buffers(fixed)
    assert indices and all(isinstance(i, tirx.IntImm) and i.value == 0 for i in indices)


def test_cpu_prefill_walks_the_whole_page_pool_behind_a_guard():
    """workarounds.loops_bounded_by_their_guard: the guarded loop is there for the pass to bound."""
    mod = _cpu_paged_prefill()
    assert _loops_bounded_by_min(mod) == 0
    assert _loops_bounded_by_min(workarounds.loops_bounded_by_their_guard(mod)) > 0


def _loops_bounded_by_min(mod: tvm.IRModule) -> int:
    loops = []
    tvm_ffi.structural_walk(mod["prefill"], (tirx.For, lambda loop: loops.append(isinstance(loop.extent, tirx.Min))))
    return sum(loops)


def _tree_kernel_order(source: str, names: tuple[str, str]) -> list[str]:
    return sorted(names, key=lambda name: source.index(f'"{name}"'))


def test_cpu_tree_attention_kernels_are_passed_in_the_gpu_order():
    """workarounds.CPUPagedKVCache: the llvm branch lists ragged then paged tree attention, the GPU branch
    (which the runtime's argument order follows) paged then ragged."""
    source = inspect.getsource(kv_cache.TIRPagedKVCache.__init__)
    gpu = ("tir_attention_prefill_with_tree_mask", "tir_attention_prefill_with_tree_mask_with_paged_kv_cache")
    assert _tree_kernel_order(source, workarounds.TREE_KERNELS) == list(workarounds.TREE_KERNELS)
    assert _tree_kernel_order(source, gpu) == [gpu[1], gpu[0]]


def test_cpu_attention_is_scalar_and_on_one_thread():
    """workarounds._FastCPUAttention: TVM's CPU prefill (paged and ragged) and decode kernels, which the
    llvm branch passes under the names it replaces, have no parallel or vectorised loop."""
    source = inspect.getsource(kv_cache.TIRPagedKVCache.__init__)
    assert all(f'"{name}"' in source for name in workarounds.CPU_ATTENTION_KERNELS)
    for func in (_attention_prefill_cpu(2, 4, 16, "float32", False, {}),
                 _attention_prefill_ragged_cpu(2, 4, 16, 16, "float32", {}),
                 _attention_decode_cpu(2, 4, 16, "float32", False, {})):
        kinds = []
        tvm_ffi.structural_walk(func, (tirx.For, lambda loop: kinds.append(loop.kind)))
        assert kinds and all(kind == tirx.ForKind.SERIAL for kind in kinds)


ROPE_SCALINGS = [{}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}]


def test_cpu_rope_is_scalar_and_ours_gives_its_bits():
    """workarounds._FastCPURope: TVM's split of the fused qkv has no vectorised loop (it evaluates its
    angles per element); rope.split_rotary_cpu, which takes its slot, gives the same bits."""
    source = inspect.getsource(kv_cache.TIRPagedKVCache.__init__)
    assert f'"{workarounds.SPLIT_ROTARY}"' in source
    h_q, h_kv, d, n = 6, 2, 32, 4
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    qkv = np.random.default_rng(0).standard_normal((n, h_q + 2 * h_kv, d)).astype(np.float32)
    positions = tvm.runtime.tensor(np.array([0, 1, 300, 5000], np.int32))
    for scaling in ROPE_SCALINGS:
        for rotary_dim in (d, d // 2):
            args = (500000.0, 1.0, d, h_q, h_kv, "float32", scaling, rotary_dim)
            theirs = llama_rope_with_position_map(*args)
            kinds = []
            tvm_ffi.structural_walk(theirs, (tirx.For, lambda loop: kinds.append(loop.kind)))
            assert kinds and all(kind == tirx.ForKind.SERIAL for kind in kinds)
            outs = []
            for func in (theirs, rope.split_rotary_cpu(*args)):
                f = tvm.compile(func.with_attr("global_symbol", "split"), target=target)
                split = [tvm.runtime.tensor(np.zeros((n, h, d), np.float32)) for h in (h_q, h_kv, h_kv)]
                f(tvm.runtime.tensor(qkv), positions, *split, 1)
                outs.append([a.numpy() for a in split])
            for ours, want in zip(outs[1], outs[0]):
                np.testing.assert_array_equal(ours, want, err_msg=f"{scaling} rotary_dim {rotary_dim}")


def _run(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    """script in a fresh interpreter, where nothing is registered yet (TVMScript needs it in a file)."""
    path = tmp_path / "probe.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)


_C_SOURCE = """
    import os, sys, tempfile
    from mlc_spec.compile import rope, workarounds  # first: TVM as mlc_spec loads it (see _TENSORIZE)
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def exp2(A: T.Buffer((4,), "float32"), B: T.Buffer((4,), "float32")):
        for i in range(4):
            B[i] = T.exp2(A[i])

    @T.prim_func
    def workspace(a: T.handle, b: T.handle):
        n = T.int64()
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        tmp = T.alloc_buffer((T.min(n, T.int64(4096)) * 1000,), "float32")
        for i in range(T.min(n, T.int64(4096)) * 1000):
            tmp[i] = T.float32(1)
        for i in range(n):
            B[i] = A[i] + tmp[i % (T.min(n, T.int64(4096)) * 1000)]

    func, pipeline = sys.argv[1:]
    if pipeline != "default":
        workarounds.register()
    mod = tvm.IRModule({"f": globals()[func].with_attr("global_symbol", "f")})
    lib = tvm.compile(mod, target=tvm.target.Target({"kind": "c"}), tir_pipeline=pipeline)
    lib.export_library(os.path.join(tempfile.mkdtemp(), "f.so"))
    print("built")
"""


@pytest.mark.parametrize("func, upstream_error", [
    # workarounds.register's exp2 lowering: TVM has none for the C source target
    ("exp2", "Unresolved call"),
    # workarounds.c_expressions: TVM prints the min's operands as statements inside the allocation call
    ("workspace", "TVMBackendAllocWorkspace"),
])
def test_c_source_target_needs_the_c_pipeline(tmp_path, func, upstream_error):
    upstream = _run(tmp_path, _C_SOURCE, func, "default")
    assert upstream.returncode != 0 and upstream_error in upstream.stderr, upstream.stderr[-2000:]
    ours = _run(tmp_path, _C_SOURCE, func, workarounds.C_TIR_PIPELINE)
    assert ours.returncode == 0 and "built" in ours.stdout, ours.stderr[-2000:]


_TENSORIZE = """
    import mlc_spec  # TVM as mlc_spec loads it, without torch, whose modules slow TVMScript's parser
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    def schedule(marked):
        a = te.placeholder((128, 256), "float16", "a")
        b = te.placeholder((256, 512), "float16", "b")
        k = te.reduce_axis((0, 256), "k")
        c = te.compute((128, 512), lambda i, j: te.sum(a[i, k].astype("float32") * b[k, j].astype("float32"), axis=k))
        func = te.create_prim_func([a, b, c])
        if marked:
            func = func.with_attr("dlight.do_not_tensorize", True)
        with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
            dl.ApplyDefaultSchedule(dl.gpu.Matmul())(tvm.IRModule({"main": func}))

    schedule(marked=True)
    print("scheduled marked", flush=True)
    schedule(marked=False)
    print("scheduled unmarked", flush=True)
"""


def test_tensorizing_a_float16_cuda_matmul_crashes(tmp_path):
    """workarounds.mark_do_not_tensorize: dlight's Matmul rule segfaults tensorizing it, unless told not to.
    Both in one interpreter, the marked one first: the rule imports TVM's tensor intrinsics, 30-40 s."""
    result = _run(tmp_path, _TENSORIZE)
    assert "scheduled marked" in result.stdout, result.stderr[-2000:]
    assert result.returncode < 0 and "scheduled unmarked" not in result.stdout, \
        f"exit {result.returncode}: the tensorize crash is gone upstream"
