"""tools/study.py --quick: a teacher, a baseline and the centre SALT setting, 12 steps each, then
the same command again, which must reuse all three runs (resumability on real runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, run_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _study(out: Path) -> str:
    args = ["--quick", "--out", str(out), "--cache", str(REPO / "cache" / "demo")]
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
    assert "| centre | centre |" in (run / "study.md").read_text()
    assert (run / "study.png").stat().st_size > 0 and (run / "curves.png").stat().st_size > 0
    again = _study(tmp_path)
    assert again.count("finished earlier, reused") == 3, again
    assert json.loads((run / "study.json").read_text()) == result
