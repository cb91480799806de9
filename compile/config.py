"""The model configuration the compiler needs, read from a Hugging Face config.json dict."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class CompileError(ValueError):
    """A problem with the user's input, reported as one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise CompileError(
                f"{where}: unsupported architecture {archs or hf.get('model_type')!r}; "
                f"mlc_spec compiles {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("mlp_bias"):
            raise CompileError(f"{where}: MLP biases (mlp_bias) are not supported")
        # transformers 5 writes rope_theta and the scaling into one rope_parameters dict.
        rope = hf.get("rope_parameters") or {}
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=_rope_scaling(hf.get("rope_scaling") or rope, where),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias; Llama and Mistral only when attention_bias says so.
                attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            )
        except KeyError as err:
            raise CompileError(f"{where}: missing field {err.args[0]!r}; is this a {arch} config?") from None

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CompileError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise CompileError(f"head_dim {self.head_dim} is odd; rotary embedding needs an even head_dim")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_scaling(scaling: dict | None, where: str) -> dict | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise CompileError(f"{where}: rope_scaling type {kind!r} is not supported; mlc_spec supports llama3 scaling")
    return {
        "rope_type": "llama3",
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling["low_freq_factor"]),
        "high_freq_factor": float(scaling["high_freq_factor"]),
        "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
    }
