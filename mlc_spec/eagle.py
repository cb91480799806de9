"""The EAGLE-style feature draft in torch (training only; the runtime runs the compiled one).

The draft predicts the target's next feature, the target's last hidden state after its final norm (the
row its output head reads). At sequence position p its input is fc(concat(embed(t_p), f_{p-1})), the
token there and the feature of the position before (with feature_layers, EAGLE-3's fusion: f_{p-1} is
fuse(concat(norm_i(h_i), ..., f)) over the outputs h_i of those target layers too, which see more than
the next token), through one Llama decoder layer with its own
attention over the draft's earlier positions (or a few such layers), then its own final norm: g_p ~ f_p,
and head(g_p) gives the distribution of t_{p+1}. The head is the target's output head restricted to the
`vocab` most frequent tokens (FR-Spec): rows of the target's (tied) embedding, shared, never stored in
the draft. Chained drafting feeds the draft its own g in place of f; `DraftNet.unroll` computes k such
chained steps for every start position at once (EAGLE-3's training-time test), so training and the
held-out acceptance see exactly what inference does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, positions, theta: float):
    """Hugging Face Llama's rotary embedding (rotate_half) on [..., seq, heads, head_dim]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + half * sin


class Layer(nn.Module):
    """One Llama decoder layer, Hugging Face parameter names; attention over given keys and values."""

    def __init__(self, c: dict):
        super().__init__()
        h, self.heads, self.kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim, self.theta = c["head_dim"], c["rope_theta"]
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.self_attn = nn.Module()
        for name, out in (("q_proj", self.heads), ("k_proj", self.kv_heads), ("v_proj", self.kv_heads)):
            setattr(self.self_attn, name, nn.Linear(h, out * self.head_dim, bias=False))
        self.self_attn.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.mlp.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.mlp.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)

    def qkv(self, x):
        """Queries, keys, values of [batch, seq, hidden] with rotary positions 0..seq-1."""
        b, s, _ = x.shape
        a, pos = self.self_attn, torch.arange(s)
        hn = self.input_layernorm(x)
        q = rope(a.q_proj(hn).view(b, s, self.heads, self.head_dim), pos, self.theta)
        k = rope(a.k_proj(hn).view(b, s, self.kv_heads, self.head_dim), pos, self.theta)
        v = a.v_proj(hn).view(b, s, self.kv_heads, self.head_dim)
        rep = self.heads // self.kv_heads
        return q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)

    def finish(self, x, attn):
        """The residual, output projection and MLP after attention's [batch, seq, heads, head_dim]."""
        b, s = x.shape[:2]
        x = x + self.self_attn.o_proj(attn.reshape(b, s, -1))
        m, hn = self.mlp, self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(hn)) * m.up_proj(hn))


def target_config(config: dict) -> dict:
    """The fields the layers need, from a Hugging Face config dict."""
    heads = config["num_attention_heads"]
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return {"hidden_size": config["hidden_size"], "num_attention_heads": heads,
            "num_key_value_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
            "intermediate_size": config["intermediate_size"], "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": float(rope_theta), "num_hidden_layers": config["num_hidden_layers"]}


class DraftNet(nn.Module):
    """fc -> decoder layers (one by default) -> norm; the head (target rows of `token_ids`) is a frozen
    buffer."""

    def __init__(self, config: dict, embed: torch.Tensor, token_ids: torch.Tensor, head: torch.Tensor,
                 layers: int = 1, feature_layers: tuple[int, ...] = ()):
        """embed, head: the target's token embedding and output head (the same matrix when tied).
        feature_layers: the target layers whose outputs the target features hold before the last one."""
        super().__init__()
        c = target_config(config)
        h = c["hidden_size"]
        self.feature_layers = tuple(feature_layers)
        if self.feature_layers:
            self.feature_norms = nn.ModuleList(RMSNorm(h, c["rms_norm_eps"]) for _ in self.feature_layers)
            self.fuse = nn.Linear((len(self.feature_layers) + 1) * h, h, bias=False)
            with torch.no_grad():  # starts as the last feature alone: a one-feature draft's behaviour
                self.fuse.weight.zero_()
                self.fuse.weight[:, -h:].copy_(torch.eye(h))
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(Layer(c) for _ in range(layers))
        self.norm = RMSNorm(h, c["rms_norm_eps"])
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("token_ids", token_ids)
        self.register_buffer("head", head[token_ids].clone(), persistent=False)

    def logits(self, g):
        return g @ self.head.T

    def target_feature(self, feats: torch.Tensor) -> torch.Tensor:
        """The target's features [..., (len(feature_layers) + 1) * h] as the draft reads them, [..., h]."""
        if not self.feature_layers:
            return feats
        parts = feats.chunk(len(self.feature_layers) + 1, -1)
        return self.fuse(torch.cat([norm(x) for norm, x in zip(self.feature_norms, parts)] + [parts[-1]], -1))

    def unroll(self, ids: torch.Tensor, feats: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Chained drafting from every start at once. ids [b, s] tokens, feats [b, s, width] the target's
        features. Returns g_1..g_steps, each [b, s-1, h]: g_r[:, p-1] is the draft's feature at sequence
        position p in a chain whose first step ran at position p-r+1 (the positions before it read the
        target's true features, as the runtime's draft cache does; the later ones its own g)."""
        emb = self.embed[ids[:, 1:]]  # tokens at positions 1..s-1
        prev = self.target_feature(feats[:, :-1])  # step 1 reads f_{p-1}
        keys, values, outs = [[] for _ in self.layers], [[] for _ in self.layers], []
        for r in range(1, steps + 1):
            x = self.fc(torch.cat([emb, prev], -1))
            for layer, layer_keys, layer_values in zip(self.layers, keys, values):
                q, k, v = layer.qkv(x)
                layer_keys.append(k)
                layer_values.append(v)
                x = layer.finish(x, _chained_attention(q, layer_keys, layer_values))
            g = self.norm(x)
            outs.append(g)
            prev = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1)  # g at p-1 feeds position p
        return outs


def _chained_attention(q, keys, values):
    """Step s = len(keys): the query at p attends to step 1's keys at j <= p-s+1 (true features) and to
    step r's key at p-(s-r) for r = 2..s (the chain's own earlier positions). Shapes [b, s, heads, d]."""
    s = len(keys)
    n = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    base = torch.einsum("bphd,bjhd->bhpj", q, keys[0]) * scale
    pos = torch.arange(n)
    base = base.masked_fill(pos[None, :] > pos[:, None] - (s - 1), float("-inf"))
    shifted_v, diag = [], []
    for r in range(2, s + 1):
        shift = s - r
        k = F.pad(keys[r - 1], (0, 0, 0, 0, shift, 0))[:, :n]
        v = F.pad(values[r - 1], (0, 0, 0, 0, shift, 0))[:, :n]
        score = (q * k).sum(-1).transpose(1, 2) * scale  # [b, h, p]
        diag.append(score.masked_fill(pos < shift, float("-inf"))[..., None])
        shifted_v.append(v)
    scores = torch.cat([base] + diag, -1)
    # a query with no visible key at all (p < s-1: no chain of that length starts there) reads zeros
    weights = torch.nan_to_num(torch.softmax(scores, -1))
    out = torch.einsum("bhpj,bjhd->bphd", weights[..., :n], values[0])
    for i, v in enumerate(shifted_v):
        out = out + weights[..., n + i].transpose(1, 2)[..., None] * v
    return out
