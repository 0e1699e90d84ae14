"""Converting a teacher-target store to another format (``save_teacher_targets.py --convert``):
the copy reads back exactly as a store written in that format from the teacher's own targets,
keeps the samples' checksums, resumes after a kill and refuses a corrupt source."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from salt_megatron.data.errors import DataError
from salt_megatron.data.target_convert import convert_store
from salt_megatron.data.teacher_targets import (
    TargetsDataset,
    TargetStore,
    read_spec,
    shard_dir,
)
from tests.unit.test_teacher_targets import _Samples, _spec, write_store
from tools.save_teacher_targets import main as save_main


@pytest.mark.parametrize("fmt", ["q8", "float16"])
def test_a_converted_store_equals_one_written_in_that_format(tmp_path: Path, fmt: str) -> None:
    data = _Samples(100)
    write_store(tmp_path / "src", _spec(logprob_format="float32"), data)
    write_store(tmp_path / "direct", _spec(logprob_format=fmt), data)
    dst = tmp_path / "dst"
    assert save_main(["--convert", str(tmp_path / "src"), "--out", str(dst),
                      "--logprob-format", fmt]) == 0  # fmt: skip
    spec = read_spec(str(dst))
    assert spec.logprob_format == fmt and spec.version == 2 and "--convert" in spec.command
    direct, converted = TargetStore(str(tmp_path / "direct")), TargetStore(str(dst))
    for i in range(spec.covered):
        want, got = direct.sample(i), converted.sample(i)
        for key in want:
            assert torch.equal(got[key], want[key]), (i, key)
    TargetsDataset(data, converted)[7]  # the samples' checksums came along
    assert save_main(["--verify", str(dst)]) == 0


def test_convert_resumes_and_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_store(src, _spec(logprob_format="float32"), _Samples(100))
    spec = convert_store(str(src), str(dst), "q8", "cmd")
    kept = Path(shard_dir(str(dst), 0)) / "data.npy"
    stamp = kept.stat().st_mtime_ns
    gone = Path(shard_dir(str(dst), 1))
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    assert convert_store(str(src), str(dst), "q8", "cmd") == spec  # a killed conversion goes on
    assert kept.stat().st_mtime_ns == stamp and TargetStore(str(dst)).sample(5)
    with pytest.raises(DataError, match=r"holds another store.*logprob_format"):
        convert_store(str(src), str(dst), "float16", "cmd")
    with pytest.raises(DataError, match="is the source"):
        convert_store(str(src), str(src), "q8", "cmd")
    logprobs = Path(shard_dir(str(src), 2)) / "logprobs.npy"
    raw = bytearray(logprobs.read_bytes())
    raw[-3] ^= 0x01
    logprobs.write_bytes(bytes(raw))
    other = tmp_path / "other"
    with pytest.raises(DataError, match=r"logprobs\.npy.*corrupt"):
        convert_store(str(src), str(other), "q8", "cmd")
    assert not os.path.isdir(shard_dir(str(other), 2))  # no copy of a corrupt shard
    assert np.load(Path(shard_dir(str(other), 0)) / "checksums.npy").size == 4
