"""Every workaround for a TVM 0.27 bug, one function each, with the upstream behaviour it corrects.

tests/test_workarounds.py checks that each bug is still there: when one of those tests fails after a TVM
upgrade, upstream has fixed or changed that behaviour, and its workaround here should go. Nothing is
registered on import; the build calls register() before it compiles.
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.expr import TensorLoad
from tvm.ir.prim.expr import Let, Max, Min
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, TIRPagedKVCache

from . import attention, rope

C_TIR_PIPELINE = "mlc_spec_c_source"


@functools.cache  # TVM refuses a second registration of the same lowering
def register() -> None:
    """The global registrations the C source target needs."""
    tirx.register_intrin_lowering("tirx.exp2", target="c", f=_lower_c_exp2, level=99)
    tirx.register_tir_pipeline(C_TIR_PIPELINE, _c_tir_pipeline)


# ---------------------------------------------------------------------------------------------------
# TVM's CPU paged-KV attention kernels


@tvm.transform.module_pass(opt_level=0, name="OneElementLoadsAtZero")
def one_element_loads_at_zero(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Index 0 for every load from a one-element buffer, the only in-bounds index.

    TVM 0.27's CPU prefill and tree attention (the paged-KV ones; _FastCPUAttention replaces the
    prefill one) read scale_O[d_idx] from a one-element buffer. LLVM, entitled to assume the access
    is in bounds, reads scale_O[0]; a C compiler reads past the buffer, and verify logits come out wrong.
    """
    return _map_prim_funcs(mod, (TensorLoad, _load_at_zero))


def _load_at_zero(load):
    shape = load.source.shape
    if len(shape) == 1 and isinstance(shape[0], tirx.IntImm) and shape[0].value == 1:
        return tirx.BufferLoad(load.source, [tirx.IntImm(load.indices[0].ty.dtype, 0)])
    return load


