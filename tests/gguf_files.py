"""GGUF files for the tests, written with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes
them (its metadata keys, its q/k permutation, 1-D tensors kept in F32), from tiny random transformers
models and tiny tokenizers trained with the `tokenizers` library."""

import json
import math

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mlc_spec.compile.gguf_reader import LAYER_TENSORS, TOP_LEVEL_TENSORS, permute_qk_for_gguf

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<think>"  # an added, non-special token: llama.cpp marks it USER_DEFINED
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "Hello, world! Hello there, hello again. It's what they're doing, isn't it?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 2024 3.14159 1,000,000",
    "def tokenize(text):\n    return [t for t in text.split()]\n\n\tindented\ttabs",
    "Grüße aus Köln, naïve café, 日本語のテキスト, emoji 🙂👍 and — dashes —",
    "    leading spaces and trailing spaces    \n\n\nnewlines",
    # where the split patterns differ: a word after punctuation, upper-case contractions
    "(hello) (hello) [world] (world) {code} DON'T WON'T I'M YOU'LL SHE'S (hello)",
] * 4

PROBE_STRINGS = [
    "Hello, world! This is the quick test.",
    "Grüße aus Köln — naïve café 日本語 🙂👍",
    "a  b   c\t\td\n\n\n  e    \n",
    "1 12 123 1234 12345 3.14159 2024-01-01",
    "<|im_start|>user\nhi there<|im_end|>\n<think>ok</think> done",
    "(hello) DON'T stop, YOU'LL see [world] zyzzyva",
    "cafe\u0301 nai\u0308ve",  # decomposed accents: only an NFC normalizer composes them
    "</s>hello<s> world",  # the prefix space after a special token, for SentencePiece vocabularies
    "",
]

# Meta's Llama 3 tokenizer.json split pattern (llama.cpp's "llama-bpe").
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# --- llama.cpp's conversion, reproduced ------------------------------------------------------


def convert_hf_to_gguf_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """LlamaModel.permute, copied from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def llama3_rope_factors(rope_scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors from convert_hf_to_gguf.py: the rope_freqs.weight tensor."""
    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope_scaling.get("factor", 8.0)
    low_freq_factor = rope_scaling.get("low_freq_factor", 1.0)
    high_freq_factor = rope_scaling.get("high_freq_factor", 4.0)
    old_context_len = rope_scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def gguf_tensor_name(hf_name: str) -> str:
    top = {hf: g for g, hf in TOP_LEVEL_TENSORS.items()}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    part = {hf: g for g, hf in LAYER_TENSORS.items()}[module]
    return f"blk.{layer}.{part}.{kind}"


def stored(weights: np.ndarray, qtype: QType) -> np.ndarray:
    """What gguf stores for a tensor: 1-D tensors stay F32, as llama.cpp keeps them."""
    if weights.ndim == 1 or qtype == QType.F32:
        return weights.astype(np.float32)
    if qtype == QType.F16:
        return weights.astype(np.float16)
    return gguf.quants.quantize(weights, qtype)


