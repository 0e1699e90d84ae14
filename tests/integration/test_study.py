"""tools/study.py --quick --teacher-per-seed: a teacher (on the student seed's data order and
validation draw), a baseline and the centre SALT setting, 12 steps each, then the same command
again, which must reuse all three runs (resumability on real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, run_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _study(out: Path) -> str:
    args = ["--quick", "--teacher-per-seed", "--out", str(out),
            "--cache", str(REPO / "cache" / "demo")]  # fmt: skip
    proc = run_tool("study.py", args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc.stdout


def test_study_quick_then_resumed(tmp_path: Path) -> None:
    first = _study(tmp_path)
    assert "reused" not in first
    run = tmp_path / "quick" / "around-t2x128-1x-kd0.3-w0.8-linear-T1-on"  # the tables
    result = json.loads((run / "study.json").read_text())
    (centre,) = result["settings"]
    assert centre["label"] == "centre" and centre["flags"].startswith("--kd-steps 4 ")
    (paired,) = centre["runs"]
    base = result["baselines"]["1"]
    assert paired["base_final"] == base["losses"][-1] and base["steps"][-1] == 12
    assert paired["final_diff"] == pytest.approx(paired["final"] - base["losses"][-1])
    assert paired["reached_step"] in (None, 4, 8, 12)  # an evaluated step (every 4)
    teacher = result["teachers"]["t2x128-1x, seed 1"]
    assert teacher["steps"] == base["steps"] == [4, 8, 12]  # evaluated like the students
    assert paired["teacher_final"] == teacher["losses"][-1]
    assert paired["passes_teacher_step"] in (None, 4, 8, 12)
    text = (run / "study.md").read_text()
    assert "| centre | centre |" in text and "passes the teacher" in text
    for plot in ("study.png", "curves.png", "gap.png"):
        assert (run / plot).stat().st_size > 0
    again = _study(tmp_path)
    assert again.count("finished earlier, reused") == 3, again
    assert json.loads((run / "study.json").read_text()) == result