@tvm.transform.module_pass(opt_level=0, name="LoopsBoundedByTheirGuard")
def loops_bounded_by_their_guard(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """`for i in range(n): if i < m: body` -> `for i in range(min(n, m)): body`.

    TVM 0.27's CPU paged prefill and tree attention (_FastCPUAttention replaces the prefill one) walk
    the whole page pool (max_num_pages * page_size rows) for every query and head, skipping the rows
    past the sequence with that guard: with a cache sized for 8 sequences of 2048 tokens, a 5-token
    verify of SmolLM2 spent more time skipping rows than attending. Rows the guard skips do nothing,
    so bounding the loop by it changes no result.
    """
    return _map_prim_funcs(mod, (tirx.For, _bound_by_guard))


def _bound_by_guard(loop):
    guard = loop.body
    if not (isinstance(guard, tirx.IfThenElse) and guard.else_case is None and isinstance(guard.condition, tirx.LT)):
        return loop
    bound = guard.condition.b
    if not (guard.condition.a.same_as(loop.loop_var) and _is_zero(loop.min) and bound.ty.dtype == loop.extent.ty.dtype
            and not _depends_on(bound, loop.loop_var, _stored_buffers(guard.then_case))):
        return loop
    return tirx.For(loop.loop_var, loop.min, tirx.Min(loop.extent, bound), loop.kind, guard.then_case,
                    loop.thread_binding, loop.annotations)


def _is_zero(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and expr.value == 0


def _stored_buffers(stmt) -> list:
    stored = []
    tvm_ffi.structural_walk(stmt, (tirx.BufferStore, lambda node: stored.append(node.buffer)))
    return stored


def _depends_on(expr, var, buffers: list) -> bool:
    """Whether the loop can change expr: it reads the loop variable or a buffer the loop writes."""
    found = []
    tvm_ffi.structural_walk(expr, [
        (tirx.Var, lambda node: found.append(node) if node.same_as(var) else None),
        (TensorLoad, lambda node: found.append(node) if any(node.source.same_as(b) for b in buffers) else None),
    ])
    return bool(found)


TREE_KERNELS = (
    "tir_attention_prefill_with_tree_mask_cpu",
    "tir_attention_prefill_with_tree_mask_with_paged_kv_cache_cpu",
)


def tree_kernel_slots(call: relax.Call) -> list[str]:
    """The tree-attention kernels a paged KV cache's create call passes, in argument order."""
    return [name for name in map(_tuple_func_name, call.args) if name in TREE_KERNELS]


class _SwapCPUTreeKernels(PagedKVCache):
    """TVM 0.27's llvm branch of TIRPagedKVCache passes the ragged and paged tree-attention kernels
    in swapped slots (the CUDA branch is right), so any non-chain token tree fails on CPU with
    "Expected 16 arguments ... tree_attn_paged_kv_cpu". Placed after TIRPagedKVCache in the MRO, this
    receives the create call before it is emitted and swaps the two back."""

    def __init__(self, _expr: relax.Call, _name: str):
        args = list(_expr.args)
        if tree_kernel_slots(_expr) != list(TREE_KERNELS):
            raise RuntimeError("unexpected TIRPagedKVCache layout: re-check the CPU tree-attention workaround")
        slots = [i for i, a in enumerate(args) if _tuple_func_name(a) in TREE_KERNELS]
        args[slots[0]], args[slots[1]] = args[slots[1]], args[slots[0]]
        super().__init__(_expr=relax.Call(_expr.op, args, _expr.attrs, _expr.ty_args), _name=_name)


CPU_ATTENTION_KERNELS = {"tir_attention_decode_cpu": attention.paged_decode_cpu}
# TVM's two parts of a multi-token forward's attention (the new tokens' own part of a chain or of a
# token tree, then the cached pages') -> the functions of attention.GLUE_SOURCE, linked into the library,
# that run attention.chunk_attention_cpu over both at once (cpu_attention.c says how).
CPU_PREFILL_ATTENTION = {
    "tir_attention_prefill_ragged_cpu": attention.ATTENTION_NEW_TOKENS,
    "tir_attention_prefill_with_tree_mask_cpu": attention.ATTENTION_NEW_TREE,
    "tir_attention_prefill_cpu": attention.ATTENTION_CACHED_PAGES,
}


class _FastCPUAttention(PagedKVCache):
    """TVM 0.27's CPU attention kernels are scalar loop nests on one thread, and its multi-token
    forwards merge two partial attentions in float, a rounding apart from a decode (see
    compile/attention.py). This receives the create call like _SwapCPUTreeKernels: the decode kernel
    becomes attention.py's under TVM's name, the two prefill slots cpu_attention.c's functions (the
    build links it into the library), and the chunk kernels those call are added to the module as
    attention.CHUNK_ATTENTION_KERNELS."""

    def __init__(self, _expr: relax.Call, _name: str):
        bb = relax.BlockBuilder.current()
        names = [_tuple_func_name(a) for a in _expr.args]
        if not set(CPU_ATTENTION_KERNELS) | set(CPU_PREFILL_ATTENTION) <= set(names):
            raise RuntimeError("unexpected TIRPagedKVCache layout: re-check the CPU attention workaround")
        args = list(_expr.args)
        for i, name in enumerate(names):
            if name in CPU_ATTENTION_KERNELS:
                bb.update_func(args[i].fields[1], CPU_ATTENTION_KERNELS[name](*self.attention_shape))
            elif name in CPU_PREFILL_ATTENTION:
                args[i] = relax.Tuple([args[i].fields[0], relax.ExternFunc(CPU_PREFILL_ATTENTION[name])])
        h_kv, h_q, _, _ = self.attention_shape
        for name, queries in zip(attention.CHUNK_ATTENTION_KERNELS, (attention.QUERIES, attention.few_queries(h_kv, h_q))):
            kernel = attention.chunk_attention_cpu(*self.attention_shape, queries)
            bb.add_func(kernel.with_attr("global_symbol", name), name)
        super().__init__(_expr=relax.Call(_expr.op, args, _expr.attrs, _expr.ty_args), _name=_name)


class _FastCPURope(PagedKVCache):
    """TVM 0.27's CPU split of the fused qkv evaluates RoPE's powf, cosf and sinf for every element of
    every head, one lane at a time. This receives the create call like _SwapCPUTreeKernels and puts
    rope.py's kernel, which computes each token's angles once, under TVM's name."""

    def __init__(self, _expr: relax.Call, _name: str):
        rotary = [a for a in _expr.args if isinstance(a, relax.GlobalVar) and a.name_hint == SPLIT_ROTARY]
        if len(rotary) != 1:
            raise RuntimeError("unexpected TIRPagedKVCache layout: re-check the CPU RoPE workaround")
        relax.BlockBuilder.current().update_func(rotary[0], rope.split_rotary_cpu(*self.rope_args))
        super().__init__(_expr=_expr, _name=_name)


SPLIT_ROTARY = "tir_split_rotary"


class CPUPagedKVCache(TIRPagedKVCache, _SwapCPUTreeKernels, _FastCPUAttention, _FastCPURope):
    """TIRPagedKVCache for llvm targets, with its tree-attention kernels in the right slots,
    parallel, vectorised prefill and decode attention, and RoPE's angles computed once per token."""

    def __init__(self, **kwargs):
        self.attention_shape = (kwargs["num_key_value_heads"], kwargs["num_attention_heads"], kwargs["qk_head_dim"],
                                kwargs["dtype"])
        self.rope_args = (kwargs["rope_theta"], kwargs["rope_scale"], kwargs["qk_head_dim"],
                          kwargs["num_attention_heads"], kwargs["num_key_value_heads"], kwargs["dtype"],
                          kwargs["rope_scaling"], kwargs["rotary_dim"])
        super().__init__(**kwargs)


def _tuple_func_name(expr) -> str | None:
    if isinstance(expr, relax.Tuple) and len(expr.fields) == 2 and isinstance(expr.fields[1], relax.GlobalVar):
        return expr.fields[1].name_hint
    return None


# ---------------------------------------------------------------------------------------------------
# GPU schedules


@tvm.transform.module_pass(opt_level=0, name="MarkDoNotTensorize")
def mark_do_not_tensorize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Keeps dlight's GPU rules from tensorizing: Schedule.tensorize segfaults in 0.27 (float16
    tensor-core matmuls on CUDA)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
    return mod


# ---------------------------------------------------------------------------------------------------
# The C source target


def _lower_c_exp2(call):
    """exp2 for the C source target, which TVM gives no lowering rule (LLVM has an intrinsic)."""
    dtype = call.ty.dtype
    return tirx.call_pure_extern(dtype, "exp2f" if dtype == "float32" else "exp2", *call.args)


def _c_tir_pipeline():
    """TVM's TIR pipeline for the C source target. Vectorized loops stay plain loops (C has no vector
    types). After LowerIntrin, let expressions are inlined and integer min/max become selects: TVM's
    C code generator prints a let, or an operand of min/max, as a statement of its own, which lands
    in the middle of a workspace allocation whose size holds one."""
    lower, finalize_host, finalize_device = tirx.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="MlcSpecCSourceLowering")
    def _lower(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        with tvm.transform.PassContext(opt_level=ctx.opt_level, config={**ctx.config, "tirx.disable_vectorize": True}):
            return lower(mod)

    return _lower, lambda: tvm.transform.Sequential([finalize_host(), c_expressions]), finalize_device


@tvm.transform.module_pass(opt_level=0, name="CSourceExpressions")
def c_expressions(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Lets inlined and integer min/max as selects, for TVM's C code generator (see _c_tir_pipeline)."""
    return _map_prim_funcs(mod, [(Let, _inline_let), (Max, _int_select(lambda a, b: a > b)),
                                 (Min, _int_select(lambda a, b: a < b))])


def _inline_let(let):
    return tvm_ffi.structural_map(let.body, (tirx.Var, lambda v: let.value if v.same_as(let.var) else v))


def _int_select(first_if):
    def rewrite(e):
        if not str(e.ty.dtype).startswith(("int", "uint")):
            return e
        return tirx.Select(first_if(e.a, e.b), e.a, e.b)

    return rewrite


def _map_prim_funcs(mod: tvm.IRModule, rewrites) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = tvm_ffi.structural_map(func, rewrites)
    return mod
