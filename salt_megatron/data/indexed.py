"""Checks on Megatron ``.bin/.idx`` datasets and the tokenizer record kept beside them.

Megatron's own ``IndexedDataset`` asserts (or mmaps garbage) on a missing ``.idx``, a truncated
``.bin`` or a foreign file; :func:`validate_indexed_dataset` reads the ``.idx`` header itself and
checks both files' sizes first, raising :class:`DataError` naming the file.

``<prefix>.tokenizer.json`` records which tokenizer produced the token ids (its fingerprint,
vocabulary size and model path). Preprocessing writes it last, so its presence also marks the
dataset as complete.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from salt_megatron.data.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}  # megatron's DType enum
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8


@dataclass(frozen=True)
class IndexInfo:
    """What a dataset's ``.idx`` says about it."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int
    bin_bytes: int


def tokenizer_record_path(prefix: str) -> str:
    """``<prefix>.tokenizer.json``."""
    return f"{prefix}.tokenizer.json"


def _read_idx_header(idx_path: str) -> tuple[type, int, int]:
    """``(dtype, sequence_count, document_count)`` from an ``.idx`` file."""
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise DataError(f"{idx_path}: not a Megatron index file (bad or short header)")
    version, code = struct.unpack("<QB", head[9:18])
    if version != 1 or code not in _DTYPE_CODES:
        raise DataError(f"{idx_path}: unsupported index version {version} / dtype code {code}")
    seqs, docs = struct.unpack("<QQ", head[18:34])
    return _DTYPE_CODES[code], seqs, docs


def validate_indexed_dataset(prefix: str) -> IndexInfo:
    """Check that ``prefix.bin`` and ``prefix.idx`` exist and agree in size; describe them.

    Raises :class:`DataError` for a missing prefix, a ``.bin`` without its ``.idx`` (or the
    reverse), a truncated or foreign ``.idx``, and a ``.bin`` whose size differs from what the
    index says.
    """
    bin_path, idx_path = f"{prefix}.bin", f"{prefix}.idx"
    has_bin, has_idx = os.path.isfile(bin_path), os.path.isfile(idx_path)
    if not has_bin and not has_idx:
        hint = " (give the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise DataError(
            f"dataset prefix {prefix} does not exist: no {bin_path} or {idx_path}{hint}"
        )
    if not has_idx:
        raise DataError(f"{bin_path} has no index file {idx_path}")
    if not has_bin:
        raise DataError(f"{idx_path} has no data file {bin_path}")
    dtype, seqs, docs = _read_idx_header(idx_path)
    expected_idx = _HEADER_BYTES + seqs * 4 + seqs * 8 + docs * 8
    idx_size = os.path.getsize(idx_path)
    if idx_size < expected_idx:
        raise DataError(f"{idx_path}: truncated index ({idx_size} bytes, expected {expected_idx})")
    num_tokens = int(read_sequence_lengths(prefix).sum(dtype=np.int64))
    expected_bin = num_tokens * np.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        state = "truncated" if bin_size < expected_bin else "larger than its index says"
        raise DataError(
            f"{bin_path}: {state} ({bin_size} bytes; {idx_path} describes {expected_bin})"
        )
    return IndexInfo(prefix, dtype, seqs, max(docs - 1, 0), num_tokens, bin_size)


def read_sequence_lengths(prefix: str) -> np.ndarray:
    """The per-sequence token counts of a (validated) dataset, memory-mapped."""
    _, seqs, _ = _read_idx_header(f"{prefix}.idx")
    if seqs == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(f"{prefix}.idx", dtype=np.int32, mode="r", offset=_HEADER_BYTES, shape=(seqs,))


def write_tokenizer_record(
    prefix: str, fingerprint: str, vocab_size: int, model_path: str, kind: str | None = None
) -> str:
    """Write ``<prefix>.tokenizer.json`` atomically; return its path."""
    path = tokenizer_record_path(prefix)
    tmp = f"{path}.tmp{os.getpid()}"
    record: dict[str, Any] = {
        "fingerprint": fingerprint,
        "vocab_size": int(vocab_size),
        "model_path": model_path,
    }
    if kind is not None:
        record["type"] = kind
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_tokenizer_record(prefix: str) -> dict[str, Any] | None:
    """The tokenizer record of ``prefix``, or ``None`` if there is none."""
    path = tokenizer_record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable tokenizer record ({err})") from err
    if not isinstance(record, dict) or "fingerprint" not in record:
        raise DataError(f"{path}: tokenizer record without a fingerprint")
    return record


def check_tokenizer_record(prefix: str, tokenizer: Any, require: bool = True) -> None:
    """Check that ``prefix`` was tokenized by ``tokenizer`` (same fingerprint).

    A missing record raises :class:`DataError` when ``require`` (data from other tools can be
    stamped with :func:`write_tokenizer_record`), else passes.
    """
    record = read_tokenizer_record(prefix)
    if record is None:
        if require:
            raise DataError(
                f"{tokenizer_record_path(prefix)} is missing: cannot check that {prefix} was "
                "tokenized with this tokenizer (re-run tools/preprocess_data.py, or pass "
                "verify_tokenizer=False)"
            )
        return
    ours = getattr(tokenizer, "fingerprint", None)
    if record["fingerprint"] != ours:
        raise DataError(
            f"tokenizer mismatch for dataset {prefix}: it was tokenized with fingerprint "
            f"{record['fingerprint']} ({record.get('model_path')}), but the tokenizer given has "
            f"fingerprint {ours} ({getattr(tokenizer, 'path', type(tokenizer).__name__)})"
        )
