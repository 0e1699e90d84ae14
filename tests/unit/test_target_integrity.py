"""Every byte of a teacher-target store is checked: a changed byte in any file is a named error
(the file, and the command that rewrites it) at the first read and in ``--verify``; ids stay
below V; format 1 stores (a fixture written by the format-1 code) still read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from salt_megatron.data.errors import DataError
from salt_megatron.data.target_shards import SHARD_FILE, dumps_checked, file_crc32
from salt_megatron.data.teacher_targets import (
    SPEC_FILE,
    TargetsDataset,
    TargetSpec,
    TargetStore,
    read_spec,
    shard_dir,
    verify_store,
)
from tests.unit.test_teacher_targets import _Samples, _spec, write_store
from tools import save_teacher_targets

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "teacher_targets_v1"
COMMAND = "python tools/save_teacher_targets.py --out DIR --top-k 4 --config x.yaml"
V1_SEQ, V1_K, V1_VOCAB, V1_SAMPLES, V1_PER_SHARD = 5, 3, 40, 5, 3


def v1_content(shard: int, count: int) -> tuple[np.ndarray, ...]:
    """What the fixture's shards hold: padded ids by probability (int32), float32 log q,
    residual, checksums. The fixture was written from these by the format-1 code (commit 2ce26cd,
    ``teacher_targets.write_shard``, ``samples_per_shard`` 3, temperature 1, no top-p)."""
    rng = np.random.default_rng(100 + shard)
    ids = np.stack([rng.choice(V1_VOCAB, size=V1_K, replace=False)
                    for _ in range(count * V1_SEQ)]).reshape(count, V1_SEQ, V1_K)  # fmt: skip
    q = rng.dirichlet(np.ones(V1_K + 1), size=(count, V1_SEQ))[..., :V1_K]
    q = np.sort(q, axis=-1)[..., ::-1]
    kept = rng.integers(1, V1_K + 1, size=(count, V1_SEQ))
    keep = np.arange(V1_K) < kept[..., None]
    ids = np.where(keep, ids, -1).astype(np.int32)
    logq = np.where(keep, np.log(q), 0.0).astype(np.float32)
    resid = (1.0 - np.where(keep, q, 0.0).sum(-1)).astype(np.float32)
    sums = rng.integers(0, 2**63, size=count, dtype=np.uint64)
    return ids, logq, resid, sums


def _store(tmp_path: Path, fmt: str) -> tuple[Path, TargetSpec]:
    root = tmp_path / fmt
    spec = _spec(logprob_format=fmt, command=COMMAND)
    write_store(root, spec, _Samples(100))
    return root, spec


def _flip(path: Path, pos: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= mask
    path.write_bytes(bytes(data))


def _positions(path: Path) -> list[int]:
    """Every byte of the JSON files (any change must break their canonical text or CRC);
    32 bytes spread over header and data of the others (their CRC covers every byte alike)."""
    size = path.stat().st_size
    if path.suffix == ".json":
        return list(range(size))
    return sorted({*range(0, 128, 16), *np.linspace(128, size - 1, 24).astype(int).tolist()})


@pytest.mark.parametrize("fmt", ["q8", "float16"])
def test_a_changed_byte_in_any_file_is_a_named_error(tmp_path: Path, fmt: str) -> None:
    root, _ = _store(tmp_path, fmt)
    shard1 = Path(shard_dir(str(root), 1))
    files = [root / SPEC_FILE, *sorted(shard1.iterdir())]
    kinds = {p.name for p in files}
    assert kinds == {SPEC_FILE, SHARD_FILE, "checksums.npy"} | (
        {"blocks.npy", "data.npy"} if fmt == "q8"
        else {"counts.npy", "ids.npy", "logprobs.npy", "residual.npy"}
    )  # fmt: skip
    checked = 0
    for path in files:
        original = path.read_bytes()
        for pos in _positions(path):
            for mask in (0x01, 0x80) if path.suffix == ".json" else (0x01,):
                _flip(path, pos, mask)
                with pytest.raises(DataError) as caught:
                    TargetStore(str(root)).sample(5)  # sample 5 lives in shard 1
                message = str(caught.value)
                assert path.name in message, (path.name, pos, message)
                if path.name != SPEC_FILE:  # the shard and the command that rewrites it
                    assert str(shard1) in message and COMMAND in message, message
                path.write_bytes(original)
                checked += 1
    assert checked >= 2 * sum(p.stat().st_size for p in files if p.suffix == ".json")
    assert TargetStore(str(root)).sample(5)["kd_ids"].shape == (6, 4)  # all restored


def test_four_overwritten_bytes_of_ids_stop_training(tmp_path: Path) -> None:
    """The issue's case: four bytes in the middle of ids.npy overwritten, same size; the run's
    data path (TargetsDataset) stops at the shard's first read, and --verify names it."""
    root, _ = _store(tmp_path, "float16")
    ids = Path(shard_dir(str(root), 2)) / "ids.npy"
    data = bytearray(ids.read_bytes())
    mid = len(data) - np.load(ids).nbytes // 2  # in the ids, not the header
    data[mid : mid + 4] = b"\x07\x00\x07\x00"  # two valid ids (7 < V)
    ids.write_bytes(bytes(data))
    wrapped = TargetsDataset(_Samples(100), TargetStore(str(root)))
    wrapped[0]  # shards 0 and 1 are intact
    expected = (r"shard_000002/ids\.npy: size and CRC-32 .* corrupt; remove .*shard_000002 "
                r"and rerun python tools/save_teacher_targets\.py --out DIR")  # fmt: skip
    with pytest.raises(DataError, match=expected):
        wrapped[8]
    report = verify_store(str(root))
    assert len(report.problems) == 1 and "shard_000002/ids.npy" in report.problems[0]


