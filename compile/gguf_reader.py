"""Read a llama.cpp GGUF file of a Llama-family model into what a Hugging Face folder holds.

A GGUF carries the same model as a Hugging Face checkpoint, written differently:

* tensors have llama.cpp names (``blk.0.attn_q.weight``), shapes listed fastest dimension first,
  and are often quantized in blocks;
* llama.cpp's converter permuted the rows of a Llama model's ``q_proj``/``k_proj`` to suit its
  rotary kernel (Qwen2 files are written unpermuted);
* there is no ``config.json``: the hyperparameters are metadata keys under ``{arch}.``;
* there is no ``tokenizer.json``: the vocabulary, merges or scores and the special-token ids are
  metadata keys under ``tokenizer.ggml.``.

`read_gguf` undoes all of that and returns a `GGUFCheckpoint` whose config, float32 tensors and
tokenizer can be handled exactly like those of a Hugging Face folder. Dequantization is done by the
``gguf`` package itself; the tokenizer is rebuilt with the ``tokenizers`` library alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .quantization import KEPT, Quantized, from_gguf_blocks

__all__ = ["GGUFCheckpoint", "GGUFError", "read_gguf", "permute_qk_for_gguf"]


class GGUFError(ValueError):
    """A GGUF file this reader cannot turn into a Hugging Face checkpoint; the message says why."""


@dataclasses.dataclass
class GGUFCheckpoint:
    config: dict  # as a Hugging Face config.json would hold it
    tensors: dict[str, np.ndarray]  # Hugging Face names and shapes, float32
    tokenizer_json: str  # a `tokenizers.Tokenizer` serialized to JSON
    tokenizer_config: dict  # bos_token, eos_token, chat_template, add_bos_token, ...
    source_types: dict[str, str]  # Hugging Face tensor name -> GGUF storage type (F32, Q4_K, ...)
    blocks: dict[str, Quantized]  # the Q4_0/Q4_1/Q8_0 matrices again, as their blocks (bit for bit)


# general.architecture -> (Hugging Face architecture class, model_type). Mistral GGUFs say "llama".
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

# Only llama.cpp's Llama converter permutes q/k rows; its Qwen2 converter writes them as they are.
_PERMUTED_QK_ARCHITECTURES = {"llama"}

TOP_LEVEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

LAYER_TENSORS = {  # a layer's GGUF tensor -> its Hugging Face module
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED_LAYER_WEIGHTS = tuple(LAYER_TENSORS)

# llama.cpp stores Llama 3 rope scaling as per-frequency factors in this tensor, not as metadata.
_ROPE_FREQS_TENSOR = "rope_freqs.weight"
# Older converters wrote precomputed rotary tables; they carry nothing the config does not.
_IGNORED_LAYER_TENSORS = {"attn_rot_embd"}

_TOKEN_TYPE_UNKNOWN = int(gguf.TokenType.UNKNOWN)
_TOKEN_TYPE_CONTROL = int(gguf.TokenType.CONTROL)
_TOKEN_TYPE_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# Split patterns of the byte-level vocabularies, keyed by tokenizer.ggml.pre. These are the
# patterns of the models' own tokenizer.json files, which llama.cpp's pre-tokenizers reproduce.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
_DIGIT_SPLITTING_GPT2_PRE = {"smollm", "starcoder", "refact"}  # one digit per token, then GPT-2's rules
_GPT4O_PRE = {"gpt-4o", "llama4"}
_TEKKEN_PRE = {"tekken"}
# llama.cpp looks the whole word up before merging for these (tokenizer.json's "ignore_merges").
_IGNORE_MERGES_PRE = _LLAMA3_PRE | _TEKKEN_PRE | _GPT4O_PRE
# llama.cpp's default for tokenizer.ggml.add_bos_token when a byte-level file does not say.
_ADD_BOS_BY_DEFAULT_PRE = _LLAMA3_PRE | _TEKKEN_PRE


def read_gguf(path) -> GGUFCheckpoint:
    """Read a llama/qwen2 GGUF file into Hugging Face config, tensors and tokenizer."""
    reader = _open(path)
    metadata = _metadata(reader)
    architecture = _architecture(metadata)
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    _check_tensor_types(gguf_tensors)

    config = _config(metadata, architecture, gguf_tensors)
    rope_freqs = gguf_tensors.get(_ROPE_FREQS_TENSOR)
    if config["rope_scaling"] is None and rope_freqs is not None:
        original_context = metadata.get(f"{architecture}.rope.scaling.original_context_length")
        config["rope_scaling"] = _llama3_rope_scaling(_dequantize(rope_freqs), config, original_context)

    tensors, source_types, blocks = _hf_tensors(gguf_tensors, config, architecture)
    tokenizer, tokenizer_config = _tokenizer(metadata)
    return GGUFCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer_json=tokenizer.to_str(),
        tokenizer_config=tokenizer_config,
        source_types=source_types,
        blocks=blocks,
    )


def permute_qk_for_gguf(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's own q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute).

    The inverse of what `read_gguf` undoes; pass num_attention_heads for q_proj and
    num_key_value_heads for k_proj. Exposed so tests can write GGUFs the way llama.cpp does.
    """
    head_halves = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return head_halves.swapaxes(1, 2).reshape(weights.shape)


