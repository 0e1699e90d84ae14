"""SALT on stored teacher targets, end to end: tools/save_teacher_targets.py at world 2, resumed
at world 1; training on them equals training with the online teacher (k = V, exact float32
log-probabilities); PP=2 x VPP=2 and TP=2 with sequence parallelism on the same targets equal
world 1.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO, _env, launch, read_metrics
from tests.integration.test_salt_kd import COMMON, TEACHER
from tests.integration.test_salt_kd import STUDENT as KD_STUDENT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDENT = [*KD_STUDENT, "--num-layers", "4", "--train-iters", "8"]  # as test_salt_kd's layouts


def _ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stdout[-5000:]
    return str(proc.stdout)


def _save_targets(args: list[str], nproc: int) -> str:
    tool = str(REPO / "tools" / "save_teacher_targets.py")
    cmd = [sys.executable, tool, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", tool, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, check=False)  # fmt: skip
    return _ok(proc)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A teacher checkpoint and its stored targets with every id kept (k = V)."""
    root = tmp_path_factory.mktemp("kd_targets")
    teacher = root / "teacher"
    _ok(launch([*COMMON, *TEACHER, "--save", str(teacher)], nproc=1))
    out = root / "targets"
    args = ["--out", str(out), "--top-k", "256", "--logprob-format", "float32", *COMMON, *STUDENT,
            "--kd-teacher-load", str(teacher)]  # fmt: skip
    log = _save_targets(args, nproc=2)
    assert "24 samples (768 tokens) in 8 shards" in log and "256.00 ids per token" in log
    # a lost shard is recomputed by a rerun at another layout, identically
    kept = root / "shard_000005.saved"
    shutil.move(str(out / "shard_000005"), kept)
    rerun = _save_targets(args, nproc=1)
    assert "3/3" in rerun  # only that shard's 3 samples
    match, mismatch, errors = filecmp.cmpfiles(kept, out / "shard_000005", os.listdir(kept))
    assert not mismatch and not errors and len(match) == 6, (mismatch, errors)
    return teacher, out


def _train(extra: list[str], nproc: int, metrics: Path) -> tuple[dict[int, dict[str, Any]], str]:
    log = _ok(launch([*COMMON, *STUDENT, *extra, "--metrics-file", str(metrics)], nproc=nproc))
    return read_metrics(metrics), log


def test_stored_targets_replay_the_teacher_at_any_layout(
    store: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, targets = store
    online, _ = _train(["--kd-teacher-load", str(teacher)], 1, tmp_path / "online.jsonl")
    ref, log = _train(["--kd-targets", str(targets)], 1, tmp_path / "world1.jsonl")
    assert "stored teacher targets" in log and "no teacher model" in log
    assert "teacher: " not in log  # no teacher was built
    assert sorted(ref) == list(range(1, 9))
    # k = V, a zero residual and exact (float32) log-probabilities: the sparse loss is the
    # dense one up to float32 rounding; at step 1 (same weights), then through Adam
    for key in ("loss", "kd_loss", "top1_agree", "grad_norm"):
        assert ref[1][key] == pytest.approx(online[1][key], rel=1e-5, abs=1e-6), key
    for s in range(2, 7):
        assert ref[s]["loss"] == pytest.approx(online[s]["loss"], rel=1e-4), s
    layouts = {  # the first names its teacher too: checked against the store, not built
        "pp2-vpp2": (["--pipeline-model-parallel-size", "2", "--kd-teacher-load", str(teacher),
                      "--virtual-pipeline-model-parallel-size", "2"], 2),
        "tp2-sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),
    }  # fmt: skip
    for name, (extra, nproc) in layouts.items():
        got, log = _train(["--kd-targets", str(targets), *extra], nproc, tmp_path / f"{name}.jsonl")
        assert sorted(got) == list(range(1, 9)) and "teacher: " not in log, name
        for s in range(1, 9):  # tolerance: see test_salt_kd's layout test
            for key in ("loss", "grad_norm") + (("kd_loss", "top1_agree") if s <= 6 else ()):
                assert got[s][key] == pytest.approx(ref[s][key], rel=1e-4, abs=1e-5), (name, s)
