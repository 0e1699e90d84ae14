"""The files of one teacher-target shard: writing (format 2), content checksums, reading.

A shard directory holds ``.npy`` files and ``shard.json``, written last. In format 2 the record
lists every file with its size and CRC-32 (``zlib.crc32`` of its bytes) and carries its own
CRC-32 (:func:`dumps_checked`: a JSON file whose bytes are not exactly the canonical text of what
it holds, checksum included, is corrupt), so one changed byte anywhere in a shard is caught when
the shard is first read (:meth:`ShardFiles.verify`). Files of a shard of ``count`` samples of
``seq`` tokens (``n`` kept ids in all; ``k`` the store's top-k, V its vocabulary)::

    logprob format q8 (salt_megatron.data.target_codec)
      blocks.npy     uint64 [count + 1]      byte offsets of each sample's block in data.npy
      data.npy       uint8  [bytes]          one deflated block per sample
    logprob formats float16, float32 (exact: the teacher's values at that precision)
      counts.npy     uint8 (k <= 255) or uint16 [count, seq]     ids kept per token
      ids.npy        uint16 (V <= 65,536) or uint32 [n]         by probability, token by token
      logprobs.npy   float16 or float32 [n]                      log q of each id at T
      residual.npy   float32 [count, seq]                        1 - sum of the kept q
    every format
      checksums.npy  uint64 [count]          the samples' token checksums

Format 1 (read only): the float16 layout with int32 ids and uint16 counts, no CRCs. Reading
checks every sample it returns (counts <= k, ids below V; q8 blocks fully) and raises
:class:`ShardCorrupt` naming the file.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import numpy as np

from salt_megatron.data import target_codec as codec

SHARD_FILE = "shard.json"
LOGPROB_FORMATS = ("q8", "float16", "float32")
_CRC_CHUNK = 1 << 22


class ShardCorrupt(Exception):
    """A shard file whose content is not what was written (``file``: its name in the shard)."""

    def __init__(self, file: str, what: str) -> None:
        super().__init__(f"{file}: {what}")
        self.file = file


def dumps_checked(obj: dict[str, Any]) -> str:
    """Canonical JSON text of ``obj`` with a ``crc32`` key: the CRC-32 of the rest's compact
    canonical form."""
    body = {k: v for k, v in obj.items() if k != "crc32"}
    crc = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return json.dumps({**body, "crc32": crc}, indent=1, sort_keys=True) + "\n"


def loads_checked(text: str, name: str) -> dict[str, Any]:
    """The content of a :func:`dumps_checked` text (without ``crc32``), or :class:`ShardCorrupt`
    when any byte of it differs from what was written."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise ShardCorrupt(name, "not valid JSON") from None
    if not isinstance(obj, dict) or "crc32" not in obj or dumps_checked(obj) != text:
        raise ShardCorrupt(name, "its content does not match its CRC-32 (changed since written)")
    return {k: v for k, v in obj.items() if k != "crc32"}


def file_crc32(path: str) -> tuple[int, int]:
    """``(size in bytes, CRC-32)`` of a file, read in 4 MiB chunks."""
    crc = size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def write_files(
    tmp: str,
    layout: codec.Layout,
    logprob_format: str,
    ids_snk: np.ndarray,
    logq_snk: np.ndarray,
    resid_sn: np.ndarray,
    checksums_s: np.ndarray,
) -> dict[str, list[int]]:
    """Write a shard's data files (format 2) into ``tmp``; returns ``{name: [size, crc32]}``.
    Inputs: padded ``[count, seq, k]`` ids (-1 empty, kept first, by probability) and
    log-probabilities, the ``[count, seq]`` residual and the ``[count]`` uint64 checksums."""
    arrays: dict[str, np.ndarray] = {"checksums.npy": checksums_s}
    n_tok = ids_snk.shape[0] * ids_snk.shape[1]
    if logprob_format == "q8":
        k = ids_snk.shape[-1]
        blocks = codec.encode(ids_snk.reshape(n_tok, k), logq_snk.reshape(n_tok, k),
                              resid_sn.reshape(-1), layout)  # fmt: skip
        sizes = np.fromiter((len(b) for b in blocks), dtype=np.uint64, count=len(blocks))
        arrays["blocks.npy"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.uint64)
        arrays["data.npy"] = np.frombuffer(b"".join(blocks), dtype=np.uint8)
    else:
        kept_snk = ids_snk >= 0
        arrays["counts.npy"] = kept_snk.sum(-1).astype(f"<u{layout.count_bytes}")
        arrays["ids.npy"] = ids_snk[kept_snk].astype(f"<u{layout.id_bytes}")
        arrays["logprobs.npy"] = logq_snk[kept_snk].astype(logprob_format)
        arrays["residual.npy"] = resid_sn.astype(np.float32)
    files = {}
    for name, array in arrays.items():
        np.save(os.path.join(tmp, name), array)
        files[name] = list(file_crc32(os.path.join(tmp, name)))
    return files


