"""compile/gguf_reader.py: GGUF files read back into Hugging Face tensors, config and tokenizer.

The GGUFs are written by tests/gguf_files.py, the way llama.cpp's convert_hf_to_gguf.py writes them.

A check against a real file and against transformers' own GGUF loading runs when
MLC_SPEC_SMOLLM_GGUF names SmolLM2-135M-Instruct.Q4_1.gguf (see test_real_smollm2_matches_transformers).
"""

import os
import pathlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import Tokenizer

from gguf_files import (CHAT_TEMPLATE, PROBE_STRINGS, byte_level_vocab, convert_hf_to_gguf_permute,
                        sentencepiece_style_tokenizer, stored, tiny_llama, tiny_qwen2, train_byte_level_tokenizer,
                        write_gguf)
from mlc_spec.compile.gguf_reader import GGUFError, permute_qk_for_gguf, read_gguf


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
