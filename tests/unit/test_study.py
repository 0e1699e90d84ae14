"""tools/study.py's bookkeeping: reached step and seconds from curves, paired-seed statistics,
the axes as data, and resumability (a finished run is reused, a partial or changed one redone).

The runs themselves are replaced by a stand-in that writes a metrics file the way the trainer
does (``tools.runs.train`` launches ``pretrain_salt.py``; its real use is the integration smoke).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools import study
from tools import study_table as table
from tools.runs import Curve


def _metrics(path: Path, steps: list[int], losses: list[float], secs: list[float]) -> None:
    """A metrics file as the trainer appends it: train and valid records per logged step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for step, loss, sec in zip(steps, losses, secs):
            f.write(json.dumps({"step": step, "group": "train", "loss": 9.0, "elapsed_s": sec}))
            f.write("\n" + json.dumps({"step": step, "group": "valid", "loss": loss}) + "\n")


def test_curve_reached_step_and_seconds(tmp_path: Path) -> None:
    _metrics(tmp_path / "m.jsonl", [10, 20, 30, 40], [6.0, 5.5, 5.2, 5.0], [1.0, 2.5, 4.0, 5.0])
    curve = Curve.read(tmp_path / "m.jsonl", wall_s=7.0)
    assert curve.steps == [10, 20, 30, 40] and curve.seconds == [1.0, 2.5, 4.0, 5.0]
    assert curve.first_step_reaching(5.5) == (20, 2.5)  # <= target, the first one
    assert curve.first_step_reaching(5.3) == (30, 4.0)
    assert curve.first_step_reaching(4.9) is None


def test_pair_against_the_same_seeds_baseline() -> None:
    base = Curve([10, 20, 30, 40], [6.0, 5.6, 5.4, 5.3], [2.0, 4.0, 6.0, 8.0], 10.0)
    salt = Curve([10, 20, 30, 40], [5.8, 5.4, 5.25, 5.1], [3.0, 5.0, 6.5, 8.5], 11.0)
    p = table.pair(7, base, salt)
    assert (p.seed, p.reached_step, p.reached_seconds) == (7, 30, 6.5)
    assert p.step_fraction == pytest.approx(0.75)
    assert p.seconds_fraction == pytest.approx(6.5 / 8.0)
    assert p.final_diff == pytest.approx(5.1 - 5.3)
    worse = table.pair(7, base, Curve([10, 40], [6.1, 5.31], [1.0, 9.0], 9.0))
    assert worse.reached_step is None and worse.step_fraction is None
    assert worse.seconds_fraction is None and worse.final_diff == pytest.approx(0.01)


def test_spread_over_seeds_and_ranking() -> None:
    s = table.Spread.of([0.75, None, 0.85])
    assert (s.mean, s.low, s.high, s.n, s.missing) == (pytest.approx(0.8), 0.75, 0.85, 2, 1)
    assert s.text(percent=True) == "80% (75% to 85%), 1 not reached"
    assert table.Spread.of([None, None]).text() == "not reached"
    assert table.Spread.of([-0.04]).text("{:+.4f}") == "-0.0400"
    assert table.Spread.of([0.6, 0.6]).text(percent=True) == "60% (every seed)"

    def row(label: str, fracs: list[int | None], diffs: list[float]) -> table.Row:
        runs = [
            table.Paired(seed, 5.0, 100, 50.0, 5.0 + d, f, None if f is None else f / 2)
            for seed, (f, d) in enumerate(zip(fracs, diffs))
        ]
        return table.Row("axis", label, "", runs)

    rows = [row("a", [90, 80], [-0.02, -0.03]), row("b", [70, None], [-0.1, 0.01]),
            row("c", [80, 80], [-0.05, -0.04]), row("d", [80, 80], [-0.01, -0.02])]  # fmt: skip
    ranked = [r.label for r in sorted(rows, key=lambda r: r.summary.rank_key)]
    assert ranked == ["c", "d", "a", "b"]  # a seed not reaching ranks last; ties by final diff
    summ = rows[1].summary
    assert summ.step_fraction.mean == pytest.approx(0.7) and summ.step_fraction.missing == 1
    assert summ.final_diff.mean == pytest.approx(-0.045)
    md = table.markdown(rows, [0, 1])
    assert "| axis | b | 70% (step 70), -0.1000 | not reached, +0.0100 |" in md
    assert md.count("\n") == len(rows) + 1


