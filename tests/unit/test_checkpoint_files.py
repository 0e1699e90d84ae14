"""Checkpoint directory mechanics: tracker, atomic commit, keep-last, verify, resolve/fallback."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter, save

from salt_megatron.checkpoint import files, layout
from salt_megatron.checkpoint.layout import CheckpointError


def _fake_checkpoint(root: Path, step: int, commit: bool = True) -> Path:
    """A real torch-DCP directory plus megatron's and our metadata files, committed at ``step``."""
    tmp = Path(files.prepare_tmp(str(root), step))
    save({"w": torch.arange(64.0)}, storage_writer=FileSystemWriter(str(tmp)), no_dist=True)
    (tmp / files.MEGATRON_METADATA).write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({"scheduler": {}}, tmp / files.COMMON_FILE)
    layout.write_meta(str(tmp), {"step": step})
    if commit:
        files.commit(str(root), step, keep_last=10)
    return Path(layout.iteration_dir(str(root), step))


def test_tracker_roundtrip_is_atomic(tmp_path: Path) -> None:
    assert layout.read_latest_step(str(tmp_path)) is None
    layout.write_latest_step(str(tmp_path), 120)
    assert layout.read_latest_step(str(tmp_path)) == 120
    assert os.listdir(tmp_path) == [layout.TRACKER_FILE]  # no temporary left behind
    (tmp_path / layout.TRACKER_FILE).write_text("12x")
    with pytest.raises(CheckpointError, match="expected a step number"):
        layout.read_latest_step(str(tmp_path))


def test_commit_renames_then_points_tracker(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path, 5)
    assert path.is_dir() and not Path(layout.tmp_dir(str(tmp_path), 5)).exists()
    assert layout.read_latest_step(str(tmp_path)) == 5
    assert files.verify(str(path)) == {"step": 5}
    with pytest.raises(CheckpointError, match="nothing to commit"):
        files.commit(str(tmp_path), 6, keep_last=2)


def test_crash_during_save_leaves_previous_loadable(tmp_path: Path) -> None:
    """An unrenamed iter_N.tmp is ignored by resolve and cleaned by the next commit."""
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, commit=False)  # "crashed" before the rename
    assert layout.saved_steps(str(tmp_path)) == [10]
    resolved = files.resolve(str(tmp_path), fallback=False)
    assert resolved is not None and resolved.step == 10
    _fake_checkpoint(tmp_path, 30)
    assert not list(tmp_path.glob("*.tmp"))
    assert layout.saved_steps(str(tmp_path)) == [10, 30]


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    assert files.prune(str(tmp_path), keep_last=2) == [1, 2]
    assert layout.saved_steps(str(tmp_path)) == [3, 4]
    assert files.prune(str(tmp_path), keep_last=1, keep=3) == []  # never the protected step
    assert layout.saved_steps(str(tmp_path)) == [3, 4]


def test_commit_replaces_same_step(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 7)
    path = _fake_checkpoint(tmp_path, 7)
    assert layout.saved_steps(str(tmp_path)) == [7] and files.verify(str(path))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: next(p.glob("*.distcp")).unlink(), r"shard file .*\.distcp is missing"),
        (lambda p: next(p.glob("*.distcp")).write_bytes(b"x"), "truncated shard file"),
        (lambda p: (p / ".metadata").write_bytes(b"\x80\x04junk"), "corrupt torch-distributed"),
        (lambda p: (p / ".metadata").unlink(), r"\.metadata is missing"),
        (lambda p: (p / "metadata.json").write_text("{"), "corrupt metadata"),
        (lambda p: (p / "common.pt").unlink(), "common.pt is missing"),
        (lambda p: (p / layout.META_FILE).unlink(), "salt_meta.json is missing"),
    ],
)
def test_verify_names_the_damage(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    path = _fake_checkpoint(tmp_path, 3)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        files.verify(str(path))


def test_resolve_fallback_only_when_asked(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 10)
    bad = _fake_checkpoint(tmp_path, 20)
    (bad / ".metadata").write_bytes(pickle.dumps("not metadata")[:5])
    with pytest.raises(CheckpointError, match="fallback-to-previous would try iter_0000010"):
        files.resolve(str(tmp_path), fallback=False)
    resolved = files.resolve(str(tmp_path), fallback=True)
    assert resolved is not None and resolved.step == 10
    (Path(layout.iteration_dir(str(tmp_path), 10)) / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="no earlier complete checkpoint"):
        files.resolve(str(tmp_path), fallback=True)


def test_resolve_missing_directory_named_by_tracker(tmp_path: Path) -> None:
    layout.write_latest_step(str(tmp_path), 40)
    with pytest.raises(CheckpointError, match="iter_0000040: checkpoint directory is missing"):
        files.resolve(str(tmp_path), fallback=False)
    assert files.resolve(str(tmp_path / "empty"), fallback=False) is None
