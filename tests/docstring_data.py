"""Test text made on the machine: the stdlib's docstrings, and small tokenizers trained on them."""

from __future__ import annotations

from pathlib import Path


def docstring_texts(n_chars: int) -> list[str]:
    """The stdlib's docstrings in order, until their total length first exceeds ``n_chars``."""
    from salt_megatron.data.corpus import stdlib_docstrings

    texts: list[str] = []
    for doc in stdlib_docstrings():
        texts.append(doc["text"])
        if sum(map(len, texts)) > n_chars:
            break
    return texts


def train_test_tokenizer(texts: list[str], prefix: Path, vocab_size: int = 300) -> str:
    """A sentencepiece BPE of ``vocab_size`` pieces (no byte fallback, one thread) on ``texts``,
    written to ``<prefix>.model``; returns that path."""
    from salt_megatron.data.tokenizer import train_tokenizer

    train_tokenizer(texts, prefix, vocab_size=vocab_size, byte_fallback=False, num_threads=1)
    return f"{prefix}.model"