def random_blocks(qtype: QType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, bytes] of random blocks of a type gguf cannot quantize to (the K-quants): random codes,
    integer scales and mins, with finite, positive float16 super-block scales at the offsets ggml's
    block structs put them (Q4_K/Q5_K: d, dmin first; Q6_K: d last), small enough for weights of a
    real model's size (about 0.05), so that a model of them is not chaotic."""
    rng = np.random.default_rng(seed)
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block_weights, block_bytes), dtype=np.uint8)
    offsets = [block_bytes - 2] if qtype == QType.Q6_K else [0, 2]
    for offset in offsets:
        raw[:, offset:offset + 2] = rng.uniform(6e-5, 2e-4, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def write_gguf(path, arch, config, tensors, vocab, qtype=QType.F32, rope_scaling=None, integer_norm=False,
               qtypes=None):
    """Write a GGUF with the metadata keys and tensor layout llama.cpp's converter uses. qtypes: the
    type of each tensor given as raw uint8 blocks instead of float weights."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test-model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(int(qtype) if qtype in (QType.F32, QType.F16) else 7)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
    write_vocab(writer, vocab)
    for hf_name, weights in tensors.items():
        if arch == "llama" and ".q_proj." in hf_name:
            weights = permute_qk_for_gguf(weights, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            weights = permute_qk_for_gguf(weights, config.num_key_value_heads)
        data = weights if qtypes and hf_name in qtypes else stored(weights, qtype)
        if integer_norm and hf_name == "model.layers.0.input_layernorm.weight":
            data = np.arange(weights.size, dtype=np.int32)  # a type no float dequantization covers
        raw_dtype = (qtypes or {}).get(hf_name, qtype) if data.dtype == np.uint8 else None
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=raw_dtype)
    if rope_scaling is not None:
        factors = llama3_rope_factors(rope_scaling, config.rope_parameters["rope_theta"], config.head_dim)
        writer.add_tensor("rope_freqs.weight", factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_vocab(writer, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_bos_token_id(vocab["bos_id"])
    writer.add_eos_token_id(vocab["eos_id"])
    if "unk_id" in vocab:
        writer.add_unk_token_id(vocab["unk_id"])
    writer.add_pad_token_id(vocab["eos_id"])
    writer.add_add_bos_token(vocab["add_bos"])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    writer.add_chat_template(CHAT_TEMPLATE)


# --- tiny tokenizers ---------------------------------------------------------------------------


def split_then_byte_level(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_pre_tokenizer(pre: str):
    """The pre-tokenizer each model's own tokenizer.json has."""
    if pre == "llama-bpe":
        return split_then_byte_level(LLAMA3_SPLIT)
    if pre == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        return split_then_byte_level(PRETOKENIZE_REGEX)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2


def train_byte_level_tokenizer(pre: str, vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    if pre == "llama-bpe":
        # Llama 3's tokenizer.json looks whole words up before merging, and has words no merge reaches.
        spec["model"]["ignore_merges"] = True
        spec["model"]["vocab"]["Ġzyzzyva"] = len(spec["model"]["vocab"])
    if pre == "smollm":
        # A digit merge the digit-splitting pre-tokenizer must never let apply.
        spec["model"]["vocab"]["12"] = len(spec["model"]["vocab"])
        spec["model"]["merges"].append(["1", "2"])
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_tokens([USER_TOKEN])
    return tokenizer


def byte_level_vocab(tokenizer: Tokenizer, pre: str) -> dict:
    """The tokenizer.ggml.* values llama.cpp writes for a byte-level BPE tokenizer."""
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [
        gguf.TokenType.CONTROL
        if token in SPECIAL_TOKENS
        else gguf.TokenType.USER_DEFINED
        if token == USER_TOKEN
        else gguf.TokenType.NORMAL
        for token in tokens
    ]
    merges = [" ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "token_types": [int(t) for t in types],
        "merges": merges,
        "bos_id": tokens.index("<|im_start|>"),
        "eos_id": tokens.index("<|im_end|>"),
        "add_bos": False,
    }


def sentencepiece_style_tokenizer() -> tuple[Tokenizer, dict]:
    """A Llama-2 style vocabulary: <unk> <s> </s>, 256 <0xXX> byte tokens, then '▁'-spelled pieces
    ranked by score, as a SentencePiece model converted by llama.cpp lists them (without merges)."""
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=120, show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = sorted(trained["vocab"], key=trained["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    merges = [tuple(m) for m in trained["merges"]]

    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])

    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SentencePiece scores: a later (lower-priority) piece scores lower; control and byte tokens score 0.
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    vocab = {
        "model": "llama",
        "tokens": tokens,
        "token_types": [int(t) for t in types],
        "scores": scores,
        "bos_id": 1,
        "eos_id": 2,
        "unk_id": 0,
        "add_bos": True,
        "add_space_prefix": True,
    }
    return tokenizer, vocab


# --- tiny models --------------------------------------------------------------------------------


def random_state_dict(model, seed: int) -> dict[str, np.ndarray]:
    """Every tensor random (norm weights too), so a swapped or missing tensor shows."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, value in model.state_dict().items():
        noise = rng.standard_normal(tuple(value.shape)).astype(np.float32)
        tensors[name] = (1.0 + 0.1 * noise) if name.endswith("norm.weight") else 0.5 * noise
    return tensors


TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def tiny_llama(vocab_size: int, **overrides):
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, **TINY_SHAPE, **overrides)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    return config, model, random_state_dict(model, seed=0)


def tiny_qwen2(vocab_size: int, **overrides):
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=1024, rope_theta=1000000.0,
                         tie_word_embeddings=True, **{**TINY_SHAPE, **overrides})
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config)
    tensors = random_state_dict(model, seed=1)
    del tensors["lm_head.weight"]  # tied: llama.cpp writes no output.weight
    return config, model, tensors


# K-quants need a multiple of 256 inputs in every linear. Heads of 16 as in the other tiny models: at
# head_dim 64 the decode and verify attention kernels differ in the last bits at some positions.
K_QUANT_SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=16, num_attention_heads=16, num_key_value_heads=8)


# llama.cpp's K-quant mixes: the type of most linears; Q6_K for the "more bits" ones and the embedding.
K_MIXES = {"q4_k_m": QType.Q4_K, "q5_k_m": QType.Q5_K}


def k_mix_type(mix: str, hf_name: str, shape: tuple) -> QType | None:
    """llama.cpp's choice in a Q4_K_M or Q5_K_M file of a 2-layer model (None: a 1-D tensor, kept F32):
    Q6_K for the tied embedding and, in layer 0 (one of its "more bits" layers), attn_v and ffn_down;
    the mix's type elsewhere."""
    if len(shape) == 1:
        return None
    more_bits = hf_name.startswith("model.layers.0.") and (".v_proj." in hf_name or ".down_proj." in hf_name)
    return QType.Q6_K if more_bits or hf_name == "model.embed_tokens.weight" else K_MIXES[mix]


def write_k_mix_gguf(path, mix: str = "q4_k_m", layer1_seed: int = 1):
    """A tiny tied Qwen2 GGUF with a K-quant mix of random blocks (gguf cannot quantize to K-quants);
    files differing in layer1_seed share every tensor but layer 1's linears."""
    tokenizer = train_byte_level_tokenizer("qwen2")
    config, _, tensors = tiny_qwen2(tokenizer.get_vocab_size(with_added_tokens=True), **K_QUANT_SHAPE)
    qtypes = {name: qtype for name, w in tensors.items() if (qtype := k_mix_type(mix, name, w.shape)) is not None}
    for index, name in enumerate(qtypes):
        seed = layer1_seed if name.startswith("model.layers.1.") else 0
        tensors[name] = random_blocks(qtypes[name], *tensors[name].shape, seed=1000 * seed + index)
    write_gguf(path, "qwen2", config, tensors, byte_level_vocab(tokenizer, "qwen2"), qtypes=qtypes)
    return path


# --- random models of a given shape, quantized by llama.cpp ---------------------------------------

# Qwen2-1.5B's shape (issue 12's cost model); SMALL_SHAPE: the same kind of model for the tests.
QWEN2_1_5B_SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
SMALL_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
# llama.cpp's file types (llama_ftype) for llama_model_quantize.
LLAMA_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


class _RandomQwen2Tensors:
    """A tied Qwen2's tensors (Hugging Face names), each drawn when the writer asks for it, so that a
    1.5B model is never all in memory as float32: weights ~ N(0, std), norms ~ 1, biases small."""

    def __init__(self, config, seed: int, std: float):
        self.config, self.seed, self.std = config, seed, std

    def items(self):
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        q_out, kv_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
        for i in range(c.num_hidden_layers):
            layer = f"model.layers.{i}."
            shapes.update({
                layer + "input_layernorm.weight": (c.hidden_size,),
                layer + "self_attn.q_proj.weight": (q_out, c.hidden_size), layer + "self_attn.q_proj.bias": (q_out,),
                layer + "self_attn.k_proj.weight": (kv_out, c.hidden_size), layer + "self_attn.k_proj.bias": (kv_out,),
                layer + "self_attn.v_proj.weight": (kv_out, c.hidden_size), layer + "self_attn.v_proj.bias": (kv_out,),
                layer + "self_attn.o_proj.weight": (c.hidden_size, q_out),
                layer + "post_attention_layernorm.weight": (c.hidden_size,),
                layer + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                layer + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                layer + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            })
        shapes["model.norm.weight"] = (c.hidden_size,)
        rng = np.random.default_rng(self.seed)
        for name, shape in shapes.items():
            noise = rng.standard_normal(shape, dtype=np.float32)
            if name.endswith("norm.weight"):
                yield name, 1.0 + 0.1 * noise
            else:
                yield name, (self.std if len(shape) == 2 else 0.1 * self.std) * noise


def write_random_gguf(path, shape: dict, seed: int = 0, std: float = 0.02):
    """An F16 GGUF of a tied Qwen2 of this shape with random weights and a small byte-level BPE
    vocabulary padded with unused tokens to the shape's vocabulary, as llama.cpp's tools read it."""
    tokenizer = train_byte_level_tokenizer("qwen2")
    vocab = byte_level_vocab(tokenizer, "qwen2")
    padding = shape["vocab_size"] - len(vocab["tokens"])
    vocab["tokens"] = vocab["tokens"] + [f"<|unused_{i}|>" for i in range(padding)]
    vocab["token_types"] = vocab["token_types"] + [int(gguf.TokenType.UNUSED)] * padding
    config = Qwen2Config(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=vocab["bos_id"],
                         eos_token_id=vocab["eos_id"], **shape)
    write_gguf(path, "qwen2", config, _RandomQwen2Tensors(config, seed, std), vocab, qtype=QType.F16)
    return path


def quantize_with_llamacpp(source, out, fmt: str):
    """llama.cpp's own quantization (llama-cpp-python's llama_model_quantize) of an F16 GGUF to fmt."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[fmt]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed to write {out} as {fmt}")
    return out
