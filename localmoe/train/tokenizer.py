"""Train the built-in model's byte-level BPE on the corpus with the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from localmoe.models.builtin import SPECIAL_TOKENS, byte_level_tokenizer, save_tokenizer


def train_tokenizer(documents: list[str], vocab_size: int, out_dir: Path) -> Tokenizer:
    """Byte-level BPE: any text encodes (no <unk>), merges learned from the training split only."""
    tokenizer = byte_level_tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer
