"""The offline teacher-target store: sparse soft targets keyed by GPT dataset sample index.

Written once by ``tools/save_teacher_targets.py``, read by every student run that trains on it
(``--kd-targets DIR``), at any TP/PP/DP layout, micro-batch size or ramp-up: a sample index is
the index into the KD phase's GPT dataset (megatron's ``GPTDataset``/``BlendedDataset``,
``dataset[i]``), and the KD phase reads samples ``i mod len(dataset)`` for
``i < kd_steps x global_batch_size`` in that order whatever the layout. Each stored sample
carries a checksum of its tokens, verified when it is read: a run whose data pipeline yields
other tokens at an index (other files, split, seed, sequence length, or a sample count that
changes megatron's shuffle) gets an error, not wrong targets.

Layout of ``DIR``::

    targets.json              the TargetSpec: format, teacher, tokenizer and dataset fingerprints,
                              T, k, p, sequence length, samples covered, samples per shard, the
                              log-probability format, the command that wrote it; its own CRC-32
    shard_000000/             samples [0, P): one directory per shard, renamed into place
      shard.json              {"start", "count", "tokens", "kept", "files": {name: [size, crc32]}}
                              and its own CRC-32, written last
      *.npy                   the targets (salt_megatron.data.target_shards)

Format 2 (written since) checks every byte: each file's CRC-32 is verified the first time a
process reads the shard, and every sample read is checked (ids below V, counts <= k). Its log-
probabilities are ``float16`` by default (uint16 ids: two thirds of format 1's bytes),
``float32``, or ``q8`` (8-bit codes with a stated error bound, packed ids and a float16
residual: a third of format 1's bytes; :mod:`salt_megatron.data.target_codec`). Format 1 stores
(int32 ids, float16 log-probabilities, no CRCs) are still read. Writes are atomic per shard (a
temporary directory renamed into place), so a killed writer leaves whole shards only; nothing is
unpickled on read (``.npy`` with ``allow_pickle=False``, JSON). A mismatch of the spec against
the run, a missing shard or a corrupt file is a :class:`DataError` naming the shard, the file
and the command to rewrite it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from salt_megatron.data.errors import DataError
from salt_megatron.data.target_codec import Layout
from salt_megatron.data.target_shards import (
    LOGPROB_FORMATS,
    SHARD_FILE,
    Q8Reader,
    RawReader,
    ShardCorrupt,
    ShardFiles,
    dumps_checked,
    loads_checked,
    read_record,
    write_files,
)

FORMAT = "salt-teacher-targets/2"
FORMAT_V1 = "salt-teacher-targets/1"
VERSIONS = {FORMAT: 2, FORMAT_V1: 1}
SPEC_FILE = "targets.json"
TARGET_KEYS = ("kd_ids", "kd_logprobs", "kd_residual")
"""Keys a :class:`TargetsDataset` sample adds to megatron's GPT sample dict."""


@dataclass(frozen=True)
class TargetSpec:
    """What a store holds: enough to refuse targets that do not belong to a run."""

    teacher: str
    """The teacher checkpoint (path and step) the targets were computed with."""
    tokenizer_fingerprint: str
    dataset_fingerprint: str
    """megatron's ``unique_description_hash`` of the KD dataset (files, split, seed, sequence
    length, sample count, tokenizer), for the record; the samples themselves are verified by
    their checksums."""
    dataset_length: int
    num_samples: int
    """Samples the KD phase reads (kd_steps x global batch); indices wrap at dataset_length."""
    seq_length: int
    vocab_size: int
    temperature: float
    top_k: int
    top_p: float | None
    samples_per_shard: int
    logprob_format: str = "float16"
    """How log-probabilities are stored: ``float16`` (the default) or ``float32`` (exact at that
    precision), or ``q8`` (8-bit codes, bounded error, a third of format 1's bytes; on the demo
    its students end within the run-to-run noise of float16's: docs/salt.md). Format 1 stores
    are ``float16``."""
    command: str = ""
    """The command that wrote the store (rerun it to rewrite a missing or corrupt shard)."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.logprob_format not in LOGPROB_FORMATS:
            raise ValueError(f"logprob_format {self.logprob_format!r} not in {LOGPROB_FORMATS}")
        if self.format not in VERSIONS:
            raise ValueError(f"format {self.format!r}, this version reads {sorted(VERSIONS)}")

    @property
    def version(self) -> int:
        """The format version (1 or 2)."""
        return VERSIONS[self.format]

    @property
    def layout(self) -> Layout:
        """Sequence length, k and V: the widths of the shard files."""
        return Layout(self.seq_length, self.top_k, self.vocab_size)

    @property
    def covered(self) -> int:
        """Distinct sample indices stored: ``[0, covered)``."""
        return min(self.num_samples, self.dataset_length)

    @property
    def num_shards(self) -> int:
        """Shards of :attr:`samples_per_shard` samples (the last one may be shorter)."""
        return math.ceil(self.covered / self.samples_per_shard)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """``(start, count)`` of the samples of ``shard``."""
        start = shard * self.samples_per_shard
        return start, min(self.samples_per_shard, self.covered - start)

    def differences(self, other: TargetSpec, ignore: tuple[str, ...] = ()) -> list[str]:
        """``"field: mine != other's"`` for every field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]

    def rerun(self) -> str:
        """The command that rewrites missing shards."""
        return self.command or "tools/save_teacher_targets.py with the flags that made the store"


