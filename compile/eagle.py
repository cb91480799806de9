"""The EAGLE-style feature draft (mlc_spec/eagle.py trains it): fc(concat(token embedding, target
feature)) -> Llama decoder layers (one, as EAGLE's) over its own paged KV cache -> final norm -> a head
over the draft_vocab_size tokens of token_ids, the target's most frequent.

The draft reads the target: the token embeddings come from the target library's embed_tokens (shared,
never copied) and the features from its *_hidden forwards; its head is the target's output head cut to
token_ids at compile time. Its functions take embeddings and features, and return the logits over the
head's tokens with the draft's own feature (the input of its next step), at each sequence's last row
(prefill_own, which feeds a token tree's levels: at the rows asked for).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import tvm
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .checkpoint import Checkpoint, SafetensorsTensors
from .config import CompileError, ModelConfig
from .model import KV_CACHE_SPEC, VERIFY_ROW_BLOCK, CausalLM, WeightLayout

KIND = "eagle"
TOKEN_IDS = "token_ids"  # the head's target token ids, int32, stored with the draft's parameters


def is_eagle_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("draft_kind") == KIND
    except (ValueError, AttributeError):
        return False


def eagle_checkpoint(folder: str | Path, target: Checkpoint) -> tuple[Checkpoint, np.ndarray]:
    """The draft folder as a checkpoint of a model of its layers with a tied head: the target's output
    head rows of token_ids (an untied target's lm_head, else its embedding); and token_ids."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    tensors = dict(SafetensorsTensors(folder))
    if TOKEN_IDS not in tensors or "fc.weight" not in tensors:
        raise CompileError(f"{folder}: an eagle draft needs fc.weight and {TOKEN_IDS}; write it with `mlc_spec train-draft`")
    token_ids = np.asarray(tensors.pop(TOKEN_IDS)).astype(np.int64)
    target_cfg = target.config
    if hf.get("vocab_size") != target_cfg.vocab_size or hf.get("hidden_size") != target_cfg.hidden_size:
        raise CompileError(f"{folder}: trained for a target of vocabulary {hf.get('vocab_size')} and width "
                           f"{hf.get('hidden_size')}, not this one ({target_cfg.vocab_size}, {target_cfg.hidden_size}); "
                           "train a draft for this target with `mlc_spec train-draft`")
    if token_ids.min() < 0 or token_ids.max() >= target_cfg.vocab_size:
        raise CompileError(f"{folder}: {TOKEN_IDS} holds ids outside the target's vocabulary")
    layers = hf.get("feature_layers", [])
    if not (isinstance(layers, list) and all(type(i) is int and 0 <= i < target_cfg.num_hidden_layers - 1 for i in layers)):
        raise CompileError(f"{folder}: feature_layers must list target layers from 0 to "
                           f"{target_cfg.num_hidden_layers - 2}, got {layers!r}; retrain it with `mlc_spec train-draft`")
    head = "model.embed_tokens.weight" if target_cfg.tie_word_embeddings else "lm_head.weight"
    tensors["model.embed_tokens.weight"] = np.asarray(target.tensors[head], np.float32)[token_ids]
    config = {**hf, "vocab_size": len(token_ids), "tie_word_embeddings": True}
    return Checkpoint(str(folder), config, tensors, target.tokenizer_json, target.tokenizer_config), token_ids


def feature_layers(draft: Checkpoint) -> tuple[int, ...]:
    """The target layers whose outputs an eagle draft fuses with the target's last hidden state."""
    return tuple(draft.hf_config.get("feature_layers", []))


class EagleDraft(CausalLM):
    """prefill and batch_decode_target read the target's features (and fuse them, with feature_layers),
    batch_decode and prefill_own the draft's own from its step before."""

    def __init__(self, c: ModelConfig, target: tvm.target.Target, layout: WeightLayout | None = None,
                 feature_layers: tuple[int, ...] = ()):
        super().__init__(c, target, c.vocab_size, layout)
        layout = dataclasses.replace(layout or WeightLayout(), dot=self.lm_head.dot)
        self.fc = layout.linear("fc", 2 * c.hidden_size, [c.hidden_size])
        self.fused_layers = tuple(feature_layers)
        if self.fused_layers:
            self.feature_norms = nn.ModuleList([nn.RMSNorm(c.hidden_size, -1, c.rms_norm_eps, bias=False)
                                                for _ in self.fused_layers])
            self.fuse = layout.linear("fuse", self.feature_width, [c.hidden_size])

    @property
    def feature_width(self) -> int:
        return (len(self.fused_layers) + 1) * self.c.hidden_size

    def _fused(self, features: Tensor, row_block: int) -> Tensor:
        """The target's features as the draft reads them (mlc_spec/eagle.py's DraftNet.target_feature)."""
        if not self.fused_layers:
            return features
        parts = op.split(features, len(self.fused_layers) + 1, axis=-1)
        normed = [norm(x) for norm, x in zip(self.feature_norms, parts)]
        return self.fuse(op.concat(normed + [parts[-1]], dim=-1), row_block)

    def _step(self, embeds: Tensor, features: Tensor, kv: PagedKVCache, row_block: int) -> Tensor:
        """The draft's features (after its final norm) at every row."""
        n, h = embeds.shape[0], self.c.hidden_size
        x = self.fc(op.concat([embeds, features], dim=-1), row_block)
        return op.reshape(self.model(op.reshape(x, (1, n, h)), kv, row_block), (n, h))

    def prefill(self, embeds: Tensor, features: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        features = self._fused(features, VERIFY_ROW_BLOCK)
        g = op.take(self._step(embeds, features, paged_kv_cache, VERIFY_ROW_BLOCK), logit_positions, axis=0)
        return self._logits(g), g, paged_kv_cache

    def batch_decode(self, embeds: Tensor, features: Tensor, paged_kv_cache: PagedKVCache):
        g = self._step(embeds, features, paged_kv_cache, 1)
        return self._logits(g), g, paged_kv_cache

    def prefill_own(self, embeds: Tensor, features: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        """Rows fed the draft's own features (a token tree's nodes, each its parent's), logits at any rows."""
        g = op.take(self._step(embeds, features, paged_kv_cache, VERIFY_ROW_BLOCK), logit_positions, axis=0)
        return self._logits(g), g, paged_kv_cache

    def batch_decode_target(self, embeds: Tensor, features: Tensor, paged_kv_cache: PagedKVCache):
        return self.batch_decode(embeds, self._fused(features, 1), paged_kv_cache)

    @property
    def verify_row_blocks(self) -> list[int]:
        return []

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        packed = {"param_mode": "packed", "effect_mode": "none"}
        plain = {"param_mode": "none", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        h = self.c.hidden_size
        rows, batch = nn.spec.Tensor(["seq_len", h], self.dtype), nn.spec.Tensor(["batch_size", h], self.dtype)
        width = self.feature_width
        target_rows, target_batch = (nn.spec.Tensor([n, width], self.dtype) for n in ("seq_len", "batch_size"))
        spec = {
            "prefill": {"embeds": rows, "features": target_rows, "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                        "paged_kv_cache": kv, "$": packed},
            "batch_decode": {"embeds": batch, "features": batch, "paged_kv_cache": kv, "$": packed},
            "prefill_own": {"embeds": rows, "features": rows, "logit_positions": nn.spec.Tensor(["n_logits"], "int32"),
                            "paged_kv_cache": kv, "$": packed},
            "batch_decode_target": {"embeds": batch, "features": target_batch, "paged_kv_cache": kv, "$": packed},
            "create_paged_kv_cache": {**KV_CACHE_SPEC, "$": plain},
            **self._kernel_spec(plain),
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)
