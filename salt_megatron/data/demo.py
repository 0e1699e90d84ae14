"""The embedded data, made on the machine: a corpus -> sentencepiece BPE -> Megatron ``.bin/.idx``.

Two corpora: the demo's stdlib docstrings (:func:`prepare_demo_data`, 2 MB) and the larger
Python-sources corpus of :mod:`salt_megatron.data.code_corpus` (:func:`prepare_code_data`,
about 300 MB). Each runs the three steps once and caches them under ``cache_dir``; a step is
skipped when its outputs exist and are complete (the corpus and tokenizer are written under
temporary names and renamed; the dataset is complete when its ``.tokenizer.json`` matches the
tokenizer and its ``.bin`` matches its ``.idx``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from salt_megatron.data.code_corpus import write_code_corpus
from salt_megatron.data.corpus import iter_texts, write_stdlib_corpus
from salt_megatron.data.errors import DataError
from salt_megatron.data.indexed import read_tokenizer_record, validate_indexed_dataset
from salt_megatron.data.preprocess import preprocess_files
from salt_megatron.data.tokenizer import train_tokenizer
from salt_megatron.data.tokenizer_base import file_sha256

logger = logging.getLogger(__name__)

DEMO_VOCAB_SIZE = 8000
CODE_VOCAB_SIZE = 8000  # the output layer is 25-45% of the study's models' FLOPs already
CODE_TOKENIZER_PARAGRAPHS = 300_000  # an even stride over the corpus' paragraphs (~25 MB)


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


def _prepare(
    root: str,
    paths: DemoDataPaths,
    write_corpus: Callable[[str], object],
    tokenizer_texts: Callable[[str], Iterable[str]],
    vocab_size: int,
    workers: int,
    progress: bool,
    max_sentences: int | None,
) -> DemoDataPaths:
    """The three cached steps: corpus, tokenizer (on ``tokenizer_texts(corpus)``, at most
    ``max_sentences`` of them), indexed dataset."""
    os.makedirs(root, exist_ok=True)
    if not os.path.isfile(paths.corpus):
        summary = write_corpus(paths.corpus)
        logger.info("corpus: %s", summary)
    if not os.path.isfile(paths.tokenizer_model):
        train_tokenizer(
            tokenizer_texts(paths.corpus),
            paths.tokenizer_model.removesuffix(".model"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            max_sentences=max_sentences,
        )
        logger.info("tokenizer: %s", paths.tokenizer_model)
    if not _dataset_complete(paths.data_prefix, paths.tokenizer_model):
        stats = preprocess_files(
            [paths.corpus],
            paths.data_prefix,
            paths.tokenizer_model,
            workers=workers,
            progress=progress,
        )
        logger.info("dataset:\n%s", stats.format())
    return paths


def _python_root(cache_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(cache_dir), f"py{sys.version_info[0]}{sys.version_info[1]}")


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
    root = _python_root(cache_dir)
    paths = DemoDataPaths(
        corpus=os.path.join(root, "stdlib_docstrings.jsonl"),
        tokenizer_model=os.path.join(root, f"tokenizer_bpe{vocab_size}.model"),
        data_prefix=os.path.join(root, f"stdlib_docstrings_bpe{vocab_size}_text_document"),
    )
    return _prepare(
        root,
        paths,
        write_stdlib_corpus,
        lambda corpus: iter_texts([corpus]),
        vocab_size,
        workers,
        progress,
        max_sentences=200_000,
    )


def code_paragraphs(corpus: str, count: int = CODE_TOKENIZER_PARAGRAPHS) -> Iterator[str]:
    """About ``count`` paragraphs (blank-line-separated blocks) of ``corpus``, an even stride over
    all of its paragraphs in order (deterministic): the tokenizer's training sample."""
    split = re.compile(r"\n\s*\n")
    total = sum(len(split.split(t)) for t in iter_texts([corpus]))
    stride = max(1, -(-total // count))
    index = 0
    for text in iter_texts([corpus]):
        for para in split.split(text):
            if index % stride == 0 and para.strip():
                yield para
            index += 1


def prepare_code_data(
    cache_dir: str | os.PathLike[str],
    vocab_size: int = CODE_VOCAB_SIZE,
    workers: int = 2,
    progress: bool = False,
) -> DemoDataPaths:
    """Build (or reuse) the Python-sources corpus (:mod:`salt_megatron.data.code_corpus`), a BPE
    tokenizer trained on an even sample of its paragraphs, and its indexed dataset.

    Files, under ``cache_dir/py<major><minor>``: ``python_code.jsonl`` (and its
    ``.manifest.json``: package versions, what was dropped, the sha256), ``tokenizer_bpe<vocab>
    .model``, ``python_code_bpe<vocab>_text_document.{bin,idx}``. ``workers`` processes clean the
    sources and tokenize (their outputs do not depend on it).
    """
    root = _python_root(cache_dir)
    paths = DemoDataPaths(
        corpus=os.path.join(root, "python_code.jsonl"),
        tokenizer_model=os.path.join(root, f"tokenizer_bpe{vocab_size}.model"),
        data_prefix=os.path.join(root, f"python_code_bpe{vocab_size}_text_document"),
    )
    return _prepare(
        root,
        paths,
        lambda path: write_code_corpus(path, workers),
        code_paragraphs,
        vocab_size,
        workers,
        progress,
        max_sentences=None,
    )
