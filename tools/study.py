"""SALT at CPU scale: a grid of KD settings against the baseline, two seeds, one axis at a time.

Around a centre setting (the demo's KD settings), each axis varies one thing: the teacher's
strength (the same teacher trained 1x/2x/4x the student's steps), its size, ``n_kd`` as a
fraction of the run, ``w0``, the schedule, T with and without T^2 scaling, online vs stored
targets. Every student of seed s (the baseline and each SALT run) starts from the same weights
and reads the same data in the same order; each SALT run is compared with the baseline of its
seed (:mod:`tools.study_table`). Teachers are trained once per teacher setting and stored targets
once per (teacher, KD phase, seed); every finished run is kept on disk (``<out>/``) with a
``done.json``, so rerunning the command after a kill continues where it stopped.

    python tools/study.py                          # round 1: around the demo's centre
    python tools/study.py --teacher-steps-x 4 --axes n_kd w0 schedule targets   # round 2
    python tools/study.py --axes w0 schedule --seeds 1 2 3 --steps 300
    python tools/study.py --quick                  # a 2-run smoke (integration test)

Runs go to ``<out>/s<steps>/`` (teachers/, targets/, students/<setting>/seed<s>/, shared by
every centre); the tables of a centre to ``<out>/s<steps>/around-<centre>/``: ``study.md``,
``study.json``, ``study.png`` (reached-step fraction and final-loss difference per setting and
seed) and ``curves.png`` (validation loss of the first seed's baseline, centre and best setting).
Scale: student and teacher as the demo's configs, at 8 sequences per step and world size 1, so
that two runs share the 2 cores (``--jobs 2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import study_table as table  # noqa: E402
from tools.runs import Curve, demo_data_flags, plot, store_targets, train  # noqa: E402


@dataclass(frozen=True)
class Teacher:
    """A teacher setting: its size and its steps as a multiple of the student's."""

    layers: int = 2
    hidden: int = 128
    steps_x: float = 1.0

    @property
    def key(self) -> str:
        return f"t{self.layers}x{self.hidden}-{self.steps_x:g}x"


@dataclass(frozen=True)
class Setting:
    """One SALT setting; ``kd_frac`` is n_kd as a fraction of the student's steps."""

    teacher: Teacher = field(default_factory=Teacher)
    kd_frac: float = 0.3
    w0: float = 0.8
    schedule: str = "linear"
    temperature: float = 1.0
    t2: bool = False
    offline: bool = False
    gate: float | None = None  # --kd-gate teacher-confidence --kd-gate-threshold P; None: off

    @property
    def key(self) -> str:
        """Directory name: every field, so equal settings of two axes share their runs."""
        return (
            f"{self.teacher.key}-kd{self.kd_frac:g}-w{self.w0:g}-{self.schedule}"
            f"-T{self.temperature:g}{'sq' if self.t2 else ''}-{'off' if self.offline else 'on'}"
            + ("" if self.gate is None else f"-gate{self.gate:g}")
        )

    def label(self, centre: Setting) -> str:
        """What differs from ``centre`` (``centre`` for the centre itself)."""
        parts = []
        for f in dataclasses.fields(self):
            value, ref = getattr(self, f.name), getattr(centre, f.name)
            if value == ref:
                continue
            if isinstance(value, Teacher):
                parts.append(f"teacher {value.layers}L h{value.hidden}, {value.steps_x:g}x steps")
            else:
                parts.append(LABELS[f.name](value))
        return ", ".join(parts) or "centre"

    def kd_steps(self, steps: int) -> int:
        return max(1, round(self.kd_frac * steps))

    def flags(self, steps: int) -> list[str]:
        """The KD flags of ``pretrain_salt.py`` (the teacher or targets flag aside)."""
        return [
            "--kd-steps", str(self.kd_steps(steps)), "--kd-weight", f"{self.w0:g}",
            "--kd-schedule", self.schedule, "--kd-temperature", f"{self.temperature:g}",
            *(["--kd-t2-scaling"] if self.t2 else []),
            *([] if self.gate is None else
              ["--kd-gate", "teacher-confidence", "--kd-gate-threshold", f"{self.gate:g}"]),
        ]  # fmt: skip


