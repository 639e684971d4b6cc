"""A tiny tokenizer for CLI tests: BPE trained on a few sentences, ids below 256 (tiny models' vocabulary).

``save_tiny_tokenizer(folder)`` writes it next to a tiny model (``save_pretrained`` layout), so
``AutoTokenizer.from_pretrained(folder)`` loads it. No network, deterministic.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route every token to a few experts.",
    "def add(a, b):\n    return a + b\n",
    "Calibration data should cover prose, code and numbers like 12345 and 3.14.",
    "for i in range(10): print(i * i)",
]


def build_tiny_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """Character BPE (whitespace pre-tokenizer) over the sentences above; unknown characters -> <unk>; every id < ``vocab_size`` (<= 256)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def save_tiny_tokenizer(folder: str | Path, vocab_size: int = 200) -> PreTrainedTokenizerFast:
    tokenizer = build_tiny_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def save_tiny_model_with_tokenizer(folder: str | Path, family: str = "qwen3_moe") -> Path:
    """A tiny random ``family`` model with the tiny tokenizer, saved in ``folder`` (what the CLI and
    pipeline tests run the commands on)."""
    from moecompress.model.tiny import save_tiny_model

    save_tiny_model(family, folder)
    save_tiny_tokenizer(folder)
    return Path(folder)
