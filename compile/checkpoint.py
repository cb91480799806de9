"""Reading a checkpoint (a Hugging Face folder or a GGUF file) and converting its weights to the
parameters of model.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read BF16 weights)
import numpy as np
from safetensors import SafetensorError, safe_open

from .config import CompileError, ModelConfig


@dataclasses.dataclass
class Checkpoint:
    source: str
    hf_config: dict
    tensors: Mapping[str, np.ndarray]
    tokenizer_json: str
    tokenizer_config: dict

    @property
    def config(self) -> ModelConfig:
        cfg = ModelConfig.from_hf(self.hf_config, where=self.source)
        cfg.validate()
        return cfg


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CompileError(f"{path}: no such file or folder; give a Hugging Face model folder or a .gguf file")
    if path.is_file():
        return _load_gguf(path)
    return _load_hf_folder(path)


def _load_gguf(path: Path) -> Checkpoint:
    from .gguf_reader import GGUFError, read_gguf

    try:
        ck = read_gguf(path)
    except GGUFError as err:
        raise CompileError(str(err)) from None
    return Checkpoint(str(path), ck.config, ck.tensors, ck.tokenizer_json, ck.tokenizer_config)


def _load_hf_folder(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CompileError(f"{path}: no config.json; give a Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CompileError(f"{path}: no tokenizer.json; save the tokenizer with tokenizer.save_pretrained() into the folder")
    hf_config = _read_json(config_file)
    tokenizer_config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    return Checkpoint(str(path), hf_config, SafetensorsTensors(path), tokenizer_file.read_text(), tokenizer_config)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


class SafetensorsTensors(Mapping):
    """Tensors of a folder's *.safetensors files (sharded with an index or not), read lazily."""

    def __init__(self, folder: Path):
        self._files = sorted(folder.glob("*.safetensors"))
        if not self._files:
            raise CompileError(f"{folder}: no *.safetensors weights; save the model with safe_serialization=True")
        self._where: dict[str, Path] = {}
        for file in self._files:
            for name in self._open(file).keys():
                self._where[name] = file

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="numpy")
        except (SafetensorError, OSError) as err:
            raise CompileError(f"{file}: unreadable safetensors file ({err}); re-download or re-save the weights") from None

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._open(self._where[name]).get_tensor(name)
        except SafetensorError as err:
            raise CompileError(f"{self._where[name]}: corrupt tensor {name} ({err}); re-download the weights") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def convert_weights(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], dtype: str,
                    output_vocab_size: int, tile: int | None = None) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> model.py parameters: q/k/v and gate/up fused, linears [in, out] or,
    with a tile, packed [ceil(out / tile), in, tile] (model.Linear).

    output_vocab_size below the checkpoint's vocabulary drops the padding rows of the output head
    (a draft aligned to its target's vocabulary)."""
    get = _getter(tensors)
    out: dict[str, np.ndarray] = {}
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"model.layers.{i}."
        attn = [get(f"{hf}self_attn.{p}_proj.weight") for p in "qkv"]
        out[ours + "self_attn.qkv_proj.weight"] = np.concatenate(attn, axis=0).T
        if cfg.attention_bias:
            out[ours + "self_attn.qkv_proj.bias"] = np.concatenate([get(f"{hf}self_attn.{p}_proj.bias") for p in "qkv"])
        out[ours + "self_attn.o_proj.weight"] = get(hf + "self_attn.o_proj.weight").T
        out[ours + "mlp.gate_up_proj.weight"] = np.concatenate(
            [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")], axis=0).T
        out[ours + "mlp.down_proj.weight"] = get(hf + "mlp.down_proj.weight").T
        out[ours + "input_layernorm.weight"] = get(hf + "input_layernorm.weight")
        out[ours + "post_attention_layernorm.weight"] = get(hf + "post_attention_layernorm.weight")
    out["model.norm.weight"] = get("model.norm.weight")
    embed = get("model.embed_tokens.weight")
    head = embed if cfg.tie_word_embeddings else get("lm_head.weight")
    if not cfg.tie_word_embeddings:
        out["model.embed_tokens"] = embed
    out["lm_head.weight"] = head[:output_vocab_size].T
    if tile is not None:
        out = {name: _pack(w, tile) if _is_linear(name) else w for name, w in out.items()}
    return {name: np.ascontiguousarray(w.astype(dtype)) for name, w in out.items()}


def _is_linear(name: str) -> bool:
    return name.endswith("proj.weight") or name == "lm_head.weight"


def _pack(weight: np.ndarray, tile: int) -> np.ndarray:
    """[in, out] -> [ceil(out / tile), in, tile], zero-padded."""
    k, n = weight.shape
    tiles = -(-n // tile)
    padded = np.zeros((k, tiles * tile), weight.dtype)
    padded[:, :n] = weight
    return padded.reshape(k, tiles, tile).transpose(1, 0, 2)


def _getter(tensors: Mapping[str, np.ndarray]):
    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CompileError(f"weights lack {name}; the checkpoint is incomplete or not a Llama-family model")
        return np.asarray(tensors[name]).astype(np.float32)

    return get