LABELS: dict[str, Callable[[object], str]] = {
    "kd_frac": lambda v: f"n_kd {v:.0%} of the steps",
    "w0": lambda v: f"w0 {v:g}",
    "schedule": lambda v: f"schedule {v}",
    "temperature": lambda v: f"T {v:g}",
    "t2": lambda v: "T^2 scaling" if v else "no T^2 scaling",
    "offline": lambda v: "stored targets" if v else "online teacher",
    "gate": lambda v: "no gate" if v is None else f"KD where the teacher's top-1 p >= {v:g}",
}
CENTRE = Setting()  # the demo's KD settings, its teacher trained as long as the student
# One axis at a time around a centre: each entry lists the changes to the centre on that axis
# (a change that leaves the centre as it is is skipped).
AXES: dict[str, list[dict[str, object]]] = {  # in the order they run
    "teacher_strength": [{"teacher": Teacher(steps_x=x)} for x in (1.0, 2.0, 4.0)],
    "n_kd": [{"kd_frac": 0.15}, {"kd_frac": 0.6}, {"kd_frac": 1.0}],
    "w0": [{"w0": 0.5}],
    "schedule": [{"schedule": "step"}, {"schedule": "linear_ratio"}],
    "targets": [{"offline": True}],
    "combined": [{"kd_frac": 0.6, "schedule": "step"}],  # the two best changes of round 2
    "gate": [{"gate": 0.1}, {"gate": 0.3}],
    "temperature": [{"temperature": 2.0}, {"temperature": 2.0, "t2": True}],
    "teacher_size": [{"teacher": Teacher(layers=1, hidden=64)}],
}


def settings(axes: list[str], centre: Setting = CENTRE) -> list[tuple[str, Setting]]:
    """(axis, setting): the centre first, then each chosen axis' variations in order."""
    grid = [("centre", centre)]
    for axis in axes:
        for change in AXES[axis]:
            varied = dataclasses.replace(centre, **change)  # type: ignore[arg-type]
            if varied != centre:
                grid.append((axis, varied))
    return grid