# --- the file and its metadata ---------------------------------------------------------------


def _open(path) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file; pass the path of a .gguf model file")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, IndexError, struct.error... on bad bytes
        raise GGUFError(
            f"{path} is not a readable GGUF file ({error}); check it is a complete, uncorrupted .gguf download"
        ) from error


def _metadata(reader: gguf.GGUFReader) -> dict:
    return {name: _field_value(field) for name, field in reader.fields.items()}


def _field_value(field):
    value = field.contents()
    # float32 metadata read back as a double shows as 9.999999747378752e-06; the shortest decimal
    # that rounds to the same float32 is what the Hugging Face config held (1e-05).
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return _shortest_float32(value)
    return value


def _shortest_float32(value: float) -> float:
    return float(str(np.float32(value)))


def _architecture(metadata: dict) -> str:
    architecture = metadata.get("general.architecture")
    if architecture not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise GGUFError(
            f"GGUF architecture {architecture!r} is not supported (supported: {supported}, which covers "
            "Llama, Mistral, SmolLM and Qwen2); use a GGUF of one of those or the Hugging Face checkpoint"
        )
    return architecture


def _check_tensor_types(gguf_tensors: dict) -> None:
    """Fail before dequantizing anything if some tensor is in a type the gguf package cannot read."""
    for qtype in {tensor.tensor_type for tensor in gguf_tensors.values()}:
        if not _can_dequantize(qtype):
            name = next(name for name, tensor in gguf_tensors.items() if tensor.tensor_type == qtype)
            raise GGUFError(
                f"tensor {name!r} is stored as {qtype.name}, which the gguf package cannot dequantize; "
                "use a GGUF in F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or a K-quant"
            )


def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    # Dequantizing one zero block asks gguf itself, instead of keeping a list that goes stale.
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


# --- config ----------------------------------------------------------------------------------


