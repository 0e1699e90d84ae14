"""Data pipeline: tokenizers, JSONL/text -> Megatron ``.bin/.idx``, GPT datasets, demo data.

Modules: :mod:`.tokenizer` (sentencepiece / null tokenizers, training, :func:`load_tokenizer`),
:mod:`.hf_tokenizer` (Hugging Face ``tokenizer.json``, byte-level BPE training), :mod:`.corpus`
(reading inputs, the stdlib-docstring corpus), :mod:`.preprocess` (indexed-dataset writer),
:mod:`.indexed` (validation, tokenizer records), :mod:`.datasets` (megatron GPT datasets),
:mod:`.demo` (:func:`prepare_demo_data`). Megatron-core is imported only where needed.
"""

from salt_megatron.data.datasets import build_gpt_datasets, parse_blend
from salt_megatron.data.demo import DemoDataPaths, prepare_demo_data
from salt_megatron.data.errors import DataError
from salt_megatron.data.hf_tokenizer import HuggingFaceTokenizer, train_bpe_tokenizer
from salt_megatron.data.tokenizer import (
    NullTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "DataError",
    "DemoDataPaths",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "build_gpt_datasets",
    "load_tokenizer",
    "parse_blend",
    "prepare_demo_data",
    "train_bpe_tokenizer",
    "train_tokenizer",
]
