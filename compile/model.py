"""Llama-family decoder (Llama, Mistral, Qwen2) in tvm.relax.frontend.nn over the nn.llm paged KV cache.

Every forward works on a ragged batch flattened to [1, total_tokens]: the KV cache's begin_forward
(called by the runtime) says which sequence owns which tokens and, for token trees, their parents.
Linear weights are stored [in, out] for GPUs and packed [out/T, in, T] for CPUs (see Linear); the
compiler's weight conversion (checkpoint.py) fuses and lays out Hugging Face's [out, in] tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from . import kernels
from .config import ModelConfig
from .quantization import BITS, CODE_TILE, GROUP, packed_shapes
from .integer_matmul import IntegerDot, activation_scale_count, integer_dot, integer_matmul, quantize_activations
from .quantized_matmul import code_at, quantized_matmul

# Rows a packed matmul computes per weight pass in multi-token forwards: the k+1 = 5 tokens of a
# verify at the default draft length, and 5 rows x 4 vectors of accumulators fit AVX-512's registers.
VERIFY_ROW_BLOCK = 5

KV_CACHE_SPEC = {
    "max_batch_size": int,
    "max_total_seq_len": int,
    "prefill_chunk_size": int,
    "page_size": int,
    "support_sliding_window": int,
}


def packed_tiles(out_features: int, tile: int) -> int:
    return -(-out_features // tile)


class Linear(nn.Module):
    """y = x @ W (+ b).

    With tile=None, W is stored [in, out]. With a tile T (the CPU layout), W is stored
    [ceil(out / T), in, T]: the T output features of a tile are contiguous for every input feature,
    so each parallel task streams one contiguous block of the weight (measured here: 2.7x the
    bandwidth of the [in, out] layout on the 113 MB output head). Padding columns are zero and sliced off.

    A quantization format (quantization.py; CPU layout only) stores codes in that layout, with tiles of
    CODE_TILE, plus float16 scales (and mins) per group of 32 inputs: decode reads the quantized bytes
    and nothing else. With an
    integer dot product (integer_matmul.py), the input is quantized to int8 blocks and multiplied in
    integers, as llama.cpp does; without one, codes are converted to float inside the matmul
    (quantized_matmul.py), which computes the float model with the dequantized weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tile: int | None = None,
                 quantization: str | None = None, dot: IntegerDot | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.tile = CODE_TILE if quantization is not None else tile
        self.quantization, self.dot = quantization, dot
        if quantization is None:
            shape = (in_features, out_features) if tile is None else (packed_tiles(out_features, tile), in_features, tile)
            self.weight = nn.Parameter(shape)
            self.scales = None
        else:
            shapes = packed_shapes(BITS[quantization], in_features, packed_tiles(out_features, self.tile), self.tile)
            self.weight, self.scales = (nn.Parameter(*shapes[name]) for name in ("weight", "scales"))
        self.bias = nn.Parameter((out_features,)) if bias else None

    def to(self, dtype=None):
        # Codes and their float16 scales keep their storage types; float weights follow the model.
        for param in (self.weight if self.quantization is None else None, self.bias):
            if param is not None:
                param.to(dtype)

    @property
    def _stored(self) -> list[Tensor]:
        return [p for p in (self.weight, self.scales) if p is not None]

    def _weight_at(self, stored: list[te.Tensor], j, k, t, dtype: str):
        """W[j, k, t] of the packed layout, dequantized to dtype when quantized."""
        if self.quantization is None:
            return stored[0][j, k, t]
        codes, scales = stored
        bits = BITS[self.quantization]
        w = code_at(codes, bits, j, k, t).astype(dtype) * scales[j, k // GROUP, 0, t].astype(dtype)
        return w + scales[j, k // GROUP, 1, t].astype(dtype) if bits == 4 else w

    def forward(self, x: Tensor, row_block: int = 1) -> Tensor:
        if self.tile is None:
            y = op.matmul(x, self.weight)
        elif self.quantization is None:
            y = self._packed_matmul(x, row_block)
        else:
            y = self._quantized_matmul(x, row_block)
        return y + self.bias if self.bias is not None else y

    def _packed_matmul(self, x: Tensor, row_block: int) -> Tensor:
        """Rows are computed row_block at a time: a block's accumulators stay in registers while the
        weight tile streams past once, so a verify forward of k+1 <= row_block tokens reads every
        weight once (measured: 5 rows in one block cost 0.99x one row; row by row, 2-4x)."""
        *lead, k_dim = x.shape
        tiles, tile, n_out, r = packed_tiles(self.out_features, self.tile), self.tile, self.out_features, row_block

        def matmul(xs: te.Tensor, w: te.Tensor):
            rows = xs.shape[0]
            k = te.reduce_axis((0, k_dim), name="k")

            def row(b, i):  # rows past the end of a partial block read zeros
                return tirx.if_then_else(b * r + i < rows, xs[tirx.min(b * r + i, rows - 1), k], tirx.const(0, xs.dtype))

            y = te.compute(((rows + r - 1) // r, r, tiles, tile),
                           lambda b, i, j, t: te.sum(row(b, i) * w[j, k, t], axis=k), name="matmul")
            return te.compute((rows, n_out), lambda i, c: y[i // r, i % r, c // tile, c % tile], name="unpack")

        flat = op.reshape(x, (-1, k_dim))
        y = op.tensor_expr_op(matmul, "packed_matmul", [flat, self.weight])
        return op.reshape(y, (*lead, n_out))

    def _quantized_matmul(self, x: Tensor, row_block: int) -> Tensor:
        *lead, k_dim = x.shape
        flat = op.reshape(x, (-1, k_dim))
        out = Tensor.placeholder((flat.shape[0], self.out_features), x.dtype)
        if self.dot is None:
            kernel = quantized_matmul(BITS[self.quantization], self.in_features, self.out_features, self.tile,
                                      row_block, x.dtype)
            y = op.tensor_ir_op(kernel, "quantized_matmul", [flat, self.weight, self.scales], out)
        else:
            kernel = integer_matmul(self.quantization, self.in_features, self.out_features, self.tile, row_block,
                                    x.dtype, self.dot)
            y = op.tensor_ir_op(kernel, "integer_matmul", [*self._quantized_input(flat), self.weight, self.scales], out)
        return op.reshape(y, (*lead, self.out_features))

    def _quantized_input(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """The input's int8 codes and per-block scales, made once and read by every tile of the matmul."""
        fmt, rows, groups = self.quantization, flat.shape[0], self.in_features // GROUP
        outs = [Tensor.placeholder((rows, self.in_features), "int8"),
                Tensor.placeholder((rows, groups, activation_scale_count(fmt)), "float32")]
        return tuple(op.tensor_ir_op(quantize_activations(fmt, self.in_features, flat.dtype), "quantize_activations",
                                     [flat], outs))

    def take_columns(self, ids: Tensor, dtype: str) -> Tensor:
        """Rows of W^T for these ids: the embedding of a model whose embedding is tied to this head."""
        if self.tile is None:
            return op.permute_dims(op.take(self.weight, ids, axis=1))
        tile, k_dim = self.tile, self.in_features

        def compute(idx: te.Tensor, *stored: te.Tensor):
            return te.compute((idx.shape[0], k_dim),
                              lambda i, k: self._weight_at(stored, idx[i] // tile, k, idx[i] % tile, dtype),
                              name="take_columns")

        return op.tensor_expr_op(compute, "take_columns", [ids, *self._stored])


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How each Linear stores its weight: the CPU tile (None: [in, out]) and, by parameter prefix
    (e.g. "lm_head"), the quantization format of those that are quantized."""
    tile: int | None = None
    formats: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dot: IntegerDot | None = None  # the CPU's integer dot product for quantized Linears (CausalLM sets it)

    def linear(self, name: str, in_features: int, out_features: int, bias: bool = False) -> Linear:
        return Linear(in_features, out_features, bias, self.tile, self.formats.get(name), self.dot)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layout: WeightLayout, prefix: str):
        self.c = c
        qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        self.qkv_proj = layout.linear(prefix + "qkv_proj", c.hidden_size, qkv_out, bias=c.attention_bias)
        self.o_proj = layout.linear(prefix + "o_proj", c.num_attention_heads * c.head_dim, c.hidden_size)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, row_block: int) -> Tensor:
        c = self.c
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x, row_block),
                         (b, s, c.num_attention_heads + 2 * c.num_key_value_heads, c.head_dim))
        o = kv.attention_with_fused_qkv(layer_id, qkv, c.num_attention_heads, sm_scale=c.head_dim**-0.5)
        return self.o_proj(op.reshape(o, (b, s, c.num_attention_heads * c.head_dim)), row_block)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, layout: WeightLayout, prefix: str):
        self.gate_up_proj = layout.linear(prefix + "gate_up_proj", c.hidden_size, 2 * c.intermediate_size)
        self.down_proj = layout.linear(prefix + "down_proj", c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor, row_block: int) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x, row_block), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up, row_block)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layout: WeightLayout, prefix: str):
        self.self_attn = Attention(c, layout, prefix + "self_attn.")
        self.mlp = MLP(c, layout, prefix + "mlp.")
        self.input_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)

    def forward(self, h: Tensor, kv: PagedKVCache, layer_id: int, row_block: int) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), kv, layer_id, row_block)
        return h + self.mlp(self.post_attention_layernorm(h), row_block)


class Decoder(nn.Module):
    def __init__(self, c: ModelConfig, layout: WeightLayout):
        # Untied models keep the usual [vocab, hidden] table; tied ones read rows out of the
        # transposed lm_head so the shared matrix is stored once.
        self.embed_tokens = None if c.tie_word_embeddings else nn.Parameter((c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList([DecoderLayer(c, layout, f"model.layers.{i}.") for i in range(c.num_hidden_layers)])
        self.norm = nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)

    def forward(self, h: Tensor, kv: PagedKVCache, row_block: int) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, kv, layer_id, row_block)
        return self.norm(h)


class CausalLM(nn.Module):
    """The exported functions of one model library (MLC-LLM's naming, token ids in)."""

    def __init__(self, c: ModelConfig, target: tvm.target.Target, output_vocab_size: int | None = None,
                 layout: WeightLayout | None = None):
        """output_vocab_size aligns a draft's logits to its target's vocabulary: extra padding rows
        of the draft's head are dropped, missing ones come out as -inf (the draft never proposes them).
        layout says how each Linear stores its weight."""
        self.c = c
        self.target = target
        self.output_vocab_size = output_vocab_size or c.vocab_size
        layout = dataclasses.replace(layout or WeightLayout(), dot=integer_dot(target))
        self.quantized = bool(layout.formats)
        self.model = Decoder(c, layout)
        self.lm_head = layout.linear("lm_head", c.hidden_size, min(c.vocab_size, self.output_vocab_size))
        self.dtype = "float32"

    def to(self, dtype=None):
        super().to(dtype)
        if dtype is not None:
            self.dtype = dtype

    # -- model forwards ---------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        if self.model.embed_tokens is not None:
            return op.take(self.model.embed_tokens, input_ids, axis=0)
        return self.lm_head.take_columns(input_ids, self.dtype)

    def _logits(self, h: Tensor, row_block: int = 1) -> Tensor:
        logits = self.lm_head(h, row_block)
        logits = logits.astype("float32") if logits.dtype != "float32" else logits
        missing = self.output_vocab_size - self.c.vocab_size
        if missing > 0:
            logits = op.pad(logits, [0, 0, 0, missing], value=float("-inf"))
        return logits

    def _hidden(self, input_ids: Tensor, kv: PagedKVCache, row_block: int) -> Tensor:
        h = self.embed(input_ids)
        return self.model(op.reshape(h, (1, input_ids.shape[0], self.c.hidden_size)), kv, row_block)

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """Ragged prefill of several sequences; logits only at logit_positions (each one's last token)."""
        h = self._hidden(input_ids, paged_kv_cache, VERIFY_ROW_BLOCK)
        h = op.take(op.reshape(h, (input_ids.shape[0], self.c.hidden_size)), logit_positions, axis=0)
        return self._logits(h), paged_kv_cache

    def decode(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        return self._all_logits(input_ids, paged_kv_cache, 1)

    def batch_decode(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        return self._all_logits(input_ids, paged_kv_cache, 1)

    def verify(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        """Logits at every token given: a chain [last, d1..dk] per sequence, or a token tree."""
        return self._all_logits(input_ids, paged_kv_cache, VERIFY_ROW_BLOCK)

    @property
    def verify_row_blocks(self) -> list[int]:
        """Row blocks of the extra verify_<r> functions: exactly r rows per weight pass, for verifies of
        r < VERIFY_ROW_BLOCK tokens. Only quantized models get them: their matmuls are compute-bound on
        CPUs, so a 2-token verify in blocks of 5 pays for 5 rows; float matmuls wait on memory either way."""
        return list(range(2, VERIFY_ROW_BLOCK)) if self.quantized else []

    def _verify_rows(self, rows: int):
        def verify(input_ids: Tensor, paged_kv_cache: PagedKVCache):
            return self._all_logits(input_ids, paged_kv_cache, rows)

        return verify

    def _all_logits(self, input_ids: Tensor, kv: PagedKVCache, row_block: int):
        h = self._hidden(input_ids, kv, row_block)
        return self._logits(op.reshape(h, (input_ids.shape[0], self.c.hidden_size)), row_block), kv

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.c
        cache_class = CPUPagedKVCache if self.target.kind.name == "llvm" else TIRPagedKVCache
        return cache_class(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling or {}),
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    # -- sampling and verification kernels (compile/kernels.py) -----------------------------------
    def sampling_probs(self, logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
        return self._kernel("sampling_probs", [logits, temperature, top_k, top_p], [(logits.shape, "float32")])

    def sample_from_probs(self, probs: Tensor, uniforms: Tensor) -> Tensor:
        return self._kernel("sample_from_probs", [probs, uniforms], [((probs.shape[0],), "int32")])

    def argmax(self, logits: Tensor) -> Tensor:
        return self._kernel("argmax", [logits], [((logits.shape[0],), "int32")])

    def verify_greedy(self, logits: Tensor, draft_tokens: Tensor, indptr: Tensor):
        batch = (indptr.shape[0] - 1,)
        return self._kernel("verify_greedy", [logits, draft_tokens, indptr], [(batch, "int32"), (batch, "int32")])

    def verify_sampling(self, p: Tensor, q: Tensor, draft_tokens: Tensor, indptr: Tensor,
                        u_accept: Tensor, u_sample: Tensor):
        batch = (u_sample.shape[0],)
        return self._kernel("verify_sampling", [p, q, draft_tokens, indptr, u_accept, u_sample],
                            [(batch, "int32"), (batch, "int32")])

    def tree_verify_greedy(self, logits: Tensor, tokens: Tensor, parents: Tensor, indptr: Tensor):
        batch = (indptr.shape[0] - 1,)
        return self._kernel("tree_verify_greedy", [logits, tokens, parents, indptr], [(batch, "int32"), (batch, "int32")])

    def tree_verify_sampling(self, p: Tensor, q: Tensor, tokens: Tensor, parents: Tensor, indptr: Tensor,
                             u_accept: Tensor, u_sample: Tensor):
        batch = (u_sample.shape[0],)
        return self._kernel("tree_verify_sampling", [p, q, tokens, parents, indptr, u_accept, u_sample],
                            [(batch, "int32"), (batch, "int32")])

    def _kernel(self, name: str, args: list[Tensor], outs: list[tuple]):
        placeholders = [Tensor.placeholder(shape, dtype) for shape, dtype in outs]
        result = op.tensor_ir_op(
            kernels.scheduled_kernels(self.target)[name], name, args,
            placeholders[0] if len(placeholders) == 1 else placeholders,
        )
        return result if len(placeholders) == 1 else tuple(result)

    # -- export spec --------------------------------------------------------------------------------
    def get_default_spec(self) -> nn.spec.ModuleSpec:
        v = self.output_vocab_size
        packed = {"param_mode": "packed", "effect_mode": "none"}
        plain = {"param_mode": "none", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        ids = lambda n: nn.spec.Tensor([n], "int32")  # noqa: E731
        f32 = lambda *shape: nn.spec.Tensor(list(shape), "float32")  # noqa: E731
        spec = {
            "embed": {"input_ids": ids("seq_len"), "$": packed},
            "prefill": {"input_ids": ids("seq_len"), "logit_positions": ids("batch_size"),
                        "paged_kv_cache": kv, "$": packed},
            "decode": {"input_ids": ids(1), "paged_kv_cache": kv, "$": packed},
            "batch_decode": {"input_ids": ids("batch_size"), "paged_kv_cache": kv, "$": packed},
            "verify": {"input_ids": ids("seq_len"), "paged_kv_cache": kv, "$": packed},
            **{f"verify_{r}": {"input_ids": ids("seq_len"), "paged_kv_cache": kv, "$": packed}
               for r in self.verify_row_blocks},
            "create_paged_kv_cache": {**KV_CACHE_SPEC, "$": plain},
            "sampling_probs": {"logits": f32("n", v), "temperature": f32("n"),
                               "top_k": nn.spec.Tensor(["n"], "int32"), "top_p": f32("n"), "$": plain},
            "sample_from_probs": {"probs": f32("n", v), "uniforms": f32("n"), "$": plain},
            "argmax": {"logits": f32("n", v), "$": plain},
            "verify_greedy": {"logits": f32("n", v), "draft_tokens": ids("m"), "indptr": ids("b"), "$": plain},
            "verify_sampling": {"p": f32("n", v), "q": f32("m", v), "draft_tokens": ids("m"),
                                "indptr": ids("b"), "u_accept": f32("m"), "u_sample": f32("bs"), "$": plain},
            "tree_verify_greedy": {"logits": f32("n", v), "tokens": ids("n"), "parents": ids("n"), "indptr": ids("b"),
                                   "$": plain},
            "tree_verify_sampling": {"p": f32("n", v), "q": f32("n", v), "tokens": ids("n"), "parents": ids("n"),
                                     "indptr": ids("b"), "u_accept": f32("n"), "u_sample": f32("bs"), "$": plain},
        }
        for r in self.verify_row_blocks:
            setattr(self, f"verify_{r}", self._verify_rows(r))
        return nn.spec.ModuleSpec.from_raw(spec, self)


_TREE_KERNELS = (
    "tir_attention_prefill_with_tree_mask_cpu",
    "tir_attention_prefill_with_tree_mask_with_paged_kv_cache_cpu",
)


class _SwapCPUTreeKernels(PagedKVCache):
    """TVM 0.27's llvm branch of TIRPagedKVCache passes the ragged and paged tree-attention kernels
    in swapped slots (the CUDA branch is right), so any non-chain token tree fails on CPU with
    "Expected 16 arguments ... tree_attn_paged_kv_cpu". Placed after TIRPagedKVCache in the MRO, this
    receives the create call before it is emitted and swaps the two back."""

    def __init__(self, _expr: relax.Call, _name: str):
        args = list(_expr.args)
        slots = [i for i, a in enumerate(args) if _tuple_func_name(a) in _TREE_KERNELS]
        if [_tuple_func_name(args[i]) for i in slots] != list(_TREE_KERNELS):
            raise RuntimeError("unexpected TIRPagedKVCache layout: re-check the CPU tree-attention workaround")
        args[slots[0]], args[slots[1]] = args[slots[1]], args[slots[0]]
        super().__init__(_expr=relax.Call(_expr.op, args, _expr.attrs, _expr.ty_args), _name=_name)


class CPUPagedKVCache(TIRPagedKVCache, _SwapCPUTreeKernels):
    pass


def _tuple_func_name(expr) -> str | None:
    if isinstance(expr, relax.Tuple) and len(expr.fields) == 2 and isinstance(expr.fields[1], relax.GlobalVar):
        return expr.fields[1].name_hint
    return None