def read_record(path: str, checked: bool) -> dict[str, Any] | None:
    """A shard's ``shard.json`` (None when absent); :class:`ShardCorrupt` when ``checked``
    (format 2) and it is not exactly what was written, or when it is not JSON."""
    try:
        with open(os.path.join(path, SHARD_FILE)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardCorrupt(SHARD_FILE, f"unreadable ({exc})") from None
    if checked:
        return loads_checked(text, SHARD_FILE)
    try:
        record = json.loads(text)
    except ValueError:
        raise ShardCorrupt(SHARD_FILE, "not valid JSON") from None
    return record if isinstance(record, dict) else None


class ShardFiles:
    """One shard's files, memory-mapped, with what they must hold.

    ``fmt`` is the store's format version (1 or 2), ``logprob_format`` one of
    :data:`LOGPROB_FORMATS` (format 1: float16), ``record`` the shard's ``shard.json``.
    """

    def __init__(
        self,
        path: str,
        fmt: int,
        logprob_format: str,
        layout: codec.Layout,
        count: int,
        record: dict[str, Any],
    ) -> None:
        self.path, self.fmt, self.layout, self.count = path, fmt, layout, count
        self.q8 = fmt == 2 and logprob_format == "q8"
        self.record = record

    def names(self) -> tuple[str, ...]:
        """The data files this shard must have."""
        body = ("blocks.npy", "data.npy") if self.q8 else (
            "counts.npy", "ids.npy", "logprobs.npy", "residual.npy")  # fmt: skip
        return (*body, "checksums.npy")

    def verify(self) -> None:
        """Check every file's size and CRC-32 against the record (format 2; format 1 has none)."""
        if self.fmt == 1:
            return
        files = self.record.get("files")
        if not isinstance(files, dict):
            raise ShardCorrupt(SHARD_FILE, "no file checksums")
        for name in self.names():
            if name not in files:
                raise ShardCorrupt(SHARD_FILE, f"no checksum of {name}")
            try:
                got = list(file_crc32(os.path.join(self.path, name)))
            except OSError as exc:
                raise ShardCorrupt(name, f"unreadable ({exc})") from None
            if got != files[name]:
                raise ShardCorrupt(name, f"size and CRC-32 {got} differ from the written "
                                   f"{files[name]} (changed since written)")  # fmt: skip

    def load(self, name: str) -> np.ndarray:
        """A data file, memory-mapped (:class:`ShardCorrupt` when it is not an ``.npy``)."""
        try:
            return np.load(os.path.join(self.path, name), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ShardCorrupt(name, f"unreadable ({exc})") from None

    def open(self) -> Q8Reader | RawReader:
        """The sample reader of this shard."""
        return Q8Reader(self) if self.q8 else RawReader(self)


def _expect(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ShardCorrupt(name, what)


class Q8Reader:
    """Samples of a q8 shard: one block decoded per :meth:`sample`."""

    def __init__(self, files: ShardFiles) -> None:
        self.layout = files.layout
        self.blocks, self.data = files.load("blocks.npy"), files.load("data.npy")
        self.checksums = files.load("checksums.npy")
        count = files.count
        _expect(self.blocks.shape == (count + 1,) and self.blocks.dtype == np.uint64,
                "blocks.npy", f"shape {self.blocks.shape}, expected ({count + 1},)")  # fmt: skip
        _expect(self.checksums.shape == (count,), "checksums.npy", "wrong shape")
        ends = np.asarray(self.blocks).astype(np.int64)
        _expect(bool(ends[0] == 0 and np.all(np.diff(ends) > 0) and ends[-1] == self.data.size),
                "blocks.npy", "offsets do not tile data.npy")  # fmt: skip
        self.ends = ends

    def sample(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Padded ``[seq, k]`` ids (int32) and log-probabilities (float32), ``[seq]`` residual."""
        block = self.data[self.ends[row] : self.ends[row + 1]].data
        try:
            out = codec.decode(block, self.layout)
        except (ValueError, zlib.error) as exc:
            raise ShardCorrupt("data.npy", f"sample block {row}: {exc}") from None
        return out.ids_sk, out.logq_sk, out.resid_s


class RawReader:
    """Samples of a float16 / float32 (or format 1) shard: CSR ids with per-token offsets."""

    def __init__(self, files: ShardFiles) -> None:
        lay, count = files.layout, files.count
        counts = np.asarray(files.load("counts.npy"), dtype=np.int64)
        self.ids, self.logq = files.load("ids.npy"), files.load("logprobs.npy")
        self.resid, self.checksums = files.load("residual.npy"), files.load("checksums.npy")
        _expect(counts.shape == (count, lay.seq) and counts.max(initial=0) <= lay.top_k,
                "counts.npy", f"shape {counts.shape} or a count above k={lay.top_k}")  # fmt: skip
        n = int(counts.sum())
        _expect(self.ids.shape == (n,) and self.logq.shape == (n,), "ids.npy", f"not {n} ids")
        _expect(self.resid.shape == (count, lay.seq), "residual.npy", "wrong shape")
        _expect(self.checksums.shape == (count,), "checksums.npy", "wrong shape")
        self.counts, self.layout = counts, lay
        self.offsets = np.concatenate([[0], np.cumsum(counts.reshape(-1))])

    def sample(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Padded ``[seq, k]`` ids (int32) and log-probabilities (float32), ``[seq]`` residual."""
        seq, k = self.layout.seq, self.layout.top_k
        lo, hi = self.offsets[row * seq], self.offsets[(row + 1) * seq]
        ids = np.asarray(self.ids[lo:hi])
        if ids.size and (int(ids.max()) >= self.layout.vocab_size or int(ids.min()) < 0):
            raise ShardCorrupt("ids.npy", f"sample {row}: an id outside [0, "
                               f"{self.layout.vocab_size})")  # fmt: skip
        slots_sk = np.arange(k) < self.counts[row][:, None]
        ids_sk = np.full((seq, k), -1, dtype=np.int32)
        logq_sk = np.zeros((seq, k), dtype=np.float32)
        ids_sk[slots_sk] = ids
        logq_sk[slots_sk] = self.logq[lo:hi]
        return ids_sk, logq_sk, np.array(self.resid[row], dtype=np.float32)  # a writable copy