def _config(metadata: dict, architecture: str, gguf_tensors: dict) -> dict:
    def hparam(name, default=None):
        value = metadata.get(f"{architecture}.{name}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {architecture}.{name}; the file is incomplete, re-convert it")
        return value

    hf_architecture, model_type = _ARCHITECTURES[architecture]
    num_heads = int(hparam("attention.head_count"))
    embedding = _required_tensor(gguf_tensors, "token_embd.weight")
    q_proj = _required_tensor(gguf_tensors, "blk.0.attn_q.weight")
    ffn_up = _required_tensor(gguf_tensors, "blk.0.ffn_up.weight")
    # Shapes are listed fastest dimension first: shape[-1] is the Hugging Face out_features.
    vocab_size, hidden_size = int(embedding.shape[-1]), int(embedding.shape[0])
    config = {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": int(hparam("embedding_length", hidden_size)),
        "intermediate_size": int(hparam("feed_forward_length", int(ffn_up.shape[-1]))),
        "num_hidden_layers": int(hparam("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(hparam("attention.head_count_kv", num_heads)),
        "head_dim": int(q_proj.shape[-1]) // num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(hparam("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(hparam("rope.freq_base", 10000.0)),  # llama.cpp's default when absent
        "rope_scaling": _rope_scaling_from_metadata(metadata, architecture),
        "max_position_embeddings": int(hparam("context_length")),
        "tie_word_embeddings": "output.weight" not in gguf_tensors,
        "bos_token_id": _optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _optional_int(metadata.get("tokenizer.ggml.eos_token_id")),
        "torch_dtype": _torch_dtype(gguf_tensors),
    }
    if architecture == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in gguf_tensors
    return config


def _required_tensor(gguf_tensors: dict, name: str):
    if name not in gguf_tensors:
        raise GGUFError(f"GGUF file has no {name!r} tensor; it is incomplete or not a plain llama/qwen2 model")
    return gguf_tensors[name]


def _optional_int(value):
    return None if value is None else int(value)


def _torch_dtype(gguf_tensors: dict) -> str:
    """The float type to compute in: the file's half type, float16 for quantized files."""
    types = {tensor.tensor_type for tensor in gguf_tensors.values()}
    if gguf.GGMLQuantizationType.BF16 in types:
        return "bfloat16"
    if types <= {gguf.GGMLQuantizationType.F32}:
        return "float32"
    # F16 weights, or quantized ones (which llama.cpp also multiplies in half precision)
    return "float16"


def _rope_scaling_from_metadata(metadata: dict, architecture: str):
    kind = metadata.get(f"{architecture}.rope.scaling.type")
    factor = metadata.get(f"{architecture}.rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = metadata.get(f"{architecture}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise GGUFError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear, yarn, llama3)")


def _llama3_rope_scaling(factors: np.ndarray, config: dict, original_context):
    """Recover Hugging Face's llama3 rope_scaling from llama.cpp's per-frequency factors.

    convert_hf_to_gguf.py turns (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) into one factor per rotary frequency: 1 for short
    wavelengths, `factor` for long ones, and between them 1 / ((1 - s) / factor + s) with
    s = (original / wavelength - low) / (high - low). Inside that band s is linear in 1/wavelength,
    so a line through the band recovers original / (high - low) and low / (high - low): with
    low_freq_factor = 1 (every Llama 3.x release), or original_context from the metadata, the rest
    follows. Other parameter sets with the same band give the very same factors, so the choice does
    not change the model. The result is checked by recomputing the factors from it.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    wavelengths = _rotary_wavelengths(config["rope_theta"], config["head_dim"])
    if factors.shape != wavelengths.shape:
        raise GGUFError(
            f"GGUF rope_freqs tensor has {factors.size} factors but head_dim {config['head_dim']} needs "
            f"{wavelengths.size}; the file is inconsistent, re-convert it"
        )
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    for candidate in _llama3_candidates(factors, wavelengths, factor, original_context):
        if np.allclose(_llama3_factors(candidate, wavelengths), factors, rtol=1e-4, atol=1e-6):
            return candidate
    raise GGUFError(
        "GGUF rope_freqs tensor does not match llama3-style rope scaling; this reader cannot express it "
        "as a Hugging Face rope_scaling, use the Hugging Face checkpoint"
    )


def _rotary_wavelengths(rope_theta: float, head_dim: int) -> np.ndarray:
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return 2 * math.pi / inv_freq


def _llama3_candidates(factors, wavelengths, factor, original_hint):
    """Parameter sets that may have produced `factors`: fitted from the band, then Meta's defaults."""
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)  # s from factor = 1 / ((1 - s) / f + s)
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelengths[band], smooth[band], 1)
        fitted = _llama3_from_line(slope, intercept, factor, original_hint)
        if fitted is not None:
            yield fitted
    yield _llama3_dict(factor, 1.0, 4.0, int(original_hint or 8192))


def _llama3_from_line(slope, intercept, factor, original_hint):
    # slope = original / (high - low), intercept = -low / (high - low)
    if slope <= 0 or intercept >= 0:
        return None
    if original_hint:
        width = original_hint / slope
        low, original = -intercept * width, original_hint
    else:
        low = 1.0
        width = -1.0 / intercept
        original = slope * width
    return _llama3_dict(factor, low, low + width, int(round(original)))


def _llama3_dict(factor, low, high, original) -> dict:
    return {
        "rope_type": "llama3",
        "factor": _shortest_float32(factor),
        "low_freq_factor": float(f"{low:.6g}"),
        "high_freq_factor": float(f"{high:.6g}"),
        "original_max_position_embeddings": int(original),
    }


