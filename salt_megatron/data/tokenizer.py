"""Tokenizers for the data pipeline: sentencepiece, Hugging Face (``hf_tokenizer``), and null.

:func:`load_tokenizer` opens a ``--tokenizer-model`` of either ``--tokenizer-type``. All follow
megatron-core's tokenizer interface as :class:`GPTDatasetConfig` uses it (``vocab_size``,
``eod``, ``pad``, ``unique_identifiers``, ``tokenize``/``detokenize``, and the rest of
``megatron.core.tokenizers.MegatronTokenizerBase``'s methods) by duck typing rather than
inheritance, so that this module (and the tokenizer-training CLI) does not import megatron-core,
which costs ~6-10 s per process. ``GPTDatasetConfig`` only type-hints the base class.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

from salt_megatron.data.errors import DataError
from salt_megatron.data.tokenizer_base import FingerprintedTokenizer, file_sha256

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class SentencePieceTokenizer(FingerprintedTokenizer):
    """A sentencepiece model behind megatron-core's tokenizer interface.

    ``eod`` is the model's ``</s>`` (eos) id; ``pad`` is its pad id (``-1`` when the model has
    none). ``fingerprint`` (sha256 of the model file) identifies the tokenizer: it keys
    megatron's index cache through ``unique_identifiers`` and is recorded beside each
    preprocessed dataset.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.path = str(model_path)
        if not os.path.isfile(self.path):
            raise DataError(f"tokenizer model not found: {self.path}")
        with open(self.path, "rb") as f:
            proto = f.read()
        self._fingerprint = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as err:
            raise DataError(f"{self.path}: not a sentencepiece model ({err})") from err

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the model."""
        return int(self._sp.get_piece_size())

    @property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> piece."""
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        """End-of-document id, appended after every document (the model's eos)."""
        return int(self._sp.eos_id())

    @property
    def eos(self) -> int:
        """End-of-sequence id."""
        return int(self._sp.eos_id())

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id."""
        return int(self._sp.bos_id())

    @property
    def pad(self) -> int:
        """Padding id, ``-1`` if the model has no pad piece."""
        return int(self._sp.pad_id())

    @property
    def unk(self) -> int:
        """Unknown-piece id."""
        return int(self._sp.unk_id())

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids (no bos/eos added)."""
        return list(self._sp.encode(text, out_type=int))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> ids in one call."""
        return [list(ids) for ids in self._sp.encode(list(texts), out_type=int)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids -> text."""
        return str(self._sp.decode([int(i) for i in ids]))

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Part of megatron's interface; a plain sentencepiece model has no chat template."""
        raise NotImplementedError(f"{self.path}: sentencepiece models carry no chat template")

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self._fingerprint[:12]})"
        )


TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
"""``--tokenizer-type`` values (Megatron-LM's names)."""


def infer_tokenizer_type(path: str | os.PathLike[str]) -> str:
    """``HuggingFaceTokenizer`` for a folder or a ``.json`` file, else sentencepiece."""
    p = str(path)
    return "HuggingFaceTokenizer" if os.path.isdir(p) or p.endswith(".json") else TOKENIZER_TYPES[0]


def load_tokenizer(path: str | os.PathLike[str], tokenizer_type: str | None = None) -> Any:
    """The tokenizer at ``path`` (``--tokenizer-model``) of ``tokenizer_type`` (None: inferred).

    Raises :class:`DataError` for an unknown type, a missing path, or a file of the other kind.
    """
    kind = tokenizer_type or infer_tokenizer_type(path)
    if kind == "HuggingFaceTokenizer":
        from salt_megatron.data.hf_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(path)
    if kind != "SentencePieceTokenizer":
        raise DataError(f"--tokenizer-type {kind!r}: expected one of {', '.join(TOKENIZER_TYPES)}")
    if os.path.isdir(path):
        raise DataError(
            f"--tokenizer-model {path} is a folder: a sentencepiece model is one .model file "
            "(use --tokenizer-type HuggingFaceTokenizer for a Hugging Face tokenizer folder)"
        )
    return SentencePieceTokenizer(path)


