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
                              T, k, p, sequence length, samples covered, samples per shard
    shard_000000/             samples [0, P): one directory per shard, renamed into place
      shard.json              {"start", "count", "tokens", "kept"}, written last
      counts.npy  uint16 [count, seq]   ids kept per token (<= k)
      ids.npy     int32  [kept]         the kept token ids, token after token, by probability
      logprobs.npy float16 [kept]       log q of each id (teacher softmax at T)
      residual.npy float32 [count, seq] 1 - sum of the kept q (the teacher's mass elsewhere)
      checksums.npy uint64 [count]      :func:`sample_checksum` of each sample's tokens

Per token and kept id the store holds 6 bytes, plus 6 bytes per token (count and residual).
Writes are atomic per shard (a temporary directory renamed into place), so a killed writer
leaves whole shards only; nothing is unpickled on read (``.npy`` with ``allow_pickle=False``,
JSON). A mismatch of the spec against the run, or a missing shard, is a :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from salt_megatron.data.errors import DataError

FORMAT = "salt-teacher-targets/1"
SPEC_FILE = "targets.json"
SHARD_FILE = "shard.json"
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
    format: str = FORMAT

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
            raw = json.load(f)
        spec = TargetSpec(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable teacher-targets spec: {exc}") from None
    if spec.format != FORMAT:
        raise DataError(f"{path}: format {spec.format!r}, this version reads {FORMAT!r}")
    return spec


def write_spec(root: str, spec: TargetSpec) -> None:
    """Write ``targets.json`` atomically."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{SPEC_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(asdict(spec), f, indent=2)
    os.replace(tmp, os.path.join(root, SPEC_FILE))


def shard_done(root: str, spec: TargetSpec, shard: int) -> bool:
    """Whether ``shard`` is complete for ``spec`` (its record names the expected samples)."""
    path = os.path.join(shard_dir(root, shard), SHARD_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    start, count = spec.shard_range(shard)
    return record.get("start") == start and record.get("count") == count


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
    ids first), their log-probabilities, the ``[count, seq]`` residual and the ``[count]``
    sample checksums."""
    start, count = spec.shard_range(shard)
    if ids_snk.shape[:2] != (count, spec.seq_length) or ids_snk.shape != logq_snk.shape:
        raise ValueError(f"shard {shard}: got {ids_snk.shape}, expected ({count}, "
                         f"{spec.seq_length}, k)")  # fmt: skip
    if checksums_s.dtype != np.uint64:  # Python ints above 2**63 make numpy pick float64
        raise TypeError(f"shard {shard}: checksums must be uint64, got {checksums_s.dtype}")
    kept_snk = ids_snk >= 0
    final = shard_dir(root, shard)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "counts.npy"), kept_snk.sum(-1).astype(np.uint16))
    np.save(os.path.join(tmp, "ids.npy"), ids_snk[kept_snk].astype(np.int32))
    np.save(os.path.join(tmp, "logprobs.npy"), logq_snk[kept_snk].astype(np.float16))
    np.save(os.path.join(tmp, "residual.npy"), resid_sn.astype(np.float32))
    np.save(os.path.join(tmp, "checksums.npy"), checksums_s)
    record = {"start": start, "count": count, "tokens": int(kept_snk[..., 0].size),
              "kept": int(kept_snk.sum())}  # fmt: skip
    with open(os.path.join(tmp, SHARD_FILE), "w") as f:
        json.dump(record, f)
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


