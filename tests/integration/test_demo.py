"""The README's main job, quick variant: teacher -> baseline and SALT students (TP=2, teacher TP=1),
then the teacher's stored targets and a SALT student trained on them.

Checks the SALT run went through the KD phase and the switch with finite losses, released the
teacher, and wrote the KD scalars to TensorBoard; that the offline student trained on stored
targets without a teacher; and that the report compares the three students.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _tb_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in tb_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/demo.py"), "--quick", "--out", str(out),
         "--cache", str(ROOT / "cache" / "demo")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = out / "quick"
    salt = [json.loads(x) for x in (run / "salt/metrics.jsonl").read_text().splitlines()]
    train = [r for r in salt if r["group"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train)
    kd_steps = 16  # tools/demo.py QUICK
    assert any(r["step"] <= kd_steps and r["kd_weight"] > 0 for r in train)
    assert any(r["step"] > kd_steps and "kd_weight" not in r for r in train)  # plain windows
    assert any(r["group"] == "kd" and r["teacher_freed_mib"] > 0 for r in salt)
    log = (run / "salt/log.txt").read_text()
    assert "KD phase over, teacher released" in log
    tags = _tb_tags(run / "salt/tb")
    for tag in ("train/loss", "train/lm_loss", "train/kd_loss", "train/kd_weight",
                "train/top1_agree", "train/teacher_time_share", "kd/teacher_freed_mib",
                "valid/loss"):  # fmt: skip
        assert tag in tags, f"{tag} missing from TensorBoard ({sorted(tags)})"
    offline = (run / "salt_offline/log.txt").read_text()
    assert "stored teacher targets" in offline and "no teacher model" in offline
    report = (run / "results.md").read_text()
    assert "baseline student" in report and "SALT, online teacher" in report
    assert "SALT, stored targets" in report and "ids per token kept" in report
    assert (run / "val_loss.png").stat().st_size > 0
