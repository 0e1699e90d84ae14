"""Read back Weights & Biases offline runs (``WANDB_MODE=offline``) for the tests.

An offline run is a directory ``<dir>/wandb/offline-run-<time>-<id>/`` whose ``run-<id>.wandb``
file is the run's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) and then
LevelDB-log records in 32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type: full, first,
middle, last), each payload one ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32 * 1024
_FULL, _LAST = 1, 4


@dataclass
class OfflineRun:
    """What a test checks of a run: its names, config and history (by step, key -> value)."""

    name: str
    project: str
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)


def offline_runs(directory: str | Path) -> list[Path]:
    """The offline run directories under a ``wandb.init(dir=directory)``, oldest first."""
    return sorted(Path(directory).glob("wandb/offline-run-*"))


def _payloads(data: bytes) -> list[bytes]:
    assert data[: len(HEADER)] == HEADER, f"not a W&B transaction log: {data[:7]!r}"
    pos, parts, out = len(HEADER), [], []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (_FULL, _LAST):
            out.append(b"".join(parts))
            parts = []
    return out


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``run_dir``'s ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log_file,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun(name="", project="")
    for payload in _payloads(log_file.read_bytes()):
        record = pb.Record()  # type: ignore[attr-defined]
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.project = record.run.display_name, record.run.project
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            run.history.setdefault(int(row["_step"]), {}).update(row)
            continue
        else:
            continue
        run.config.update({u.key: json.loads(u.value_json) for u in updates})
    return run
