"""JSONL / plain text -> Megatron ``.bin/.idx`` through megatron-core's ``IndexedDatasetBuilder``.

Same output as Megatron-LM's ``tools/preprocess_data.py`` (document level): one document per
JSON line (per blank-line-separated block of a text file), ``add_document`` per document, the
end-of-document token appended to every non-empty document, the smallest dtype megatron's
``DType.optimal_dtype`` picks for the vocabulary (uint16 below 65500 ids, else int32).

Workers tokenize batches of raw lines (JSON parsing and UTF-8 decoding happen there too, then one
batched encode per batch: the ``tokenizers`` library's ``encode_batch`` for Hugging Face
tokenizers); the parent writes them in input order, so the output does not depend on the worker
count. Outputs
are written under temporary names and renamed at the end; ``<prefix>.tokenizer.json`` is
written last and marks the dataset complete.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from salt_megatron.data.corpus import BadLines, decode_record, iter_raw_records
from salt_megatron.data.errors import DataError
from salt_megatron.data.indexed import tokenizer_record_path, write_tokenizer_record
from salt_megatron.data.tokenizer import load_tokenizer

_BATCH_RECORDS = 256
Batch = tuple[str, list[tuple[int, bytes]]]
Encoded = tuple[int, "np.ndarray | None", int, "str | None"]  # line, ids, bytes, error

_worker_tokenizer: Any = None
_worker_options: tuple[str, bool] = ("text", True)


@dataclass
class PreprocessStats:
    """Counts and throughput of one :func:`preprocess_files` run."""

    output_prefix: str
    dtype: str
    workers: int
    documents: int = 0
    empty_documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    bad_lines: BadLines = field(default_factory=BadLines)

    @property
    def docs_per_s(self) -> float:
        """Documents per second."""
        return self.documents / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        """Tokens (eod included) per second."""
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        """Input megabytes (1e6 bytes) per second."""
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def format(self) -> str:
        """Closing summary, several lines."""
        lines = [
            f"wrote {self.output_prefix}.bin/.idx ({self.dtype}, {self.workers} worker(s))",
            f"  documents {self.documents} ({self.empty_documents} empty), tokens {self.tokens}",
            f"  {self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s: "
            f"{self.docs_per_s:,.0f} docs/s, {self.tokens_per_s:,.0f} tokens/s, "
            f"{self.mb_per_s:.2f} MB/s",
        ]
        if self.bad_lines.count:
            lines.append(self.bad_lines.format())
        return "\n".join(lines)


def _init_worker(
    model_path: str, tokenizer_type: str | None, json_key: str, append_eod: bool, pool: bool
) -> None:
    """Load the tokenizer once per worker process (``pool``: one of several processes)."""
    global _worker_tokenizer, _worker_options
    if pool:  # the processes are the parallelism: keep the Rust tokenizer single-threaded
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(model_path, tokenizer_type)
    _worker_options = (json_key, append_eod)


def _encode_batch(batch: Batch) -> list[Encoded]:
    """Decode and tokenize one batch of raw records; errors are returned, not raised."""
    assert _worker_tokenizer is not None, "worker not initialised"
    json_key, append_eod = _worker_options
    path, records = batch
    texts: dict[int, str] = {}
    errors: dict[int, str] = {}
    for k, (lineno, raw) in enumerate(records):
        try:
            texts[k] = decode_record(raw, path, lineno, json_key)
        except DataError as err:
            errors[k] = str(err)
    encoded = dict(zip(texts, _worker_tokenizer.tokenize_batch(list(texts.values()))))
    eod = [_worker_tokenizer.eod] if append_eod else []
    out: list[Encoded] = []
    for k, (lineno, raw) in enumerate(records):
        if k in errors:
            out.append((lineno, None, len(raw), errors[k]))
            continue
        ids = encoded[k] + eod if encoded[k] else []
        out.append((lineno, np.asarray(ids, dtype=np.int32), len(raw), None))
    return out


def _batches(paths: Sequence[str]) -> Iterator[Batch]:
    """Raw records of all files, in order, ``_BATCH_RECORDS`` at a time."""
    for path in paths:
        records: list[tuple[int, bytes]] = []
        for record in iter_raw_records(path):
            records.append(record)
            if len(records) == _BATCH_RECORDS:
                yield path, records
                records = []
        if records:
            yield path, records


def _encoded_batches(
    paths: Sequence[str],
    tokenizer: tuple[str, str | None],
    json_key: str,
    append_eod: bool,
    workers: int,
) -> Iterator[list[Encoded]]:
    """Tokenized batches in input order: in-process for one worker, else a process pool.

    ``tokenizer``: ``(--tokenizer-model, --tokenizer-type)``, loaded in each worker.
    """
    if workers <= 1:
        _init_worker(*tokenizer, json_key, append_eod, False)
        yield from map(_encode_batch, _batches(paths))
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(workers, _init_worker, (*tokenizer, json_key, append_eod, True)) as pool:
        yield from pool.imap(_encode_batch, _batches(paths), chunksize=1)


def _write(
    stats: PreprocessStats,
    encoded: Iterator[list[Encoded]],
    builder: object,
    skip_bad_lines: bool,
    progress: tqdm,
) -> None:
    """Add every encoded document to the builder, counting into ``stats``."""
    add_document = builder.add_document  # type: ignore[attr-defined]
    for batch in encoded:
        for _lineno, ids, nbytes, error in batch:
            stats.input_bytes += nbytes
            progress.update(nbytes)
            if error is not None:
                if not skip_bad_lines:
                    raise DataError(error)
                stats.bad_lines.add(error)
                continue
            assert ids is not None
            add_document(ids, [len(ids)] if len(ids) else [])
            stats.documents += 1
            stats.tokens += len(ids)
            stats.empty_documents += not len(ids)


def _commit(prefix: str, tmp_bin: str, tmp_idx: str, tokenizer: Any) -> None:
    """Rename the finished files into place; the tokenizer record goes last (completion mark)."""
    if os.path.exists(tokenizer_record_path(prefix)):
        os.remove(tokenizer_record_path(prefix))
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")
    write_tokenizer_record(
        prefix,
        tokenizer.fingerprint,
        tokenizer.vocab_size,
        os.path.abspath(tokenizer.path),
        type(tokenizer).__name__,
    )


@contextlib.contextmanager
def atomic_indexed_builder(output_prefix: str, tokenizer: Any) -> Iterator[Any]:
    """A megatron ``IndexedDatasetBuilder`` writing to temporary names, committed on success.

    On a clean exit the ``.bin/.idx`` are renamed into place and the tokenizer record written
    last (the completion mark); on an exception nothing is left behind.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_bin = f"{output_prefix}.bin.tmp{os.getpid()}"
    tmp_idx = f"{output_prefix}.idx.tmp{os.getpid()}"
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        yield builder
        builder.finalize(tmp_idx)
        _commit(output_prefix, tmp_bin, tmp_idx, tokenizer)
    finally:
        if builder is not None:
            builder.data_file.close()  # finalize() closed it already on success
        for tmp in (tmp_bin, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)