@dataclass(frozen=True)
class Scale:
    """The study's run shape: student steps and batch, evaluation, processes per run."""

    steps: int = 150
    global_batch: int = 8
    eval_interval: int = 10
    eval_iters: int = 4
    nproc: int = 1
    threads: int = 1
    student: tuple[str, ...] = ()  # extra student flags (the quick smoke's smaller model)

    def common(self, iters: int, eval_interval: int) -> list[str]:
        return [
            "--train-iters", str(iters), "--global-batch-size", str(self.global_batch),
            "--eval-interval", str(eval_interval), "--eval-iters", str(self.eval_iters),
            "--log-interval", str(eval_interval), "--lr-warmup-iters", str(max(1, iters // 20)),
        ]  # fmt: skip

    def student_flags(self, seed: int) -> list[str]:
        return [
            *self.common(self.steps, self.eval_interval), "--seed", str(seed),
            "--tensor-model-parallel-size", str(self.nproc), *self.student,
        ]  # fmt: skip


QUICK = Scale(steps=12, eval_interval=4, eval_iters=2,
              student=("--num-layers", "2", "--hidden-size", "128"))  # fmt: skip


def finished(run_dir: Path, args: list[str], last_step: int) -> bool:
    """A run is finished when its ``done.json`` records these exact flags and its metrics file
    holds the evaluation of its last step."""
    done, metrics = run_dir / "done.json", run_dir / "metrics.jsonl"
    if not (done.is_file() and metrics.is_file()):
        return False
    if json.loads(done.read_text()).get("args") != args:
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return any(r["group"] == "valid" and r["step"] == last_step for r in records)


class Study:
    """Runs (or reuses) the teachers, stored targets, baselines and SALT students under ``out``."""

    def __init__(self, out: Path, data: list[str], scale: Scale) -> None:
        self.out, self.data, self.scale = out, data, scale

    def _run(self, name: str, config: str, args: list[str], last_step: int) -> Curve:
        run_dir = self.out / name
        if finished(run_dir, args, last_step):
            print(f"== {name}: finished earlier, reused", flush=True)
            wall = json.loads((run_dir / "done.json").read_text())["wall_s"]
            return Curve.read(run_dir / "metrics.jsonl", wall)
        s = self.scale
        curve = train(name, config, args, self.out, self.data, s.nproc, s.threads, echo=False)
        (run_dir / "done.json").write_text(json.dumps({"args": args, "wall_s": curve.wall_s}))
        print(f"== {name}: final validation loss {curve.losses[-1]:.4f}, {curve.seconds[-1]:.0f} s "
              f"training, {curve.wall_s:.0f} s wall", flush=True)  # fmt: skip
        return curve

    def teacher(self, t: Teacher) -> tuple[Path, Curve]:
        steps = round(t.steps_x * self.scale.steps)
        name = f"teachers/{t.key}"
        ckpt = self.out / name / "ckpt"
        args = [*self.scale.common(steps, max(1, steps // 4)), "--num-layers", str(t.layers),
                "--hidden-size", str(t.hidden), "--save", str(ckpt)]  # fmt: skip
        return ckpt, self._run(name, "demo_teacher.yaml", args, steps)

    def targets(self, setting: Setting, seed: int, ckpt: Path) -> Path:
        """The stored targets of ``setting``'s KD phase for ``seed`` (made once, then reused)."""
        s = self.scale
        flags = [*s.student_flags(seed), *setting.flags(s.steps)]
        where = self.out / "targets" / f"{setting.teacher.key}-kd{setting.kd_steps(s.steps)}"
        path = where / f"T{setting.temperature:g}-seed{seed}"
        done = path.with_name(path.name + ".done.json")
        if done.is_file() and json.loads(done.read_text()).get("args") == flags:
            return path
        where.mkdir(parents=True, exist_ok=True)
        tpass = store_targets(ckpt, flags, path, self.data, nproc=s.nproc, threads=s.threads,
                              echo=False)  # fmt: skip
        done.write_text(json.dumps({"args": flags, **dataclasses.asdict(tpass)}))
        return path

    def student(self, setting: Setting | None, seed: int, teachers: dict[Teacher, Path]) -> Curve:
        """The baseline (``setting`` None) or a SALT student of ``seed``."""
        s = self.scale
        args = s.student_flags(seed)
        if setting is None:
            return self._run(f"students/baseline/seed{seed}", "demo_student.yaml",
                             [*args, "--kd-steps", "0"], s.steps)  # fmt: skip
        ckpt = teachers[setting.teacher]
        source = (["--kd-targets", str(self.targets(setting, seed, ckpt))] if setting.offline
                  else ["--kd-teacher-load", str(ckpt)])  # fmt: skip
        args = [*args, *setting.flags(s.steps), *source]
        return self._run(f"students/{setting.key}/seed{seed}", "demo_student.yaml", args, s.steps)


@dataclass
class Results:
    """What a study ran: the table rows, the baselines and teachers, every student's curve."""

    rows: list[table.Row]
    bases: dict[int, Curve]
    teachers: dict[str, Curve]
    curves: dict[tuple[Setting, int], Curve]


def run_study(
    study: Study, grid: list[tuple[str, Setting]], seeds: list[int], jobs: int
) -> Results:
    """Teachers first, then the students, ``jobs`` at a time: baselines, then each setting's
    seeds in the order of ``grid``."""
    kinds = list(dict.fromkeys(s.teacher for _, s in grid))
    with ThreadPoolExecutor(jobs) as pool:
        made = dict(zip(kinds, pool.map(study.teacher, kinds)))
        teachers = {t: ckpt for t, (ckpt, _) in made.items()}
        todo: list[Setting | None] = [None, *dict.fromkeys(s for _, s in grid)]
        futures = {(s, seed): pool.submit(study.student, s, seed, teachers)
                   for s in todo for seed in seeds}  # fmt: skip
        done = {k: f.result() for k, f in futures.items()}
    bases = {seed: done[None, seed] for seed in seeds}
    curves = {(s, seed): c for (s, seed), c in done.items() if s is not None}
    centre = grid[0][1]
    rows = [
        table.Row(
            axis,
            s.label(centre),
            " ".join(s.flags(study.scale.steps)),
            [table.pair(seed, bases[seed], curves[s, seed]) for seed in seeds],
        )
        for axis, s in grid
    ]
    return Results(rows, bases, {t.key: c for t, (_, c) in made.items()}, curves)


def write_outputs(
    out: Path, res: Results, grid: list[tuple[str, Setting]], seeds: list[int]
) -> str:
    """study.md, study.json, study.png and curves.png (the first seed's baseline, centre and
    best setting) under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    centre = grid[0][1]
    text = table.baseline_markdown(res.bases, res.teachers) + "\n\n"
    text += table.markdown(res.rows, seeds)
    order = sorted(range(len(grid)), key=lambda i: res.rows[i].summary.rank_key)
    text += "\n\nBest first (seeds not reaching, then mean reached-step fraction, then mean "
    text += "final diff): " + "; ".join(
        f"{res.rows[i].label} ({res.rows[i].summary.step_fraction.text(percent=True)})"
        for i in order
    )
    (out / "study.md").write_text(text + "\n")
    payload = table.to_json(res.rows, res.bases, res.teachers)
    (out / "study.json").write_text(json.dumps(payload, indent=1))
    table.plot_summary(res.rows, seeds, out / "study.png")
    best = grid[order[0]][1]
    seed = seeds[0]
    curves = {"baseline": res.bases[seed], "SALT centre": res.curves[centre, seed]}
    if best != centre:
        curves[f"SALT best: {best.label(centre)}"] = res.curves[best, seed]
    plot(curves, out / "curves.png", title=f"seed {seed}; centre: {centre.key}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--axes", nargs="*", default=None, choices=list(AXES),
                        help="axes varied around the centre (all; none with --quick)")  # fmt: skip
    parser.add_argument("--teacher-steps-x", type=float, default=CENTRE.teacher.steps_x,
                        help="the centre teacher's steps / the student's")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=Scale.steps, help="student steps")
    parser.add_argument("--eval-interval", type=int, default=Scale.eval_interval)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1 process each)")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per run")
    parser.add_argument("--quick", action="store_true", help="tiny 2-run smoke: centre vs baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    parser.add_argument("--tables", default=None,
                        help="tables folder in <out>/s<steps>/ (around-<centre>)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "demo")
    args = parser.parse_args()
    centre = dataclasses.replace(CENTRE, teacher=Teacher(steps_x=args.teacher_steps_x))
    if args.quick:
        scale, grid, seeds = QUICK, settings(args.axes or [], centre), args.seeds[:1]
    else:
        scale = Scale(steps=args.steps, eval_interval=args.eval_interval, threads=args.threads)
        grid = settings(list(AXES) if args.axes is None else args.axes, centre)
        seeds = args.seeds
    out = args.out / ("quick" if args.quick else f"s{scale.steps}")
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, demo_data_flags(args.cache), scale)
    res = run_study(study, grid, seeds, max(1, args.jobs))
    tables = out / (args.tables or f"around-{centre.key}")
    print("\n" + write_outputs(tables, res, grid, seeds))
    print(f"\ntables and plots: {tables}/study.md, study.json, study.png, curves.png")


if __name__ == "__main__":
    main()