def _llama3_factors(scaling: dict, wavelengths: np.ndarray) -> np.ndarray:
    """The factors convert_hf_to_gguf.py writes for these parameters."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelengths - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelengths < original / high, 1.0, factors)
    return np.where(wavelengths > original / low, factor, factors)


# --- tensors ---------------------------------------------------------------------------------


def _hf_tensors(gguf_tensors: dict, config: dict, architecture: str):
    tensors, source_types, blocks = {}, {}, {}
    for gguf_name, tensor in gguf_tensors.items():
        hf_name = _hf_tensor_name(gguf_name)
        if hf_name is None:
            continue
        unpermute = (lambda w: _unpermute_if_qk(w, gguf_name, config)) if architecture in _PERMUTED_QK_ARCHITECTURES \
            else (lambda w: w)
        tensors[hf_name] = unpermute(_dequantize(tensor))
        source_types[hf_name] = tensor.tensor_type.name
        if source_types[hf_name].lower() in KEPT and tensors[hf_name].ndim == 2:
            blocks[hf_name] = from_gguf_blocks(tensor.data, source_types[hf_name], tensors[hf_name].shape).map_rows(unpermute)
    _check_complete(tensors, config)
    return tensors, source_types, blocks


def _hf_tensor_name(gguf_name: str):
    """The Hugging Face name of a GGUF tensor; None for tensors with no Hugging Face counterpart."""
    if gguf_name in TOP_LEVEL_TENSORS:
        return TOP_LEVEL_TENSORS[gguf_name]
    if gguf_name == _ROPE_FREQS_TENSOR:
        return None  # folded into config["rope_scaling"]
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _IGNORED_LAYER_TENSORS:
        return None
    if not match or match.group(2) not in LAYER_TENSORS:
        raise GGUFError(
            f"GGUF tensor {gguf_name!r} has no counterpart in a plain Llama/Qwen2 model; "
            "this file holds a variant this reader does not support"
        )
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{LAYER_TENSORS[part]}.{kind}"


def _dequantize(tensor) -> np.ndarray:
    hf_shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dimension first
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a view of the reader's memory map, which goes away with it: copy that.
    owned = weights.flags.owndata and not isinstance(weights, np.memmap)
    return np.array(weights, dtype=np.float32, copy=None if owned else True).reshape(hf_shape)


def _unpermute_if_qk(weights: np.ndarray, gguf_name: str, config: dict) -> np.ndarray:
    if ".attn_q." in gguf_name:
        return _unpermute_qk(weights, config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return _unpermute_qk(weights, config["num_key_value_heads"])
    return weights


def _unpermute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo `permute_qk_for_gguf`: llama.cpp interleaved each head's two rotary halves."""
    interleaved = weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
    return interleaved.swapaxes(1, 2).reshape(weights.shape)


def _check_complete(tensors: dict, config: dict) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    for layer in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{layer}.{LAYER_TENSORS[part]}.weight" for part in _REQUIRED_LAYER_WEIGHTS]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise GGUFError(
            f"GGUF file lacks {len(missing)} tensors a {config['model_type']} model needs (first: {missing[0]}); "
            "it is incomplete, re-download or re-convert it"
        )


# --- tokenizer -------------------------------------------------------------------------------


