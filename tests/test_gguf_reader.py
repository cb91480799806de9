"""compile/gguf_reader.py: GGUF files read back into Hugging Face tensors, config and tokenizer.

The GGUFs are written here with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes
them (its metadata keys, its q/k permutation, 1-D tensors kept in F32), from tiny random
transformers models and tiny tokenizers trained with the `tokenizers` library.

A check against a real file and against transformers' own GGUF loading runs when
MLC_SPEC_SMOLLM_GGUF names SmolLM2-135M-Instruct.Q4_1.gguf (see test_real_smollm2_matches_transformers).
"""

import json
import math
import os
import pathlib
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

try:
    from mlc_spec.compile.gguf_reader import GGUFError, permute_qk_for_gguf, read_gguf
except ImportError:  # a checkout that is not pip-installed: compile/ sits at the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from compile.gguf_reader import GGUFError, permute_qk_for_gguf, read_gguf


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

LLAMA_GGUF_TO_HF_LAYER = {
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
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in top:
        return top[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    part = {hf: g for g, hf in LLAMA_GGUF_TO_HF_LAYER.items()}[module]
    return f"blk.{layer}.{part}.{kind}"


def stored(weights: np.ndarray, qtype: QType) -> np.ndarray:
    """What gguf stores for a tensor: 1-D tensors stay F32, as llama.cpp keeps them."""
    if weights.ndim == 1 or qtype == QType.F32:
        return weights.astype(np.float32)
    if qtype == QType.F16:
        return weights.astype(np.float16)
    return gguf.quants.quantize(weights, qtype)


def write_gguf(path, arch, config, tensors, vocab, qtype=QType.F32, rope_scaling=None, integer_norm=False):
    """Write a GGUF with the metadata keys and tensor layout llama.cpp's converter uses."""
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
        data = stored(weights, qtype)
        if integer_norm and hf_name == "model.layers.0.input_layernorm.weight":
            data = np.arange(weights.size, dtype=np.int32)  # a type no float dequantization covers
        raw_dtype = qtype if data.dtype == np.uint8 else None
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


def tiny_qwen2(vocab_size: int):
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=1024, rope_theta=1000000.0,
                         tie_word_embeddings=True, **TINY_SHAPE)
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config)
    tensors = random_state_dict(model, seed=1)
    del tensors["lm_head.weight"]  # tied: llama.cpp writes no output.weight
    return config, model, tensors


CONFIG_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
]


def expected_config_value(hf_config, field):
    if field == "head_dim" and getattr(hf_config, "head_dim", None) is None:  # Qwen2Config has none
        return hf_config.hidden_size // hf_config.num_attention_heads
    return getattr(hf_config, field)


def assert_config_matches(config: dict, hf_config, vocab: dict) -> None:
    for field in CONFIG_FIELDS:
        assert config[field] == expected_config_value(hf_config, field), field
    assert config["architectures"] == hf_config.architectures
    assert config["model_type"] == hf_config.model_type
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    assert config["bos_token_id"] == vocab["bos_id"]
    assert config["eos_token_id"] == vocab["eos_id"]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return train_byte_level_tokenizer("gpt-2")


@pytest.fixture(scope="module")
def llama_model(gpt2_tokenizer):
    return tiny_llama(gpt2_tokenizer.get_vocab_size(with_added_tokens=True))


# --- tensors and config -------------------------------------------------------------------------


def test_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.random.default_rng(2).standard_normal((48, 8)).astype(np.float32)
    for n_head in (1, 2, 3, 6):
        ours = permute_qk_for_gguf(weights, n_head)
        reference = convert_hf_to_gguf_permute(torch.from_numpy(weights), n_head, n_head).numpy()
        np.testing.assert_array_equal(ours, reference)
        undone = LlamaTensorProcessor()._reverse_permute_weights(ours, n_head, n_head)
        np.testing.assert_array_equal(undone, weights)