def test_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    """A shard whose CRCs match but whose ids do not fit V (a writer's bug) is refused on read."""
    root, _ = _store(tmp_path, "float16")
    path = Path(shard_dir(str(root), 0))
    ids = np.load(path / "ids.npy")
    ids[3] = 50  # V = 50
    np.save(path / "ids.npy", ids)
    record = json.loads((path / SHARD_FILE).read_text())
    record["files"]["ids.npy"] = list(file_crc32(str(path / "ids.npy")))
    (path / SHARD_FILE).write_text(dumps_checked(record))
    with pytest.raises(DataError, match=r"ids\.npy: sample 0: an id outside \[0, 50\)"):
        TargetStore(str(root)).sample(0)


def test_format_1_stores_still_read() -> None:
    spec = read_spec(str(FIXTURE))
    assert spec.version == 1 and spec.logprob_format == "float16" and spec.num_shards == 2
    store = TargetStore(str(FIXTURE))
    for shard in range(spec.num_shards):
        start, count = spec.shard_range(shard)
        ids, logq, resid, sums = v1_content(shard, count)
        for row in range(count):
            got = store.sample(start + row, checksum=int(sums[row]))
            assert np.array_equal(got["kd_ids"].numpy(), ids[row])
            assert np.array_equal(got["kd_logprobs"].numpy(), logq[row].astype(np.float16))
            assert np.array_equal(got["kd_residual"].numpy(), resid[row])
    report = verify_store(str(FIXTURE))
    assert not report.problems and report.tokens == V1_SAMPLES * V1_SEQ


def test_tool_help_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert save_teacher_targets.main(["--help"]) == 0
    assert "--logprob-format" in capsys.readouterr().out
    assert save_teacher_targets.main([]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    root, _ = _store(tmp_path, "q8")
    assert save_teacher_targets.main(["--verify", str(root)]) == 0
    assert "the store is whole" in capsys.readouterr().out
    _flip(Path(shard_dir(str(root), 2)) / "data.npy", 200, 0x10)
    os.remove(Path(shard_dir(str(root), 0)) / SHARD_FILE)
    assert save_teacher_targets.main(["--verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert "shard_000000: missing" in err and "shard_000002/data.npy" in err and COMMAND in err
    assert "2 of 3 shards are bad" in err