def test_axes_are_one_change_around_the_centre() -> None:
    grid = study.settings(list(study.AXES))
    c = study.CENTRE
    assert grid[0] == ("centre", c) and c.label(c) == "centre"
    keys = [s.key for _, s in grid]
    assert len(set(keys)) == len(keys)
    for axis, s in grid[1:]:
        changed = [f for f in vars(s) if getattr(s, f) != getattr(study.CENTRE, f)]
        assert len(changed) in (1, 2), (axis, changed)  # T with T^2 changes two fields
    t2 = study.Setting(temperature=2.0, t2=True)
    assert t2.label(c) == "T 2, T^2 scaling"
    strong = study.Setting(teacher=study.Teacher(steps_x=4.0))
    around = study.settings(["teacher_strength", "w0"], strong)
    assert [s.teacher.steps_x for _, s in around] == [4.0, 1.0, 2.0, 4.0]  # the centre not again
    assert around[-1][1].label(strong) == "w0 0.5"
    assert around[1][1].label(strong) == "teacher 2L h128, 1x steps"
    assert t2.flags(150) == ["--kd-steps", "45", "--kd-weight", "0.8", "--kd-schedule",
                             "linear", "--kd-temperature", "2", "--kd-t2-scaling"]  # fmt: skip
    assert study.Setting(kd_frac=0.15).kd_steps(150) == 22  # round(22.5), banker's rounding
    assert study.Setting(teacher=study.Teacher(steps_x=4)).key.startswith("t2x128-4x-")