def test_llama_f32_round_trip_is_exact(tmp_path, gpt2_tokenizer, llama_model):
    config, model, tensors = llama_model
    vocab = byte_level_vocab(gpt2_tokenizer, "gpt-2")
    path = tmp_path / "llama-f32.gguf"
    write_gguf(path, "llama", config, tensors, vocab)

    checkpoint = read_gguf(path)

    assert set(checkpoint.tensors) == set(tensors)
    for name, weights in tensors.items():
        assert checkpoint.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(checkpoint.tensors[name], weights, err_msg=name)
    assert set(checkpoint.source_types.values()) == {"F32"}
    assert_config_matches(checkpoint.config, config, vocab)
    assert checkpoint.config["rope_scaling"] is None
    assert checkpoint.config["torch_dtype"] == "float32"
    # The tensors are a complete Hugging Face state dict for this model.
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.tensors.items()}, strict=True)


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_0, QType.F16, QType.BF16], ids=lambda q: q.name)
def test_llama_quantized_equals_gguf_dequantize(tmp_path, gpt2_tokenizer, llama_model, qtype):
    config, _, tensors = llama_model
    vocab = byte_level_vocab(gpt2_tokenizer, "gpt-2")
    path = tmp_path / f"llama-{qtype.name}.gguf"
    write_gguf(path, "llama", config, tensors, vocab, qtype=qtype)

    checkpoint = read_gguf(path)

    # Q4_0 clips the largest positive value of a block to 7/8 of it: errors reach an eighth.
    relative_tolerance = {QType.Q8_0: 1 / 200, QType.Q4_0: 1 / 7, QType.F16: 1e-3, QType.BF16: 1e-2}[qtype]
    for name, weights in tensors.items():
        # Quantization works along rows, so permuting rows commutes with it: the reader's result
        # must be exactly gguf's dequantization of the unpermuted weights.
        expected = gguf.quants.dequantize(stored(weights, qtype), qtype if weights.ndim > 1 else QType.F32)
        np.testing.assert_array_equal(checkpoint.tensors[name], expected.reshape(weights.shape), err_msg=name)
        assert np.abs(checkpoint.tensors[name] - weights).max() <= relative_tolerance * np.abs(weights).max(), name
        assert checkpoint.source_types[name] == (qtype.name if weights.ndim > 1 else "F32")
    assert_config_matches(checkpoint.config, config, vocab)
    assert checkpoint.config["torch_dtype"] == ("bfloat16" if qtype == QType.BF16 else "float16")


def test_qwen2_with_bias_and_tied_embeddings(tmp_path):
    tokenizer = train_byte_level_tokenizer("qwen2")
    config, model, tensors = tiny_qwen2(tokenizer.get_vocab_size(with_added_tokens=True))
    vocab = byte_level_vocab(tokenizer, "qwen2")
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2", config, tensors, vocab)

    checkpoint = read_gguf(path)

    assert "model.layers.0.self_attn.q_proj.bias" in checkpoint.tensors
    assert "lm_head.weight" not in checkpoint.tensors
    assert set(checkpoint.tensors) == set(tensors)
    for name, weights in tensors.items():  # Qwen2 files are not permuted: everything comes back as is
        np.testing.assert_array_equal(checkpoint.tensors[name], weights, err_msg=name)
    assert_config_matches(checkpoint.config, config, vocab)
    assert checkpoint.config["tie_word_embeddings"] is True
    state_dict = {k: torch.from_numpy(v) for k, v in checkpoint.tensors.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []
    assert_same_tokenization(Tokenizer.from_str(checkpoint.tokenizer_json), tokenizer)


def llama3_rope(factor, low, high, original):
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


@pytest.mark.parametrize(
    "rope_scaling",
    [
        # Llama 3.1's own values: one frequency falls in the smoothing band at this tiny head_dim
        llama3_rope(factor=8.0, low=1.0, high=4.0, original=8192),
        # unusual values, recovered from the band's shape
        llama3_rope(factor=32.0, low=1.0, high=32.0, original=2048),
    ],
    ids=["llama3.1", "fitted"],
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, gpt2_tokenizer, rope_scaling):
    theta = 500000.0 if rope_scaling["factor"] == 8.0 else 10000.0
    vocab_size = gpt2_tokenizer.get_vocab_size(with_added_tokens=True)
    config, _, tensors = tiny_llama(vocab_size, rope_parameters={"rope_theta": theta, **rope_scaling})
    vocab = byte_level_vocab(gpt2_tokenizer, "llama-bpe")
    path = tmp_path / "llama3-rope.gguf"
    write_gguf(path, "llama", config, tensors, vocab, rope_scaling=rope_scaling)

    checkpoint = read_gguf(path)

    assert checkpoint.config["rope_scaling"] == pytest.approx(rope_scaling)
    assert "rope_freqs.weight" not in checkpoint.tensors


# --- tokenizer ----------------------------------------------------------------------------------


def assert_same_tokenization(rebuilt: Tokenizer, original: Tokenizer) -> None:
    for text in PROBE_STRINGS:
        expected = original.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text, add_special_tokens=False).ids == expected, text
        with_specials = original.decode(expected, skip_special_tokens=False)
        assert rebuilt.decode(expected, skip_special_tokens=False) == with_specials
        assert rebuilt.decode(expected) == original.decode(expected)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_byte_level_tokenizer_matches_original(tmp_path, pre):
    original = train_byte_level_tokenizer(pre)
    config, _, tensors = tiny_llama(original.get_vocab_size(with_added_tokens=True))
    vocab = byte_level_vocab(original, pre)
    path = tmp_path / f"tok-{pre}.gguf"
    write_gguf(path, "llama", config, tensors, vocab)

    checkpoint = read_gguf(path)
    rebuilt = Tokenizer.from_str(checkpoint.tokenizer_json)

    assert_same_tokenization(rebuilt, original)
    assert rebuilt.get_vocab_size(with_added_tokens=True) == len(vocab["tokens"])  # no token got a new id
    assert rebuilt.encode("hi", add_special_tokens=True).ids == original.encode("hi").ids  # add_bos_token False
    assert checkpoint.tokenizer_config == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "pad_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def test_sentencepiece_tokenizer_matches_original(tmp_path):
    original, vocab = sentencepiece_style_tokenizer()
    config, _, tensors = tiny_llama(len(vocab["tokens"]))
    path = tmp_path / "tok-spm.gguf"
    write_gguf(path, "llama", config, tensors, vocab)

    checkpoint = read_gguf(path)
    rebuilt = Tokenizer.from_str(checkpoint.tokenizer_json)

    assert_same_tokenization(rebuilt, original)
    assert rebuilt.encode("ü 🙂").tokens[:2] == ["<s>", "▁"]  # add_bos_token, then byte fallback
    assert "<0xF0>" in rebuilt.encode("🚀").tokens  # not in the corpus, so spelled in bytes
    assert checkpoint.tokenizer_config["bos_token"] == "<s>"
    assert checkpoint.tokenizer_config["eos_token"] == "</s>"
    assert checkpoint.tokenizer_config["add_bos_token"] is True