def preprocess_files(
    inputs: Sequence[str | os.PathLike[str]],
    output_prefix: str,
    tokenizer_model: str,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    skip_bad_lines: bool = False,
    progress: bool = True,
    tokenizer_type: str | None = None,
) -> PreprocessStats:
    """Tokenize ``inputs`` (JSONL or text, in order) into ``output_prefix.bin/.idx``.

    ``tokenizer_model``/``tokenizer_type``: see :func:`salt_megatron.data.load_tokenizer`.
    Also writes ``output_prefix.tokenizer.json`` (fingerprint, vocab size, model path). A bad
    record raises :class:`DataError` naming file and line, unless ``skip_bad_lines``, which
    counts and reports them (``stats.bad_lines``). No output is left behind on failure.
    """
    from megatron.core.datasets.indexed_dataset import DType

    paths = [str(p) for p in inputs]
    if not paths:
        raise DataError("no input files given")
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
    if append_eod:
        tokenizer.eod  # noqa: B018 - a tokenizer without an end-of-document token fails here
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    stats = PreprocessStats(output_prefix, np.dtype(dtype).name, max(1, workers))
    total = sum(os.path.getsize(p) for p in paths)
    start = time.perf_counter()
    with atomic_indexed_builder(output_prefix, tokenizer) as builder:
        encoded = _encoded_batches(
            paths, (tokenizer.path, tokenizer_type), json_key, append_eod, workers
        )
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            disable=not progress,
            desc=os.path.basename(output_prefix),
        ) as bar:
            _write(stats, encoded, builder, skip_bad_lines, bar)
        if stats.documents == 0:
            raise DataError(f"no valid documents in {', '.join(paths)}")
    stats.seconds = time.perf_counter() - start
    return stats