class _Shard:
    """One shard, memory-mapped: CSR ids/log-probabilities with per-token offsets."""

    def __init__(self, path: str, spec: TargetSpec, start: int, count: int) -> None:
        def load(name: str) -> np.ndarray:
            return np.load(os.path.join(path, name), mmap_mode="r", allow_pickle=False)

        try:
            counts = np.asarray(load("counts.npy"), dtype=np.int64)
            self.ids, self.logq = load("ids.npy"), load("logprobs.npy")
            self.resid, self.checksums = load("residual.npy"), load("checksums.npy")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable teacher-target shard ({exc}); rerun "
                            "tools/save_teacher_targets.py to rewrite it") from None  # fmt: skip
        if (
            counts.shape != (count, spec.seq_length)
            or counts.sum() != self.ids.shape[0]
            or self.checksums.shape != (count,)
        ):
            raise DataError(f"{path}: corrupt teacher-target shard (counts {counts.shape}, "
                            f"{self.ids.shape[0]} ids); rerun the tool")  # fmt: skip
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts.reshape(-1))])
        self.start = start

    def sample(self, index: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Padded ``[seq, k]`` ids and log-probabilities and the ``[seq]`` residual."""
        row = index - self.start
        seq = self.counts.shape[1]
        lo, hi = self.offsets[row * seq], self.offsets[(row + 1) * seq]
        slots_sk = np.arange(k) < self.counts[row][:, None]
        ids_sk = np.full((seq, k), -1, dtype=np.int32)
        logq_sk = np.zeros((seq, k), dtype=np.float32)
        ids_sk[slots_sk] = self.ids[lo:hi]
        logq_sk[slots_sk] = self.logq[lo:hi]
        return ids_sk, logq_sk, np.array(self.resid[row], dtype=np.float32)  # a writable copy


class TargetStore:
    """Read access to a store: ``store.sample(i)`` -> padded ``[seq, k]`` ids (int32, -1 empty),
    log-probabilities (float32) and the ``[seq]`` residual of dataset sample ``i``."""

    def __init__(self, root: str, cache_shards: int = 4) -> None:
        self.root = root
        self.spec = read_spec(root)
        self._cache: OrderedDict[int, _Shard] = OrderedDict()
        self._cache_shards = cache_shards

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
        missing = [s for s in range(spec.num_shards) if not shard_done(self.root, spec, s)]
        if missing:
            first = spec.shard_range(missing[0])[0]
            raise DataError(
                f"{where}: {len(missing)} of {spec.num_shards} shards are missing or incomplete "
                f"(first: {shard_dir(self.root, missing[0])}, samples from {first}); rerun "
                "tools/save_teacher_targets.py with the same flags to finish them"
            )

    def _shard(self, index: int) -> _Shard:
        spec = self.spec
        if not 0 <= index < spec.covered:
            raise DataError(f"--kd-targets {self.root}: no targets for sample {index} (the store "
                            f"covers samples [0, {spec.covered}))")  # fmt: skip
        shard = index // spec.samples_per_shard
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        path = shard_dir(self.root, shard)
        if not shard_done(self.root, spec, shard):
            raise DataError(f"--kd-targets {self.root}: sample {index}: shard {path} is missing "
                            "or incomplete; rerun tools/save_teacher_targets.py")  # fmt: skip
        loaded = _Shard(path, spec, *spec.shard_range(shard))
        self._cache[shard] = loaded
        if len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return loaded

    def sample(self, index: int, checksum: int | None = None) -> dict[str, torch.Tensor]:
        """The :data:`TARGET_KEYS` tensors of dataset sample ``index``; with ``checksum`` (the
        run's :func:`sample_checksum` of that sample) the stored one must equal it."""
        shard = self._shard(index)
        if checksum is not None and int(shard.checksums[index - shard.start]) != checksum:
            raise DataError(
                f"--kd-targets {self.root}: sample {index} of this run's KD dataset is not the "
                "sample the targets were made for (its tokens differ): the data, split, --seed, "
                "--seq-length or the sample count (--train-iters x --global-batch-size, which "
                "sets megatron's shuffle) changed; make targets for this run"
            )
        ids_sk, logq_sk, resid_s = shard.sample(index, self.spec.top_k)
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
                f"{s.covered} samples in {s.num_shards} shards)")  # fmt: skip


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
