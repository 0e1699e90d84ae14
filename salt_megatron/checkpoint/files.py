"""Filesystem side of checkpointing: atomic commit, keep-last pruning, completeness checks.

A save writes ``iter_N.tmp/``; only when every rank has written its shards and the metadata is
on disk does rank 0 rename it to ``iter_N/`` and then point the tracker file at ``N`` (write a
temporary file + ``os.replace``). A crash at any point leaves the tracker on the previous complete
checkpoint; a leftover ``.tmp`` directory is ignored by loads and removed by the next save.

None of these functions communicate: the callers run them on rank 0 (commit, prune) or on every
rank (verify, resolve: they read the same files, so every rank reaches the same verdict).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

from salt_megatron.checkpoint import layout
from salt_megatron.checkpoint.layout import CheckpointError

log = logging.getLogger("salt_megatron")

MEGATRON_METADATA = "metadata.json"
DCP_METADATA = ".metadata"
COMMON_FILE = "common.pt"


def prepare_tmp(root: str, step: int) -> str:
    """Create an empty ``iter_N.tmp`` (removing a stale one from a crashed save); return it."""
    tmp = layout.tmp_dir(root, step)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(root: str, step: int, keep_last: int) -> str:
    """Rename the finished ``iter_N.tmp`` to ``iter_N``, update the tracker, prune; return the dir.

    An existing ``iter_N`` (the same step saved again) is replaced.
    """
    tmp, final = layout.tmp_dir(root, step), layout.iteration_dir(root, step)
    if not os.path.isdir(tmp):
        raise CheckpointError(f"{tmp}: nothing to commit (the save did not write it)")
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    layout.write_latest_step(root, step)
    prune(root, keep_last, keep=step)
    return final


def prune(root: str, keep_last: int, keep: int | None = None) -> list[int]:
    """Delete all but the newest ``keep_last`` iteration dirs (never ``keep``) and stale ``.tmp``.

    Returns the deleted steps.
    """
    steps = layout.saved_steps(root)
    doomed = [s for s in steps[: max(len(steps) - keep_last, 0)] if s != keep]
    for step in doomed:
        shutil.rmtree(layout.iteration_dir(root, step), ignore_errors=True)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("iter_") and name.endswith(layout.TMP_SUFFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    return doomed


def _read_dcp_metadata(ckpt_dir: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(ckpt_dir, DCP_METADATA)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint, {DCP_METADATA} is missing")
    try:
        return FileSystemReader(ckpt_dir).read_metadata()
    except Exception as exc:  # unpickling garbage raises anything
        raise CheckpointError(
            f"{path}: corrupt torch-distributed metadata ({type(exc).__name__}: {exc})"
        ) from None


def _check_storage(ckpt_dir: str, metadata: Any) -> None:
    """Every shard file the metadata references exists and is long enough."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{ckpt_dir}: shard file {name} is missing")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(
                f"{path}: truncated shard file ({size} bytes, the metadata needs {end})"
            )


def verify(ckpt_dir: str) -> dict[str, Any]:
    """Check that ``ckpt_dir`` is a complete, readable checkpoint; return its ``salt_meta.json``.

    Raises :class:`CheckpointError` naming the missing, truncated or corrupt file.
    """
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory is missing")
    meta = layout.read_meta(ckpt_dir)
    mpath = os.path.join(ckpt_dir, MEGATRON_METADATA)
    try:
        with open(mpath) as f:
            json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir}: incomplete checkpoint, {MEGATRON_METADATA} is missing"
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{mpath}: corrupt metadata ({exc})") from None
    if not os.path.isfile(os.path.join(ckpt_dir, COMMON_FILE)):
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint, {COMMON_FILE} is missing")
    _check_storage(ckpt_dir, _read_dcp_metadata(ckpt_dir))
    return meta


@dataclass(frozen=True)
class Resolved:
    """The checkpoint a load will read."""

    step: int
    path: str
    meta: dict[str, Any]


def resolve(root: str, fallback: bool) -> Resolved | None:
    """The checkpoint to resume from under ``root``; None when there is none yet.

    The tracker names the newest complete checkpoint. If it fails :func:`verify`, the error is
    raised unless ``fallback`` (``--fallback-to-previous``) is set; then the newest older
    checkpoint that verifies is used (with a warning).
    """
    step = layout.read_latest_step(root)
    if step is None:
        return None
    path = layout.iteration_dir(root, step)
    try:
        return Resolved(step, path, verify(path))
    except CheckpointError as exc:
        older = [s for s in reversed(layout.saved_steps(root)) if s < step]
        if not fallback:
            hint = f"; --fallback-to-previous would try iter_{older[0]:07d}" if older else ""
            raise CheckpointError(f"cannot resume from {root}: {exc}{hint}") from None
        for prev in older:
            prev_path = layout.iteration_dir(root, prev)
            try:
                meta = verify(prev_path)
            except CheckpointError as prev_exc:
                log.warning(f"--fallback-to-previous: skipping {prev_path}: {prev_exc}")
                continue
            log.warning(f"latest checkpoint unusable ({exc}); falling back to {prev_path}")
            return Resolved(prev, prev_path, meta)
        raise CheckpointError(
            f"cannot resume from {root}: {exc}; no earlier complete checkpoint to fall back to"
        ) from None
