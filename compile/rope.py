"""RoPE on CPU: TVM's paged KV cache's split of the fused qkv into q, k and v, rotating q and k.

TVM's kernel (llama_rope_with_position_map) evaluates powf, cosf and sinf for every element of every
head, one lane at a time: a verify of two tokens spent as long there as in attention. The angle
depends only on the token's position and the dimension, so this computes each token's cosines and
sines once, with TVM's own expressions for them (switch_rope_freq_func: the same values), and rotates
every head with them, vectorised over the head's dimensions.
"""

from __future__ import annotations

from tvm import tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T


def split_rotary_cpu(theta: float, scale: float, head_dim: int, h_q: int, h_kv: int, dtype: str, rope_scaling: dict,
                     rotary_dim: int):
    """tir_split_rotary: qkv [n, h_q + 2 h_kv, head_dim] -> q, k (rotated when apply_rope) and v.
    rope_scaling as TVM's kernel takes it (any type but longrope, whose factors come as an argument)."""
    freq = switch_rope_freq_func(rope_scaling)
    gptj = rope_scaling.get("rope_type") == "gptj"
    half = rotary_dim // 2

    def cos_sin(position, d, which: int):
        values = freq(position.astype("float32") * T.float32(scale), d, rotary_dim, theta, "float32")
        value = values[which]
        for var, bound in values[2].items():
            value = tirx.Let(var, bound, value)
        return value

    def partner(x, s, h, d):
        """The element d is rotated with, negated when it comes after d."""
        if gptj:
            return T.if_then_else(d % 2 == 0, -x[s, h, T.min(d + 1, head_dim - 1)], x[s, h, T.max(d - 1, 0)])
        return T.if_then_else(d < half, -x[s, h, T.min(d + half, head_dim - 1)], x[s, h, T.max(d - half, 0)])

    @T.macro
    def rotate(out, qkv, s, h, h0, cos, sin, apply_rope):
        for d in T.vectorized(head_dim):
            out[s, h, d] = T.if_then_else(
                apply_rope > 0 and d < rotary_dim,
                (cos[T.min(d, rotary_dim - 1)] * T.Cast("float32", qkv[s, h0 + h, d])
                 + sin[T.min(d, rotary_dim - 1)] * T.Cast("float32", partner(qkv, s, h0 + h, d))).astype(dtype),
                qkv[s, h0 + h, d])

    @T.prim_func(s_tir=True)
    def split_rotary(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                     var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, h_q + 2 * h_kv, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, h_q, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=T.int32())
        for s in range(seq_len):
            with T.sblock("token"):
                cos = T.sblock_alloc_buffer((rotary_dim,), "float32")
                sin = T.sblock_alloc_buffer((rotary_dim,), "float32")
                for d in range(rotary_dim):
                    cos[d] = cos_sin(position_map[s], d, 0)
                    sin[d] = cos_sin(position_map[s], d, 1)
                for h in range(h_q):
                    rotate(q, qkv, s, h, 0, cos, sin, apply_rope)
                for h in range(h_kv):
                    rotate(k, qkv, s, h, h_q, cos, sin, apply_rope)
                for h in range(h_kv):
                    for d in T.vectorized(head_dim):
                        v[s, h, d] = qkv[s, h_q + h_kv + h, d]

    return split_rotary
