"""Reading a checkpoint (a Hugging Face folder or a GGUF file) and converting its weights to the
parameters of model.py."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read BF16 weights)
import numpy as np
from safetensors import SafetensorError, safe_open

from .config import CompileError, ModelConfig
from .quantization import FORMATS, Quantized, check_groups, concat_rows, format_runs, pack, quantize, tile_rows


@dataclasses.dataclass
class Checkpoint:
    source: str
    hf_config: dict
    tensors: Mapping[str, np.ndarray]
    tokenizer_json: str
    tokenizer_config: dict
    blocks: Mapping[str, Quantized] = dataclasses.field(default_factory=dict)  # a GGUF's kept blocks

    @property
    def config(self) -> ModelConfig:
        cfg = ModelConfig.from_hf(self.hf_config, where=self.source)
        cfg.validate()
        return cfg


# An untied model's input embedding: gathered a row per token, never read whole by a decode.
GATHERED_EMBEDDING = "model.embed_tokens"

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
    return Checkpoint(str(path), ck.config, ck.tensors, ck.tokenizer_json, ck.tokenizer_config, ck.blocks)


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


# The quantization choices: "keep" keeps a GGUF file's blocks (quantization.KEPT) and expands the rest
# to the dtype; "none" expands everything; a format quantizes every linear (and a tied head) to it.
QUANTIZATIONS = ("keep", "none", *FORMATS)


def convert_weights(cfg: ModelConfig, ck: Checkpoint, dtype: str, output_vocab_size: int,
                    tile: int | None = None, quantization: str = "none") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Hugging Face tensors -> model.py parameters and the quantization format of each quantized
    linear (by parameter prefix): q/k/v and gate/up fused, float linears [in, out] or, with a tile,
    packed [ceil(out / tile), in, tile] (model.Linear); quantized ones packed by quantization.pack. A
    fused linear whose parts the file keeps in different formats gets one format per part and its
    runs of parts in one format packed as `runs.<i>` (model.SplitLinear).

    output_vocab_size below the checkpoint's vocabulary drops the padding rows of the output head
    (a draft aligned to its target's vocabulary)."""
    _check_layer_count(cfg, ck)
    get = _getter(ck.tensors)
    out: dict[str, np.ndarray] = {}
    linears: dict[str, list[str]] = {}
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"model.layers.{i}."
        linears[ours + "self_attn.qkv_proj"] = [f"{hf}self_attn.{p}_proj.weight" for p in "qkv"]
        if cfg.attention_bias:
            out[ours + "self_attn.qkv_proj.bias"] = np.concatenate([get(f"{hf}self_attn.{p}_proj.bias") for p in "qkv"])
        linears[ours + "self_attn.o_proj"] = [hf + "self_attn.o_proj.weight"]
        linears[ours + "mlp.gate_up_proj"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        linears[ours + "mlp.down_proj"] = [hf + "mlp.down_proj.weight"]
        out[ours + "input_layernorm.weight"] = get(hf + "input_layernorm.weight")
        out[ours + "post_attention_layernorm.weight"] = get(hf + "post_attention_layernorm.weight")
    out["model.norm.weight"] = get("model.norm.weight")
    if "fc.weight" in ck.tensors:  # an eagle draft's input projection and feature fusion (eagle.py)
        linears["fc"] = ["fc.weight"]
        if "fuse.weight" in ck.tensors:
            linears["fuse"] = ["fuse.weight"]
        out.update({name: get(name) for name in ck.tensors if name.startswith("feature_norms.")})
    embed = "model.embed_tokens.weight"
    linears["lm_head"] = [embed if cfg.tie_word_embeddings else "lm_head.weight"]
    if not cfg.tie_word_embeddings:
        out[GATHERED_EMBEDDING] = get(embed)
    out = {name: w.astype(dtype) for name, w in out.items()}
    formats = {}
    for name, sources in linears.items():
        weight = _linear_weight(sources, ck, quantization, get, name)
        if name == "lm_head":
            weight = weight.map_rows(lambda a: a[:output_vocab_size]) if isinstance(weight, Quantized) else weight[:output_vocab_size]
        if isinstance(weight, list):
            formats[name] = [part.format for part in weight]
            for i, (_, indices) in enumerate(format_runs(formats[name])):
                run = concat_rows([weight[k] for k in indices])
                out.update({f"{name}.runs.{i}.{part}": a for part, a in pack(run).items()})
        elif isinstance(weight, Quantized):
            formats[name] = weight.format
            out.update({f"{name}.{part}": a for part, a in pack(weight).items()})
        else:
            out[f"{name}.weight"] = (tile_rows(weight, tile) if tile is not None else weight.T).astype(dtype)
    return {name: np.ascontiguousarray(w) for name, w in out.items()}, formats


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _check_layer_count(cfg: ModelConfig, ck: Checkpoint) -> None:
    """Layers beyond num_hidden_layers would never be read: a model silently missing its last layers."""
    layers = {int(m.group(1)) for name in ck.tensors if (m := _LAYER.match(name))}
    if layers and max(layers) >= cfg.num_hidden_layers:
        raise CompileError(f"{ck.source}: config.json says num_hidden_layers {cfg.num_hidden_layers} but the weights "
                           f"hold layers 0..{max(layers)}; set num_hidden_layers to {max(layers) + 1}")


def _linear_weight(sources: list[str], ck: Checkpoint, quantization: str, get,
                   name: str) -> np.ndarray | Quantized | list[Quantized]:
    """One linear's weight [out, in]: the file's blocks where kept (its parts', when their formats
    differ), else float, quantized if asked."""
    if quantization != "none" and all(s in ck.blocks for s in sources):
        parts = [ck.blocks[s] for s in sources]
        if quantization == "keep" or all(part.format == quantization for part in parts):
            return concat_rows(parts) if len({part.format for part in parts}) == 1 else parts
    weight = np.concatenate([get(s) for s in sources])
    if quantization in FORMATS:
        check_groups(weight.shape[1], quantization, name)
        return quantize(weight, quantization)
    return weight


def _getter(tensors: Mapping[str, np.ndarray]):
    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CompileError(f"weights lack {name}; the checkpoint is incomplete or not a Llama-family model")
        return np.asarray(tensors[name]).astype(np.float32)

    return get