class _Train:
    """Stands in for tools.runs.train: clears the run's directory and writes its metrics file
    (as pretrain_salt.py would), recording which runs it was asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str, config: str, extra: list[str], out: Path, *rest: object,
                 **kw: object) -> Curve:  # fmt: skip
        self.calls.append(name)
        shutil.rmtree(out / name, ignore_errors=True)
        steps = int(extra[extra.index("--train-iters") + 1])
        _metrics(out / name / "metrics.jsonl", [steps // 2, steps], [6.0, 5.0], [1.0, 2.0])
        return Curve.read(out / name / "metrics.jsonl", 3.0)


def test_finished_runs_are_reused_partial_ones_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _Train()
    monkeypatch.setattr(study, "train", runs)
    scale = study.Scale(steps=20, eval_interval=10)
    s = study.Study(tmp_path, [], scale)
    base = s.student(None, 1, {})
    assert runs.calls == ["students/baseline/seed1"] and base.losses == [6.0, 5.0]
    assert s.student(None, 1, {}).losses == [6.0, 5.0]
    assert len(runs.calls) == 1  # finished: reused, not redone

    # a run killed mid-way: its metrics stop before the last step -> redone from scratch
    run_dir = tmp_path / "students/baseline/seed2"
    (run_dir).mkdir(parents=True)
    _metrics(run_dir / "metrics.jsonl", [10], [6.0], [1.0])
    (run_dir / "done.json").write_text(json.dumps({"args": [], "wall_s": 1.0}))
    s.student(None, 2, {})
    assert runs.calls[-1] == "students/baseline/seed2"
    args = json.loads((run_dir / "done.json").read_text())["args"]
    assert study.finished(run_dir, args, 20)
    assert not study.finished(run_dir, [*args, "--kd-weight", "0.5"], 20)  # other flags: redo
    assert not study.finished(run_dir, args, 40)  # not at the last step
    (run_dir / "done.json").unlink()
    assert not study.finished(run_dir, args, 20)  # killed before done.json was written

    # a SALT run reads its teacher's checkpoint; both are cached the same way
    ckpt, teacher = s.teacher(study.Teacher(steps_x=2.0))
    assert teacher.steps == [20, 40] and ckpt == tmp_path / "teachers/t2x128-2x/ckpt"
    s.student(study.CENTRE, 1, {(study.CENTRE.teacher, None): ckpt})
    calls = len(runs.calls)
    s.teacher(study.Teacher(steps_x=2.0))
    s.student(study.CENTRE, 1, {(study.CENTRE.teacher, None): ckpt})
    assert len(runs.calls) == calls


def test_regime_columns_kd_end_and_passing_the_teacher() -> None:
    base = Curve([10, 20, 30, 40], [6.0, 5.6, 5.4, 5.3], [2.0, 4.0, 6.0, 8.0], 10.0)
    teacher = Curve([10, 20, 30, 40], [5.9, 5.7, 5.6, 5.5], [1.0, 2.0, 3.0, 4.0], 5.0)
    salt = Curve([10, 20, 30, 40], [5.8, 5.5, 5.35, 5.25], [3.0, 5.0, 6.5, 8.5], 11.0)
    p = table.pair(1, base, salt, kd_steps=15, teacher=teacher)
    assert p.diff_at_kd_end == pytest.approx(5.5 - 5.6)  # the first evaluation at/after step 15
    assert p.teacher_final == 5.5 and p.passes_teacher_step == 20  # 5.5 <= 5.5
    assert table.pair(1, base, salt, kd_steps=40).diff_at_kd_end is None  # KD the whole run
    assert table.passes_step(base, teacher) == 30 and table.passes_step(base, None) is None
    assert table.first_step_below(base, teacher) == 20  # 5.6 < 5.7: below, step for step
    assert table.first_step_below(teacher, base) == 10
    assert table.gap(salt, Curve([20, 40], [5.6, 5.3], [0.0, 0.0], 0.0)) == pytest.approx(
        {20: -0.1, 40: -0.05}
    )
    other = table.pair(2, base, Curve([10, 40], [6.1, 5.6], [1.0, 9.0], 9.0), 15, teacher)
    row = table.Row("n_kd", "n_kd 40%", "", [p, other])
    md = table.markdown([row], [1, 2])
    assert "| 100% (step 40), -0.0500; -0.1000 after KD; passes the teacher: step 20 |" in md
    assert "| not reached, +0.3000; +0.3000 after KD; passes the teacher: never |" in md
    assert md.endswith(
        "| 100%, 1 not reached | +0.1250 (-0.0500 to +0.3000) | +0.1000 (-0.1000 to +0.3000) "
        "| 20, 1 never | 106%, 1 not reached |"
    )
    assert "passes the teacher" not in table.markdown([table.Row("a", "b", "", [
        table.pair(1, base, salt)])], [1])  # fmt: skip
    ref = table.baseline_markdown({1: base}, {"t, seed 1": teacher}, {1: teacher})
    assert "| baseline, seed 1 | 5.3000 | 8.0 | 30 | 20 |" in ref


def test_regime_options_teacher_per_seed_and_axes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = study.Teacher(layers=4, hidden=128)
    centre = study.Setting(teacher=small, kd_frac=0.2, schedule="step")
    levels: dict[str, list[dict[str, object]]] = {
        **study.AXES,
        "n_kd": [{"kd_frac": f} for f in (0.1, 0.2, 0.5)],
    }
    grid = study.settings(["teacher_strength", "n_kd"], centre, levels)
    assert [s.teacher for _, s in grid[1:3]] == [
        study.Teacher(4, 128, 2.0), study.Teacher(4, 128, 4.0)
    ]  # fmt: skip
    assert [s.kd_frac for a, s in grid if a == "n_kd"] == [0.1, 0.5]  # 0.2 is the centre
    assert grid[1][1].label(centre) == "teacher 4L h128, 2x steps"

    seen: list[tuple[str, list[str]]] = []
    runs = _Train()

    def train(name: str, config: str, extra: list[str], out: Path, *a: object, **k: object):
        seen.append((name, extra))
        return runs(name, config, extra, out)

    monkeypatch.setattr(study, "train", train)
    scale = study.Scale(steps=20, eval_interval=5, seq_length=256, teacher_per_seed=True)
    s = study.Study(tmp_path, [], scale)
    assert s.teacher_seeds([1, 2]) == [1, 2]
    res = study.run_study(s, [("centre", centre)], [1, 2], jobs=1)
    teachers = {n: x for n, x in seen if n.startswith("teachers/")}
    assert sorted(teachers) == ["teachers/t4x128-1x/seed1", "teachers/t4x128-1x/seed2"]
    t2 = teachers["teachers/t4x128-1x/seed2"]
    for flag, value in (
        ("--seed", "2"),
        ("--eval-interval", "5"),
        ("--train-iters", "20"),
        ("--seq-length", "256"),
        ("--num-layers", "4"),
        ("--hidden-size", "128"),
    ):
        assert t2[t2.index(flag) + 1] == value, flag
    student2 = dict(seen)["students/t4x128-1x-kd0.2-w0.8-step-T1-on/seed2"]
    load = student2[student2.index("--kd-teacher-load") + 1]
    assert load == str(tmp_path / "teachers/t4x128-1x/seed2/ckpt")
    assert student2[student2.index("--kd-steps") + 1] == "4"
    assert set(res.own_teacher) == {1, 2} and set(res.teachers) == {
        "t4x128-1x, seed 1", "t4x128-1x, seed 2"
    }  # fmt: skip
    (row,) = res.rows
    assert [r.teacher_final for r in row.runs] == [5.0, 5.0]
    assert [r.passes_teacher_step for r in row.runs] == [20, 20]
    text = study.write_outputs(tmp_path / "tables", res, [("centre", centre)], [1, 2])
    assert "| baseline, seed 2 | 5.0000 | 2.0 | 20 | never |" in text
    assert (tmp_path / "tables" / "gap.png").stat().st_size > 0
    saved = json.loads((tmp_path / "tables" / "study.json").read_text())
    assert saved["baselines_vs_teacher"]["2"] == {
        "passes_teacher_step": 20,
        "below_teacher_from_step": None,
    }