def sample_checksum(sample: dict[str, Any]) -> int:
    """64-bit checksum of a GPT sample's ``seq + 1`` tokens (its tokens and its last label)."""
    tokens = np.asarray(sample["tokens"], dtype=np.int64)
    last = np.asarray(sample["labels"], dtype=np.int64)[-1:]
    digest = hashlib.blake2b(tokens.tobytes() + last.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_dir(root: str, shard: int) -> str:
    """Directory of shard ``shard`` under ``root``."""
    return os.path.join(root, f"shard_{shard:06d}")


def read_spec(root: str) -> TargetSpec:
    """The store's spec, or :class:`DataError` naming what is wrong with ``root``."""
    path = os.path.join(root, SPEC_FILE)
    if not os.path.isfile(path):
        raise DataError(f"--kd-targets {root}: no {SPEC_FILE}; not a teacher-targets directory "
                        "(tools/save_teacher_targets.py writes one)")  # fmt: skip
    try:
        with open(path) as f:
            text = f.read()
        raw = json.loads(text)
        if isinstance(raw, dict) and raw.get("format") != FORMAT_V1:
            raw = loads_checked(text, SPEC_FILE)
        spec = TargetSpec(**raw)
    except ShardCorrupt as exc:
        raise DataError(f"{path}: corrupt ({exc}); rewrite it by rerunning the command that made "
                        "the store (tools/save_teacher_targets.py)") from None  # fmt: skip
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable teacher-targets spec: {exc}") from None
    return replace(spec, logprob_format="float16") if spec.version == 1 else spec


def write_spec(root: str, spec: TargetSpec) -> None:
    """Write ``targets.json`` atomically (format 2, with its CRC-32)."""
    if spec.version != 2:
        raise ValueError(f"this version writes {FORMAT} stores, not {spec.format}")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{SPEC_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(dumps_checked(asdict(spec)))
    os.replace(tmp, os.path.join(root, SPEC_FILE))


def shard_status(root: str, spec: TargetSpec, shard: int) -> str | None:
    """None when ``shard`` is complete for ``spec``, else why not (missing, incomplete,
    corrupt record)."""
    try:
        record = read_record(shard_dir(root, shard), checked=spec.version == 2)
    except ShardCorrupt as exc:
        return f"corrupt ({exc})"
    if record is None:
        return "missing"
    start, count = spec.shard_range(shard)
    if record.get("start") != start or record.get("count") != count:
        return f"incomplete (holds {record.get('count')} samples from {record.get('start')})"
    return None


def shard_done(root: str, spec: TargetSpec, shard: int) -> bool:
    """Whether ``shard`` is complete for ``spec`` (its record names the expected samples)."""
    return shard_status(root, spec, shard) is None


def write_shard(
    root: str,
    spec: TargetSpec,
    shard: int,
    ids_snk: np.ndarray,
    logq_snk: np.ndarray,
    resid_sn: np.ndarray,
    checksums_s: np.ndarray,
) -> None:
    """Write one shard atomically from padded ``[count, seq, k]`` ids (-1 = empty slot, the kept
    ids first, by descending probability), their log-probabilities, the ``[count, seq]``
    residual and the ``[count]`` sample checksums, in ``spec.logprob_format``."""
    start, count = spec.shard_range(shard)
    if ids_snk.shape[:2] != (count, spec.seq_length) or ids_snk.shape != logq_snk.shape:
        raise ValueError(f"shard {shard}: got {ids_snk.shape}, expected ({count}, "
                         f"{spec.seq_length}, k)")  # fmt: skip
    if checksums_s.dtype != np.uint64:  # Python ints above 2**63 make numpy pick float64
        raise TypeError(f"shard {shard}: checksums must be uint64, got {checksums_s.dtype}")
    if ids_snk.size and int(ids_snk.max()) >= spec.vocab_size:
        raise ValueError(f"shard {shard}: an id >= the vocabulary size {spec.vocab_size}")
    final = shard_dir(root, shard)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = write_files(tmp, spec.layout, spec.logprob_format, ids_snk, logq_snk, resid_sn,
                        checksums_s)  # fmt: skip
    record = {"start": start, "count": count, "tokens": count * spec.seq_length,
              "kept": int((ids_snk >= 0).sum()), "files": files}  # fmt: skip
    with open(os.path.join(tmp, SHARD_FILE), "w") as f:
        f.write(dumps_checked(record))
    if os.path.isdir(final):  # a stale shard of a shorter run: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)


def remove_stale_temporaries(root: str) -> None:
    """Remove the temporary shard directories a killed writer left behind."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith("shard_") and ".tmp" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def shard_files(root: str, spec: TargetSpec, shard: int) -> ShardFiles:
    """The files of a complete shard (:class:`DataError` when it is not complete)."""
    problem = shard_status(root, spec, shard)
    if problem is not None:
        raise DataError(f"--kd-targets {root}: shard {shard_dir(root, shard)} is {problem}; "
                        f"rerun {spec.rerun()} to write it")  # fmt: skip
    path = shard_dir(root, shard)
    record = read_record(path, checked=spec.version == 2) or {}
    count = spec.shard_range(shard)[1]
    return ShardFiles(path, spec.version, spec.logprob_format, spec.layout, count, record)


def corrupt_error(root: str, spec: TargetSpec, shard: int, exc: ShardCorrupt) -> DataError:
    """The error of a corrupt shard file: the file, what is wrong, the command to rewrite it."""
    path = shard_dir(root, shard)
    return DataError(f"{os.path.join(path, str(exc))}: the teacher-target shard is corrupt; "
                     f"remove {path} and rerun {spec.rerun()} to rewrite it")  # fmt: skip


@dataclass
class StoreReport:
    """What :func:`verify_store` found."""

    spec: TargetSpec
    tokens: int
    kept: int
    """Stored ids (the mean per token is ``kept / tokens``)."""
    size: int
    """Bytes of the shard directories."""
    problems: list[str]
    """One line per bad shard: the file, what is wrong and the command to rewrite it."""


def verify_store(root: str) -> StoreReport:
    """Check a whole store offline: every shard present, each file's CRC-32 (format 2), and
    every sample decoded and checked (ids below V, counts <= k). Collects the bad shards instead
    of stopping at the first; :class:`DataError` only for a bad ``targets.json``."""
    spec = read_spec(root)
    tokens = kept = size = 0
    problems = []
    for shard in range(spec.num_shards):
        path = shard_dir(root, shard)
        status = shard_status(root, spec, shard)
        if status is not None:
            problems.append(f"{path}: {status}; rerun {spec.rerun()} to write it")
            continue
        files = shard_files(root, spec, shard)
        try:
            files.verify()
            reader = files.open()
            for row in range(files.count):
                reader.sample(row)
        except ShardCorrupt as exc:
            problems.append(str(corrupt_error(root, spec, shard, exc)))
            continue
        tokens += files.count * spec.seq_length
        kept += int(files.record.get("kept", 0))
        size += sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return StoreReport(spec, tokens, kept, size, problems)


class TargetStore:
    """Read access to a store: ``store.sample(i)`` -> padded ``[seq, k]`` ids (int32, -1 empty),
    log-probabilities (float32) and the ``[seq]`` residual of dataset sample ``i``."""

    def __init__(self, root: str, cache_shards: int = 4) -> None:
        self.root = root
        self.spec = read_spec(root)
        self._cache: OrderedDict[int, Q8Reader | RawReader] = OrderedDict()
        self._cache_shards = cache_shards
        self._verified: set[int] = set()  # shards whose files' CRC-32s this process checked

    def check_run(
        self,
        tokenizer_fingerprint: str,
        dataset: Any,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        temperature: float,
        teacher: str | None = None,
    ) -> None:
        """Refuse targets that were not made for this run's KD phase (:class:`DataError`): the
        settings must match (and the teacher, when the run names one: ``"<path> (step N)"``),
        and the store must cover the ``num_samples`` samples it reads (each sample's tokens are
        verified when it is read)."""
        spec, where = self.spec, f"--kd-targets {self.root}"
        if teacher is not None and teacher != spec.teacher:
            raise DataError(f"{where}: the targets were made with the teacher {spec.teacher}, "
                            f"--kd-teacher-load names {teacher}")  # fmt: skip
        checks = [
            ("tokenizer fingerprint", spec.tokenizer_fingerprint, tokenizer_fingerprint or ""),
            ("vocabulary size", spec.vocab_size, vocab_size),
            ("sequence length (--seq-length)", spec.seq_length, seq_length),
            ("temperature (--kd-temperature)", spec.temperature, temperature),
        ]
        for what, stored, run in checks:
            if stored != run:
                raise DataError(f"{where}: the targets were made with {what} {stored!r}, this "
                                f"run has {run!r}; make targets for this run")  # fmt: skip
        needed = min(num_samples, len(dataset))
        wraps_alike = num_samples <= len(dataset) or spec.dataset_length == len(dataset)
        if needed > spec.covered or not wraps_alike:
            raise DataError(
                f"{where}: the targets cover samples [0, {spec.covered}) of a dataset of "
                f"{spec.dataset_length}; the KD phase reads {num_samples} samples "
                f"(--kd-steps x --global-batch-size) of a dataset of {len(dataset)}; rerun "
                "tools/save_teacher_targets.py with this run's flags to add the rest"
            )
        problems = [(s, shard_status(self.root, spec, s)) for s in range(spec.num_shards)]
        bad = [(s, p) for s, p in problems if p is not None]
        if bad:
            first, what = bad[0]
            raise DataError(
                f"{where}: {len(bad)} of {spec.num_shards} shards are missing, incomplete or "
                f"corrupt (first: {shard_dir(self.root, first)}, samples from "
                f"{spec.shard_range(first)[0]}: {what}); rerun {spec.rerun()} to write them"
            )

    def read_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All of ``shard`` as :func:`write_shard` takes it: padded ``[count, seq, k]`` ids and
        log-probabilities, the ``[count, seq]`` residual and the ``[count]`` sample checksums
        (its files' CRC-32s verified, every sample checked)."""
        start, count = self.spec.shard_range(shard)
        rows = [self.sample(i) for i in range(start, start + count)]
        ids, logq, resid = (np.stack([r[key].numpy() for r in rows]) for key in TARGET_KEYS)
        checksums = np.asarray(self._shard(start)[1].checksums, dtype=np.uint64).copy()
        return ids, logq, resid, checksums

    def _shard(self, index: int) -> tuple[int, Q8Reader | RawReader]:
        spec = self.spec
        if not 0 <= index < spec.covered:
            raise DataError(f"--kd-targets {self.root}: no targets for sample {index} (the store "
                            f"covers samples [0, {spec.covered}))")  # fmt: skip
        shard = index // spec.samples_per_shard
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return shard, self._cache[shard]
        files = shard_files(self.root, spec, shard)
        try:
            if shard not in self._verified:  # once per process: the CRC-32 of every file
                files.verify()
                self._verified.add(shard)
            loaded = files.open()
        except ShardCorrupt as exc:
            raise corrupt_error(self.root, spec, shard, exc) from None
        self._cache[shard] = loaded
        if len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return shard, loaded

    def sample(self, index: int, checksum: int | None = None) -> dict[str, torch.Tensor]:
        """The :data:`TARGET_KEYS` tensors of dataset sample ``index``; with ``checksum`` (the
        run's :func:`sample_checksum` of that sample) the stored one must equal it."""
        shard, reader = self._shard(index)
        row = index - shard * self.spec.samples_per_shard
        if checksum is not None and int(reader.checksums[row]) != checksum:
            raise DataError(
                f"--kd-targets {self.root}: sample {index} of this run's KD dataset is not the "
                "sample the targets were made for (its tokens differ): the data, split, --seed, "
                "--seq-length or the sample count (--train-iters x --global-batch-size, which "
                "sets megatron's shuffle) changed; make targets for this run"
            )
        try:
            ids_sk, logq_sk, resid_s = reader.sample(row)
        except ShardCorrupt as exc:
            raise corrupt_error(self.root, self.spec, shard, exc) from None
        return {
            "kd_ids": torch.from_numpy(ids_sk),
            "kd_logprobs": torch.from_numpy(logq_sk),
            "kd_residual": torch.from_numpy(resid_s),
        }

    def describe(self) -> str:
        """One line for the log."""
        s = self.spec
        p = f", p={s.top_p}" if s.top_p is not None else ""
        return (f"{self.root} (teacher {s.teacher}; k={s.top_k}{p}, T={s.temperature}; "
                f"{s.covered} samples in {s.num_shards} shards; format {s.version}, "
                f"{s.logprob_format} log-probabilities)")  # fmt: skip


class TargetsDataset:
    """A GPT dataset whose samples carry their stored teacher targets (:data:`TARGET_KEYS`)."""

    def __init__(self, dataset: Any, store: TargetStore) -> None:
        self.dataset = dataset
        self.store = store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        return {**sample, **self.store.sample(int(index), sample_checksum(sample))}
