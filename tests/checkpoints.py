"""Tiny random Hugging Face checkpoints for the tests, written with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "once upon a time there was a little cat who lived in a house by the sea",
    "the quick brown fox jumps over the lazy dog while the sun shines",
    "speculative decoding drafts tokens with a small model and verifies them with a large one",
    "numbers like 12345 and 67890, punctuation! questions? and emoji ✓ ünïcödé",
] * 4

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A real byte-level BPE whose vocabulary fills vocab_size exactly (special tokens included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_checkpoint(path: Path, arch: str = "llama", *, seed: int = 0, vocab_size: int = 320,
                     tokenizer_vocab: int | None = None, perturb_from: Path | None = None, noise: float = 0.0,
                     dtype: torch.dtype = torch.float32, **shape) -> Path:
    """Write a random model folder. perturb_from: start from that checkpoint's weights plus noise."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.update(shape)
    torch.manual_seed(seed)
    if perturb_from is not None:
        model = model_cls.from_pretrained(perturb_from, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
    else:
        model = model_cls(config_cls(**cfg))
        _spread_logits(model)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    byte_level_tokenizer(tokenizer_vocab or min(vocab_size, 320)).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def _spread_logits(model) -> None:
    """transformers initialises weights with std 0.02, which makes every logit nearly equal; scale the
    output head so greedy choices have clear margins, as in a trained model."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)  # the embedding too, when tied
