"""The embedded default data: stdlib docstrings -> sentencepiece BPE -> Megatron ``.bin/.idx``.

:func:`prepare_demo_data` runs the three steps once and caches them under ``cache_dir``; a step
is skipped when its outputs exist and are complete (the corpus and tokenizer are written under
temporary names and renamed; the dataset is complete when its ``.tokenizer.json`` matches the
tokenizer and its ``.bin`` matches its ``.idx``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from salt_megatron.data.corpus import iter_texts, write_stdlib_corpus
from salt_megatron.data.errors import DataError
from salt_megatron.data.indexed import read_tokenizer_record, validate_indexed_dataset
from salt_megatron.data.preprocess import preprocess_files
from salt_megatron.data.tokenizer import train_tokenizer
from salt_megatron.data.tokenizer_base import file_sha256

logger = logging.getLogger(__name__)

DEMO_VOCAB_SIZE = 8000


@dataclass(frozen=True)
class DemoDataPaths:
    """Where the demo data lives."""

    corpus: str
    tokenizer_model: str
    data_prefix: str


def _dataset_complete(prefix: str, model_path: str) -> bool:
    """Whether ``prefix`` is a complete dataset made with the tokenizer at ``model_path``."""
    try:
        record = read_tokenizer_record(prefix)
        validate_indexed_dataset(prefix)
    except DataError:
        return False
    return record is not None and record["fingerprint"] == file_sha256(model_path)


def prepare_demo_data(
    cache_dir: str | os.PathLike[str],
    vocab_size: int = DEMO_VOCAB_SIZE,
    workers: int = 2,
    progress: bool = False,
) -> DemoDataPaths:
    """Build (or reuse) the stdlib-docstring corpus, its BPE tokenizer and its indexed dataset.

    Files, under ``cache_dir/py<major><minor>``: ``stdlib_docstrings.jsonl``,
    ``tokenizer_bpe<vocab>.model``, ``stdlib_docstrings_text_document.{bin,idx}``. About 10 s
    the first time on 2 cores (2 MB of text), instant afterwards.
    """
    root = os.path.join(os.fspath(cache_dir), f"py{sys.version_info[0]}{sys.version_info[1]}")
    os.makedirs(root, exist_ok=True)
    paths = DemoDataPaths(
        corpus=os.path.join(root, "stdlib_docstrings.jsonl"),
        tokenizer_model=os.path.join(root, f"tokenizer_bpe{vocab_size}.model"),
        data_prefix=os.path.join(root, f"stdlib_docstrings_bpe{vocab_size}_text_document"),
    )
    if not os.path.isfile(paths.corpus):
        summary = write_stdlib_corpus(paths.corpus)
        logger.info("demo corpus: %d documents, %.1f MB", summary.documents, summary.bytes / 1e6)
    if not os.path.isfile(paths.tokenizer_model):
        train_tokenizer(
            iter_texts([paths.corpus]),
            paths.tokenizer_model.removesuffix(".model"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
        )
        logger.info("demo tokenizer: %s", paths.tokenizer_model)
    if not _dataset_complete(paths.data_prefix, paths.tokenizer_model):
        stats = preprocess_files(
            [paths.corpus],
            paths.data_prefix,
            paths.tokenizer_model,
            workers=workers,
            progress=progress,
        )
        logger.info("demo dataset:\n%s", stats.format())
    return paths
