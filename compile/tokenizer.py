"""Tokenizer checks at compile time: a draft must share its target's tokens, and the special tokens."""

from __future__ import annotations

from tokenizers import Tokenizer

from ..interface.artifact import SpecialTokens
from .checkpoint import Checkpoint
from .config import CompileError, ModelConfig


def _tokenizer(ck: Checkpoint) -> Tokenizer:
    try:
        return Tokenizer.from_str(ck.tokenizer_json)
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise CompileError(f"{ck.source}: unreadable tokenizer.json ({err})") from None


def check_same_tokenizer(target: Checkpoint, draft: Checkpoint) -> None:
    """Same token strings at the same ids. Embedding sizes may differ (padding rows): the runtime
    aligns the draft's output to the target's vocabulary."""
    t_vocab = _tokenizer(target).get_vocab(with_added_tokens=True)
    d_vocab = _tokenizer(draft).get_vocab(with_added_tokens=True)
    if t_vocab != d_vocab:
        differing = len(set(t_vocab.items()) ^ set(d_vocab.items()))
        raise CompileError(
            f"draft {draft.source} and target {target.source} have different tokenizers "
            f"({len(d_vocab)} vs {len(t_vocab)} tokens, {differing} entries differ); "
            "use a draft trained with the target's tokenizer"
        )
    for ck in (target, draft):
        cfg = ck.config
        if len(t_vocab) > cfg.vocab_size and max(t_vocab.values()) >= cfg.vocab_size:
            raise CompileError(f"{ck.source}: the tokenizer has ids up to {max(t_vocab.values())} "
                               f"but the model's vocabulary is {cfg.vocab_size}; the checkpoint is inconsistent")


def special_tokens(ck: Checkpoint, cfg: ModelConfig) -> SpecialTokens:
    tok = _tokenizer(ck)
    tc = ck.tokenizer_config

    def token_text(key: str) -> str | None:
        value = tc.get(key)
        return value.get("content") if isinstance(value, dict) else value

    eos_ids = set(cfg.eos_token_ids)
    eos_text = token_text("eos_token")
    if eos_text is not None and tok.token_to_id(eos_text) is not None:
        eos_ids.add(tok.token_to_id(eos_text))
    bos_id = cfg.bos_token_id
    if bos_id is None and token_text("bos_token") is not None:
        bos_id = tok.token_to_id(token_text("bos_token"))
    return SpecialTokens(bos_token_id=bos_id, eos_token_ids=tuple(sorted(eos_ids)), bos_token=token_text("bos_token"),
                         eos_token=eos_text)