def _tokenizer(metadata: dict) -> tuple[Tokenizer, dict]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError("GGUF file has no tokenizer.ggml.tokens; a tokenizer cannot be rebuilt from it")
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(metadata)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(metadata)
    else:
        raise GGUFError(f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
    _add_special_and_user_tokens(tokenizer, metadata)
    tokenizer_config = _tokenizer_config(metadata)
    tokenizer.post_processor = _post_processor(metadata, tokenizer_config)
    return tokenizer, tokenizer_config


def _byte_level_bpe(metadata: dict) -> Tokenizer:
    """GPT-2 style BPE: tokens are spelled in GPT-2's byte alphabet and merges are listed."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    model = models.BPE(
        vocab=_vocab(metadata["tokenizer.ggml.tokens"]),
        merges=_listed_merges(metadata),
        ignore_merges=pre in _IGNORE_MERGES_PRE,
    )
    tokenizer = Tokenizer(model)
    if pre in _QWEN2_PRE:
        tokenizer.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json composes text first
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_pre_tokenizer(pre: str):
    split = _split_pattern(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own pattern
    if pre in _DIGIT_SPLITTING_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _split_pattern(pre: str):
    if pre in _LLAMA3_PRE:
        return _LLAMA3_SPLIT
    if pre in _QWEN2_PRE:
        return _QWEN2_SPLIT
    if pre in _TEKKEN_PRE:
        return _TEKKEN_SPLIT
    if pre in _GPT4O_PRE:
        return _GPT4O_SPLIT
    return None


def _sentencepiece_bpe(metadata: dict) -> Tokenizer:
    """SentencePiece BPE: '▁' for spaces, <0xXX> byte tokens, merges ranked by token score."""
    tokens = metadata["tokenizer.ggml.tokens"]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=_vocab(tokens),
        merges=_listed_merges(metadata) or _merges_from_scores(tokens, metadata.get("tokenizer.ggml.scores")),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # drop the space the prefix added
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _vocab(tokens: list) -> dict:
    # A repeated token keeps its last id, as llama.cpp's token-to-id map does.
    return {token: index for index, token in enumerate(tokens)}


def _listed_merges(metadata: dict) -> list:
    return [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or ()]


def _merges_from_scores(tokens: list, scores) -> list:
    """SentencePiece files list no merges: every split of a token into two known tokens is a merge,
    ranked by the merged token's score (highest first), as SentencePiece's BPE picks them."""
    if scores is None:
        raise GGUFError("GGUF sentencepiece tokenizer has neither merges nor scores; re-convert the file")
    vocab = _vocab(tokens)
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in pairs]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_and_user_tokens(tokenizer: Tokenizer, metadata: dict) -> None:
    """Control tokens (and the bos/eos/unk/pad ids) are matched whole as special tokens, and
    user-defined ones whole as plain tokens, as llama.cpp does; BPE would otherwise cut them up.
    Each already has its id in the vocabulary, so adding it only marks it."""
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    special_types = (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNKNOWN)
    special_ids = {index for index, token_type in enumerate(token_types) if token_type in special_types}
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if metadata.get(f"tokenizer.ggml.{key}") is not None:
            special_ids.add(int(metadata[f"tokenizer.ggml.{key}"]))
    user_ids = [i for i, token_type in enumerate(token_types) if token_type == _TOKEN_TYPE_USER_DEFINED]
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)]
    tokenizer.add_special_tokens(specials)
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_ids])


def _tokenizer_config(metadata: dict) -> dict:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    return {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", _adds_bos_by_default(metadata))),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }


def _adds_bos_by_default(metadata: dict) -> bool:
    """llama.cpp's choice for files that do not say: sentencepiece and Llama 3 style vocabularies add BOS."""
    if metadata.get("tokenizer.ggml.model") == "llama":
        return True
    return metadata.get("tokenizer.ggml.pre") in _ADD_BOS_BY_DEFAULT_PRE


def _post_processor(metadata: dict, tokenizer_config: dict):
    steps = []
    if metadata.get("tokenizer.ggml.model") == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))
    template = _bos_eos_template(metadata, tokenizer_config)
    if template is not None:
        steps.append(template)
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _bos_eos_template(metadata: dict, tokenizer_config: dict):
    prefix, suffix, special_tokens = [], [], []
    if tokenizer_config["add_bos_token"] and tokenizer_config["bos_token"] is not None:
        prefix.append(tokenizer_config["bos_token"])
        special_tokens.append((tokenizer_config["bos_token"], int(metadata["tokenizer.ggml.bos_token_id"])))
    if tokenizer_config["add_eos_token"] and tokenizer_config["eos_token"] is not None:
        suffix.append(tokenizer_config["eos_token"])
        special_tokens.append((tokenizer_config["eos_token"], int(metadata["tokenizer.ggml.eos_token_id"])))
    if not special_tokens:
        return None
    single = prefix + ["$A:0"] + suffix
    pair = single + [f"{t}:1" for t in prefix] + ["$B:1"] + [f"{t}:1" for t in suffix]
    unique_special_tokens = list(dict.fromkeys(special_tokens))  # bos may also be eos
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=unique_special_tokens)
