"""The model configuration the compiler needs, read from a Hugging Face config.json dict."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..runtime import options as check

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
        if not isinstance(hf, dict):
            raise CompileError(f"{where}: config.json holds a JSON {type(hf).__name__}, not an object; "
                               "give the model's Hugging Face config.json")
        archs = hf.get("architectures") or []
        archs = [archs] if isinstance(archs, str) else archs  # hand-written configs give one as a string
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CompileError(f"{where}: architectures must be a list of class names, got {archs!r}")
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
        field = _Fields(hf, where, arch)
        heads = field.integer("num_attention_heads")
        hidden = field.integer("hidden_size")
        return cls(
            architecture=arch,
            vocab_size=field.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=field.integer("intermediate_size"),
            num_hidden_layers=field.integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=field.integer("num_key_value_heads", heads),
            head_dim=field.integer("head_dim", hidden // heads),
            rms_norm_eps=field.real("rms_norm_eps", 1e-6),
            rope_theta=field.real("rope_theta", rope.get("rope_theta") or 10000.0),
            rope_scaling=_rope_scaling(hf.get("rope_scaling") or rope, where),
            tie_word_embeddings=field.flag("tie_word_embeddings", False),
            # Qwen2 always has q/k/v bias; Llama and Mistral only when attention_bias says so.
            attention_bias=arch == "Qwen2ForCausalLM" or field.flag("attention_bias", False),
            max_position_embeddings=field.integer("max_position_embeddings", 4096),
            bos_token_id=next(iter(field.token_ids("bos_token_id")), None),
            eos_token_ids=field.token_ids("eos_token_id"),
        )

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


class _Fields:
    """config.json's fields read with their types checked: a wrong one is a CompileError naming it,
    never a silent int() of a float or a bool, nor a traceback."""

    def __init__(self, hf: dict[str, Any], where: str, arch: str):
        self.hf, self.where, self.arch = hf, where, arch

    def integer(self, key: str, default: int | None = None) -> int:
        return self._checked(key, default, lambda v: check.integer(key, v, 1))

    def real(self, key: str, default: float) -> float:
        return self._checked(key, default, lambda v: check.real(key, v, 0.0))

    def flag(self, key: str, default: bool) -> bool:
        return self._checked(key, default, lambda v: check.flag(key, v))

    def token_ids(self, key: str) -> tuple[int, ...]:
        """One token id or a list of them (eos_token_id is either); none when absent."""
        def ids(value):
            values = value if isinstance(value, list) else [value]
            return tuple(check.integer(key, v, 0) for v in values)
        return self._checked(key, (), ids)

    def _checked(self, key: str, default, read):
        value = self.hf.get(key)
        if value is None:
            if default is None:
                raise CompileError(f"{self.where}: missing field {key!r}; is this a {self.arch} config?")
            return default
        try:
            return read(value)
        except ValueError as err:
            raise CompileError(f"{self.where}: {err}; fix it in config.json") from None


def _rope_scaling(scaling, where: str) -> dict | None:
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise CompileError(f"{where}: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise CompileError(f"{where}: rope_scaling type {kind!r} is not supported; mlc_spec supports llama3 scaling")
    try:
        return {
            "rope_type": "llama3",
            "factor": check.real("factor", scaling["factor"], 0.0),
            "low_freq_factor": check.real("low_freq_factor", scaling["low_freq_factor"], 0.0),
            "high_freq_factor": check.real("high_freq_factor", scaling["high_freq_factor"], 0.0),
            "original_max_position_embeddings": check.integer("original_max_position_embeddings",
                                                              scaling["original_max_position_embeddings"], 1),
        }
    except KeyError as err:
        raise CompileError(f"{where}: rope_scaling lacks {err.args[0]!r}, which llama3 scaling needs") from None
    except ValueError as err:
        raise CompileError(f"{where}: rope_scaling's {err}; fix it in config.json") from None