class NullTokenizer:
    """A vocabulary of ``vocab_size`` ids with no text mapping, for mock-data runs.

    ``eod`` is the last id (``vocab_size - 1``); there is no pad id (``-1``). ``tokenize``
    parses whitespace-separated integers, ``detokenize`` joins them.
    """

    def __init__(self, vocab_size: int) -> None:
        if int(vocab_size) < 2:
            raise DataError(f"NullTokenizer needs vocab_size >= 2, got {vocab_size}")
        self._vocab_size = int(vocab_size)

    @property
    def fingerprint(self) -> str:
        """Identity of a null tokenizer: its vocabulary size."""
        return f"null-{self._vocab_size}"

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What megatron hashes into its dataset-cache key."""
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("vocab_size", self._vocab_size),
            ]
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        """Id string -> id."""
        return {str(i): i for i in range(self._vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> id string."""
        return {i: str(i) for i in range(self._vocab_size)}

    @property
    def eod(self) -> int:
        """End-of-document id (the last id)."""
        return self._vocab_size - 1

    @property
    def eos(self) -> int:
        """Same as ``eod``."""
        return self._vocab_size - 1

    @property
    def pad(self) -> int:
        """No padding id."""
        return -1

    def tokenize(self, text: str) -> list[int]:
        """``"1 2 3"`` -> ``[1, 2, 3]``; ids must lie in the vocabulary."""
        ids = [int(x) for x in text.split()]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise DataError(f"ids {bad[:5]} outside the vocabulary of {self._vocab_size}")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """``[1, 2, 3]`` -> ``"1 2 3"``."""
        return " ".join(str(int(i)) for i in ids)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Part of megatron's interface; a null tokenizer has no chat template."""
        raise NotImplementedError("NullTokenizer has no chat template")


@dataclass(frozen=True)
class TokenizerSummary:
    """What :func:`train_tokenizer` produced."""

    model_path: str
    vocab_size: int
    model_type: str
    byte_fallback: bool
    num_sentences: int
    num_chars: int
    fingerprint: str

    def format(self) -> str:
        """Human-readable multi-line summary."""
        return (
            f"tokenizer  {self.model_path}\n"
            f"  type {self.model_type}, vocab {self.vocab_size}, byte_fallback "
            f"{self.byte_fallback}\n"
            f"  trained on {self.num_sentences} sentences / {self.num_chars} chars\n"
            f"  special ids: unk={UNK_ID} bos={BOS_ID} eos/eod={EOS_ID} pad={PAD_ID}\n"
            f"  fingerprint {self.fingerprint}"
        )


_TRAINER_OPTIONS: dict[str, Any] = {
    "normalization_rule_name": "identity",  # keep text as is: exact round trips
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,  # indentation runs become pieces
    "split_digits": True,
    "max_sentence_length": 1 << 16,
    "shuffle_input_sentence": False,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": PAD_ID,
    "minloglevel": 2,
}


def _subsample(texts: Sequence[str], max_sentences: int | None) -> list[str]:
    """Keep every k-th sentence so at most ``max_sentences`` remain (deterministic)."""
    if max_sentences is None or len(texts) <= max_sentences:
        return list(texts)
    stride = -(-len(texts) // max_sentences)
    return list(texts[::stride])


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int = 8000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentences: int | None = 200_000,
    user_defined_symbols: Sequence[str] = (),
    num_threads: int = 2,
) -> TokenizerSummary:
    """Train a sentencepiece model on ``texts``; write ``<model_prefix>.model`` and ``.vocab``.

    Each text is one training sentence (newlines kept, whitespace not normalised, so
    ``detokenize(tokenize(x)) == x`` for any text when ``byte_fallback``). At most
    ``max_sentences`` are used (an even stride, deterministic). Special ids: unk 0, bos 1,
    eos 2 (the end-of-document token), pad 3. Files are written under temporary names and
    renamed at the end.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    sentences = _subsample([t for t in texts if t.strip()], max_sentences)
    if not sentences:
        raise DataError(f"no text to train the tokenizer {model_prefix} on")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    tmp_model, tmp_vocab = Path(f"{tmp_prefix}.model"), Path(f"{tmp_prefix}.vocab")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(tmp_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=0.9995 if byte_fallback else 1.0,
            **_TRAINER_OPTIONS,
            user_defined_symbols=list(user_defined_symbols),
            num_threads=num_threads,
        )
        os.replace(tmp_vocab, f"{prefix}.vocab")
        os.replace(tmp_model, f"{prefix}.model")
    except RuntimeError as err:
        raise DataError(f"sentencepiece training for {prefix} failed: {err}") from err
    finally:
        for tmp in (tmp_model, tmp_vocab):
            tmp.unlink(missing_ok=True)
    model_path = f"{prefix}.model"
    return TokenizerSummary(
        model_path=model_path,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        num_sentences=len(sentences),
        num_chars=sum(len(s) for s in sentences),
        fingerprint=file_sha256(model_path),
    )