# --- bad input ----------------------------------------------------------------------------------


def assert_one_line_error(path, *fragments):
    with pytest.raises(GGUFError) as caught:
        read_gguf(path)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file, not a model\n" * 4)
    assert_one_line_error(path, "not a readable GGUF")


def test_truncated_gguf(tmp_path, gpt2_tokenizer, llama_model):
    config, _, tensors = llama_model
    whole = tmp_path / "whole.gguf"
    write_gguf(whole, "llama", config, tensors, byte_level_vocab(gpt2_tokenizer, "gpt-2"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_one_line_error(truncated, "not a readable GGUF")


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "absent.gguf", "no such file")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(path, "'gemma2'", "not supported")


def test_unsupported_tensor_type(tmp_path, gpt2_tokenizer, llama_model):
    config, _, tensors = llama_model
    path = tmp_path / "int.gguf"
    write_gguf(path, "llama", config, tensors, byte_level_vocab(gpt2_tokenizer, "gpt-2"), integer_norm=True)
    assert_one_line_error(path, "blk.0.attn_norm.weight", "I32")


# --- a real file, checked against transformers' own GGUF loading ------------------------------

SMOLLM_ENV = "MLC_SPEC_SMOLLM_GGUF"


@pytest.mark.skipif(
    not os.environ.get(SMOLLM_ENV),
    reason=f"set {SMOLLM_ENV} to the path of SmolLM2-135M-Instruct.Q4_1.gguf (sha256 b179c952...) to run",
)
def test_real_smollm2_matches_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = pathlib.Path(os.environ[SMOLLM_ENV])
    checkpoint = read_gguf(path)
    ours = Tokenizer.from_str(checkpoint.tokenizer_json)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    chats = [
        [{"role": "user", "content": "Hello! How are you today?"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Explain   spaces\tand tabs.\n\nÜnïcödé, 日本語 and 🙂, please."},
            {"role": "assistant", "content": "Sure: x = 42; y = 3.14159, in 2024."},
        ],
    ]
    texts = [theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    for text in texts + PROBE_STRINGS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)

    # transformers' from_pretrained wants accelerate for GGUF; the loader it calls does not.
    their_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(their_config)
    their_tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(checkpoint.tensors) == set(their_tensors)
    for name, weights in checkpoint.tensors.items():
        np.testing.assert_array_equal(weights, their_tensors[name].numpy(), err_msg=name)

    for field in CONFIG_FIELDS:
        assert checkpoint.config[field] == pytest.approx(getattr(their_config, field)), field
    assert checkpoint.config["rope_theta"] == their_config.rope_parameters["rope_theta"]
    assert checkpoint.tokenizer_config["eos_token"] == "<|im_end|>"
    assert checkpoint.config["bos_token_id"] == their_config.bos_token_id
    assert checkpoint.config["eos_token_id"] == their_config.eos_token_id
