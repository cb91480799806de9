"""Llama-family decoder (Llama, Mistral, Qwen2) in tvm.relax.frontend.nn over the nn.llm paged KV cache.

Every forward works on a ragged batch flattened to [1, total_tokens]: the KV cache's begin_forward
(called by the runtime) says which sequence owns which tokens and, for token trees, their parents.
Linear weights are stored [in, out] for GPUs and packed [out/T, in, T] for CPUs (see Linear); the
compiler's weight conversion (checkpoint.py) fuses and lays out Hugging Face's [out, in] tensors.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping

import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from ..interface.artifact import VOCAB, KernelSignature, TensorSpec
from . import kernels, workarounds
from .config import ModelConfig
from .integer_matmul import (IntegerDot, activation_scales_shape, biased_activations, integer_dot, integer_matmul,
                             quantize_activations)
from .quantization import CODE_TILE, LAYOUTS, format_runs, packed_shapes, packed_tiles
from .quantized_matmul import code_at, group_scale_min, quantized_matmul
from .swiglu import swiglu_cpu

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


def over_rows(x: Tensor, out_features: int, kernel_call) -> Tensor:
    """A row-wise TIR kernel over x's rows: kernel_call(flat [rows, in], out placeholder [rows,
    out_features]) on x flattened to rows, its result shaped back like x."""
    *lead, width = x.shape
    flat = op.reshape(x, (-1, width))
    y = kernel_call(flat, Tensor.placeholder((flat.shape[0], out_features), x.dtype))
    return op.reshape(y, (*lead, out_features))


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
            self.high_bits = self.scales = self.sub_scales = None
        else:
            shapes = packed_shapes(quantization, in_features, packed_tiles(out_features, self.tile), self.tile)
            self.weight, self.high_bits, self.scales, self.sub_scales = (
                nn.Parameter(*shapes[name]) if name in shapes else None
                for name in ("weight", "high_bits", "scales", "sub_scales"))
        self.bias = nn.Parameter((out_features,)) if bias else None

    def to(self, dtype=None):
        # Codes and their float16 scales keep their storage types; float weights follow the model.
        for param in (self.weight if self.quantization is None else None, self.bias):
            if param is not None:
                param.to(dtype)

    @property
    def _stored(self) -> list[Tensor]:
        """The stored arrays in packed_shapes' order, the kernels' argument order."""
        return [p for p in (self.weight, self.high_bits, self.scales, self.sub_scales) if p is not None]

    def _weight_at(self, stored: list[te.Tensor], j, k, t, dtype: str):
        """W[j, k, t] of the packed layout (stored: _stored's tensors), dequantized (in float32) to dtype
        when quantized."""
        if self.quantization is None:
            return stored[0][j, k, t]
        named = dict(zip(packed_shapes(self.quantization, self.in_features, 1, 1), stored))
        layout = LAYOUTS[self.quantization]
        scale, low = group_scale_min(self.quantization, named, j, k // layout.group, t)
        code = code_at(named, layout.bits, j, k, t).astype("float32")
        if layout.offset:  # exact, as Quantized.dequantize
            return ((code - tirx.const(layout.offset, "float32")) * scale).astype(dtype)
        w = code * scale
        return (w + low if low is not None else w).astype(dtype)

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
        def matmul(flat: Tensor, out: Tensor) -> Tensor:
            if self.dot is None:
                kernel = quantized_matmul(self.quantization, self.in_features, self.out_features, self.tile,
                                          row_block, x.dtype)
                return op.tensor_ir_op(kernel, "quantized_matmul", [flat, *self._stored], out)
            kernel = integer_matmul(self.quantization, self.in_features, self.out_features, self.tile, row_block,
                                    x.dtype, self.dot)
            return op.tensor_ir_op(kernel, "integer_matmul", [*self._quantized_input(flat), *self._stored], out)

        return over_rows(x, self.out_features, matmul)

    def _quantized_input(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """The input's int8 codes and per-block scales, made once and read by every tile of the matmul."""
        fmt, rows = self.quantization, flat.shape[0]
        outs = [Tensor.placeholder((rows, self.in_features), "int8"),
                Tensor.placeholder((rows, *activation_scales_shape(fmt, self.in_features)), "float32")]
        kernel = quantize_activations(fmt, self.in_features, flat.dtype, biased_activations(fmt, self.dot))
        return tuple(op.tensor_ir_op(kernel, "quantize_activations", [flat], outs))

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


class SplitLinear(nn.Module):
    """A fused projection whose parts a file keeps in different formats (Q4_K_M's q and k in Q4_K, v in
    Q6_K): one Linear per run of parts in the same format, their outputs side by side."""

    def __init__(self, runs: list[Linear], bias: bool):
        self.runs = nn.ModuleList(runs)
        self.bias = nn.Parameter((sum(run.out_features for run in runs),)) if bias else None

    def to(self, dtype=None):
        for module in (*self.runs, self.bias):
            if module is not None:
                module.to(dtype)

    def forward(self, x: Tensor, row_block: int = 1) -> Tensor:
        y = op.concat([run(x, row_block) for run in self.runs], dim=-1)
        return y + self.bias if self.bias is not None else y


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How each Linear stores its weight: the CPU tile (None: [in, out]) and, by parameter prefix
    (e.g. "lm_head"), the quantization format of those that are quantized: one format, or for a fused
    linear whose parts differ, one per part (checkpoint.convert_weights)."""
    tile: int | None = None
    formats: Mapping[str, str | list[str]] = dataclasses.field(default_factory=dict)
    dot: IntegerDot | None = None  # the CPU's integer dot product for quantized Linears (CausalLM sets it)

    def linear(self, name: str, in_features: int, parts: list[int], bias: bool = False) -> Linear | SplitLinear:
        """The Linear of a weight fused from parts of these output features."""
        fmt = self.formats.get(name)
        if isinstance(fmt, str) or fmt is None:
            return Linear(in_features, sum(parts), bias, self.tile, fmt, self.dot)
        runs = [Linear(in_features, sum(parts[i] for i in indices), False, self.tile, run_format, self.dot)
                for run_format, indices in format_runs(fmt)]
        return SplitLinear(runs, bias)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layout: WeightLayout, prefix: str):
        self.c = c
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.qkv_proj = layout.linear(prefix + "qkv_proj", c.hidden_size, [q_out, kv_out, kv_out], bias=c.attention_bias)
        self.o_proj = layout.linear(prefix + "o_proj", q_out, [c.hidden_size])

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int, row_block: int) -> Tensor:
        c = self.c
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x, row_block),
                         (b, s, c.num_attention_heads + 2 * c.num_key_value_heads, c.head_dim))
        o = kv.attention_with_fused_qkv(layer_id, qkv, c.num_attention_heads, sm_scale=c.head_dim**-0.5)
        return self.o_proj(op.reshape(o, (b, s, c.num_attention_heads * c.head_dim)), row_block)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, layout: WeightLayout, prefix: str):
        self.intermediate_size = c.intermediate_size
        self.gate_up_proj = layout.linear(prefix + "gate_up_proj", c.hidden_size, [c.intermediate_size] * 2)
        self.down_proj = layout.linear(prefix + "down_proj", c.intermediate_size, [c.hidden_size])
        self.cpu = layout.tile is not None

    def forward(self, x: Tensor, row_block: int) -> Tensor:
        return self.down_proj(self._swiglu(self.gate_up_proj(x, row_block)), row_block)

    def _swiglu(self, gate_up: Tensor) -> Tensor:
        if not self.cpu:
            gate, up = op.split(gate_up, 2, axis=-1)
            return op.silu(gate) * up
        kernel = swiglu_cpu(self.intermediate_size, gate_up.dtype)
        return over_rows(gate_up, self.intermediate_size, lambda flat, out: op.tensor_ir_op(kernel, "swiglu", [flat], out))


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

    def forward(self, h: Tensor, kv: PagedKVCache, row_block: int, taps: tuple[int, ...] = ()) -> Tensor:
        """The last hidden state (after the final norm), preceded along the last axis by the output of
        each layer in taps (a feature draft's lower-level features)."""
        tapped = []
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, kv, layer_id, row_block)
            if layer_id in taps:
                tapped.append(h)
        return op.concat(tapped + [self.norm(h)], dim=-1) if tapped else self.norm(h)


class CausalLM(nn.Module):
    """The exported functions of one model library (MLC-LLM's naming, token ids in)."""

    def __init__(self, c: ModelConfig, target: tvm.target.Target, output_vocab_size: int | None = None,
                 layout: WeightLayout | None = None, feature_layers: tuple[int, ...] | None = None):
        """output_vocab_size aligns a draft's logits to its target's vocabulary: extra padding rows
        of the draft's head are dropped, missing ones come out as -inf (the draft never proposes them).
        layout says how each Linear stores its weight. feature_layers (None: none) adds the *_hidden
        twins of the forwards, which also return every row's features: the outputs of those layers,
        then the last hidden state (after the final norm: the row the head reads); and embed: what a
        feature draft (eagle.py) reads of its target."""
        self.c = c
        self.feature_layers = feature_layers
        self.target = target
        self.output_vocab_size = output_vocab_size or c.vocab_size
        layout = dataclasses.replace(layout or WeightLayout(), dot=integer_dot(target))
        self.quantized = bool(layout.formats)
        self.model = Decoder(c, layout)
        self.lm_head = layout.linear("lm_head", c.hidden_size, [min(c.vocab_size, self.output_vocab_size)])
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

    def _hidden(self, input_ids: Tensor, kv: PagedKVCache, row_block: int, taps: tuple[int, ...] = ()) -> Tensor:
        """[n, (len(taps) + 1) * hidden]: Decoder.forward's rows."""
        n, h = input_ids.shape[0], self.c.hidden_size
        rows = self.model(op.reshape(self.embed(input_ids), (1, n, h)), kv, row_block, taps)
        return op.reshape(rows, (n, (len(taps) + 1) * h))

    def _features(self, input_ids: Tensor, kv: PagedKVCache, row_block: int) -> tuple[Tensor, Tensor]:
        """(the last hidden state, the features) of every row."""
        features = self._hidden(input_ids, kv, row_block, self.feature_layers)
        if not self.feature_layers:
            return features, features
        h = self.c.hidden_size
        return op.split(features, [len(self.feature_layers) * h], axis=-1)[1], features

    def prefill(self, input_ids: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """Ragged prefill of several sequences; logits only at logit_positions (each one's last token)."""
        h = op.take(self._hidden(input_ids, paged_kv_cache, VERIFY_ROW_BLOCK), logit_positions, axis=0)
        return self._logits(h), paged_kv_cache

    def prefill_hidden(self, input_ids: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """prefill, and the features of every row."""
        h, features = self._features(input_ids, paged_kv_cache, VERIFY_ROW_BLOCK)
        return self._logits(op.take(h, logit_positions, axis=0)), features, paged_kv_cache

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)

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
        return self._logits(self._hidden(input_ids, kv, row_block), row_block), kv

    def _hidden_twin(self, row_block: int):
        def forward(input_ids: Tensor, paged_kv_cache: PagedKVCache):
            """Logits and features at every token given."""
            h, features = self._features(input_ids, paged_kv_cache, row_block)
            return self._logits(h, row_block), features, paged_kv_cache

        return forward

    def create_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.c
        cache_class = workarounds.CPUPagedKVCache if self.target.kind.name == "llvm" else TIRPagedKVCache
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

    # -- export spec --------------------------------------------------------------------------------
    def get_default_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        plain = {"param_mode": "none", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        ids = nn.spec.Tensor(["seq_len"], "int32")
        spec = {
            "prefill": {"input_ids": ids, "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                        "paged_kv_cache": kv, "$": packed},
            "batch_decode": {"input_ids": nn.spec.Tensor(["batch_size"], "int32"), "paged_kv_cache": kv, "$": packed},
            "verify": {"input_ids": ids, "paged_kv_cache": kv, "$": packed},
            **{f"verify_{r}": {"input_ids": ids, "paged_kv_cache": kv, "$": packed} for r in self.verify_row_blocks},
            "create_paged_kv_cache": {**KV_CACHE_SPEC, "$": plain},
        }
        for r in self.verify_row_blocks:
            setattr(self, f"verify_{r}", self._verify_rows(r))
        if self.feature_layers is not None:
            spec.update(self._hidden_spec(ids, kv, packed))
        spec.update(self._kernel_spec(plain))
        return nn.spec.ModuleSpec.from_raw(spec, self)

    def _hidden_spec(self, ids, kv, packed: dict) -> dict:
        """The *_hidden twins of batch_decode and the verifies, prefill_hidden and embed_tokens."""
        spec = {"prefill_hidden": {"input_ids": ids, "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                                   "paged_kv_cache": kv, "$": packed},
                "embed_tokens": {"input_ids": ids, "$": packed}}
        twins = {"batch_decode_hidden": (nn.spec.Tensor(["batch_size"], "int32"), 1),
                 "verify_hidden": (ids, VERIFY_ROW_BLOCK),
                 **{f"verify_{r}_hidden": (ids, r) for r in self.verify_row_blocks}}
        for name, (input_ids, row_block) in twins.items():
            spec[name] = {"input_ids": input_ids, "paged_kv_cache": kv, "$": packed}
            setattr(self, name, self._hidden_twin(row_block))
        return spec

    def _kernel_spec(self, plain: dict) -> dict:
        """The registry kernels (compile/kernels/), over this model's output vocabulary."""
        spec = {}
        for name, func in kernels.scheduled_kernels(self.target).items():
            signature = kernels.KERNELS[name].signature
            spec[name] = {**{a.name: self._spec_tensor(a) for a in signature.args}, "$": plain}
            setattr(self, name, _kernel_call(signature, func))
        return spec

    def _spec_tensor(self, arg: TensorSpec) -> nn.spec.Tensor:
        # "batch+1" becomes its own symbol: the kernel's buffer shapes tie it to batch
        dims = [self.output_vocab_size if d == VOCAB else d.replace("+", "_plus_") for d in arg.shape]
        return nn.spec.Tensor(dims, arg.dtype)


def _kernel_call(signature: KernelSignature, func: tirx.PrimFunc):
    """The exported function of one registry kernel: its arguments in, its results out."""
    def call(*args: Tensor):
        shapes = signature.result_shapes([a.shape for a in args])
        outs = [Tensor.placeholder(shape, r.dtype) for shape, r in zip(shapes, signature.results)]
        result = op.tensor_ir_op(func, signature.name, list(args), outs[0] if len(outs) == 1 else outs)
        return result if len(outs) == 1 else tuple(result)

    # nn.spec binds the spec's arguments by the method's parameter names
    call.__signature__ = inspect.Signature(
        [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in signature.args])
    return call
