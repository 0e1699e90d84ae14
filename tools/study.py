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

The regime round (docs/results.md): the Python-sources corpus, a teacher of about half the
student's parameters trained per seed on the student's tokens for the same steps, runs long
enough for the student to pass it:

    python tools/study.py --corpus code --out runs/regime --steps 1200 --eval-interval 60 \
        --eval-iters 8 --seq-length 256 --student-layers 4 --student-hidden 192 \
        --teacher-layers 4 --teacher-hidden 128 --teacher-per-seed --kd-frac 0.25 \
        --schedule step --axes n_kd schedule --n-kd 0.1 0.5 1.0 --schedules linear \
        --tables regime

Runs go to ``<out>/s<steps>/`` (teachers/, targets/, students/<setting>/seed<s>/, shared by
every centre); the tables of a centre to ``<out>/s<steps>/around-<centre>/``: ``study.md``,
``study.json``, ``study.png`` (reached-step fraction and final-loss difference per setting and
seed), ``curves.png`` (validation loss of the first seed's baseline, centre and best setting,
and its teacher with ``--teacher-per-seed``) and ``gap.png`` (each setting's loss minus the
paired baseline's against step).
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
from tools.runs import Curve, data_flags, plot, store_targets, train  # noqa: E402


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
    "teacher_strength": [{"teacher_steps_x": x} for x in (1.0, 2.0, 4.0)],  # the centre's shape
    "n_kd": [{"kd_frac": 0.15}, {"kd_frac": 0.6}, {"kd_frac": 1.0}],
    "w0": [{"w0": 0.5}],
    "schedule": [{"schedule": "step"}, {"schedule": "linear_ratio"}],
    "targets": [{"offline": True}],
    "combined": [{"kd_frac": 0.6, "schedule": "step"}],  # the two best changes of round 2
    "gate": [{"gate": 0.1}, {"gate": 0.3}],
    "temperature": [{"temperature": 2.0}, {"temperature": 2.0, "t2": True}],
    "teacher_size": [{"teacher": Teacher(layers=1, hidden=64)}],
}


def settings(
    axes: list[str],
    centre: Setting = CENTRE,
    table: dict[str, list[dict[str, object]]] | None = None,
) -> list[tuple[str, Setting]]:
    """(axis, setting): the centre first, then each chosen axis' variations in order (from
    ``table``, by default :data:`AXES`); ``teacher_steps_x`` changes the centre teacher's steps."""
    grid = [("centre", centre)]
    for axis in axes:
        for change in (table or AXES)[axis]:
            change = dict(change)
            if "teacher_steps_x" in change:
                steps_x = float(change.pop("teacher_steps_x"))  # type: ignore[arg-type]
                change["teacher"] = dataclasses.replace(centre.teacher, steps_x=steps_x)
            varied = dataclasses.replace(centre, **change)  # type: ignore[arg-type]
            if varied != centre and varied not in (s for _, s in grid):
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
    student: tuple[str, ...] = ()  # extra student flags (its shape; the quick smoke's smaller one)
    seq_length: int | None = None  # None: the configs' (128)
    # True: each seed has its own teacher, trained with the student's seed (the same tokens in
    # the same order) and evaluated every eval_interval steps on the student's validation draw
    teacher_per_seed: bool = False

    def common(self, iters: int, eval_interval: int) -> list[str]:
        seq = [] if self.seq_length is None else ["--seq-length", str(self.seq_length)]
        return [
            "--train-iters", str(iters), "--global-batch-size", str(self.global_batch),
            "--eval-interval", str(eval_interval), "--eval-iters", str(self.eval_iters),
            "--log-interval", str(eval_interval), "--lr-warmup-iters", str(max(1, iters // 20)),
            *seq,
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

    def teacher_seeds(self, seeds: list[int]) -> list[int | None]:
        """The seeds teachers are trained for: each student seed, or one (None) for all."""
        return list(seeds) if self.scale.teacher_per_seed else [None]

    def teacher(self, t: Teacher, seed: int | None = None) -> tuple[Path, Curve]:
        """Train (or reuse) teacher ``t``: with ``seed``, on that student seed's data order and
        evaluated like its students; else with the config's seed, evaluated 4 times."""
        s = self.scale
        steps = round(t.steps_x * s.steps)
        name = f"teachers/{t.key}" + ("" if seed is None else f"/seed{seed}")
        ckpt = self.out / name / "ckpt"
        interval = max(1, steps // 4) if seed is None else s.eval_interval
        seeded = [] if seed is None else ["--seed", str(seed)]
        args = [*s.common(steps, interval), *seeded, "--num-layers", str(t.layers),
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

    def student(
        self, setting: Setting | None, seed: int, teachers: dict[tuple[Teacher, int | None], Path]
    ) -> Curve:
        """The baseline (``setting`` None) or a SALT student of ``seed``; ``teachers`` maps
        (teacher, its seed or None) to its checkpoint."""
        s = self.scale
        args = s.student_flags(seed)
        if setting is None:
            return self._run(f"students/baseline/seed{seed}", "demo_student.yaml",
                             [*args, "--kd-steps", "0"], s.steps)  # fmt: skip
        ckpt = teachers[setting.teacher, seed if s.teacher_per_seed else None]
        source = (["--kd-targets", str(self.targets(setting, seed, ckpt))] if setting.offline
                  else ["--kd-teacher-load", str(ckpt)])  # fmt: skip
        args = [*args, *setting.flags(s.steps), *source]
        return self._run(f"students/{setting.key}/seed{seed}", "demo_student.yaml", args, s.steps)


@dataclass
class Results:
    """What a study ran: the table rows, the baselines and teachers, every student's curve;
    ``own_teacher`` holds each seed's centre teacher when teachers are trained per seed."""

    rows: list[table.Row]
    bases: dict[int, Curve]
    teachers: dict[str, Curve]
    curves: dict[tuple[Setting, int], Curve]
    own_teacher: dict[int, Curve] = field(default_factory=dict)


def _teacher_name(t: Teacher, seed: int | None) -> str:
    return t.key if seed is None else f"{t.key}, seed {seed}"


def run_study(
    study: Study, grid: list[tuple[str, Setting]], seeds: list[int], jobs: int
) -> Results:
    """Teachers first, then the students, ``jobs`` at a time: baselines, then each setting's
    seeds in the order of ``grid``."""
    kinds = [(t, ts) for t in dict.fromkeys(s.teacher for _, s in grid)
             for ts in study.teacher_seeds(seeds)]  # fmt: skip
    with ThreadPoolExecutor(jobs) as pool:
        made = dict(zip(kinds, pool.map(lambda k: study.teacher(*k), kinds)))
        teachers = {k: ckpt for k, (ckpt, _) in made.items()}
        todo: list[Setting | None] = [None, *dict.fromkeys(s for _, s in grid)]
        futures = {(s, seed): pool.submit(study.student, s, seed, teachers)
                   for s in todo for seed in seeds}  # fmt: skip
        done = {k: f.result() for k, f in futures.items()}
    bases = {seed: done[None, seed] for seed in seeds}
    curves = {(s, seed): c for (s, seed), c in done.items() if s is not None}
    centre = grid[0][1]
    own = {}
    if study.scale.teacher_per_seed:
        own = {seed: made[centre.teacher, seed][1] for seed in seeds}
    rows = [
        table.Row(
            axis,
            s.label(centre),
            " ".join(s.flags(study.scale.steps)),
            [
                table.pair(
                    seed,
                    bases[seed],
                    curves[s, seed],
                    s.kd_steps(study.scale.steps),
                    made[s.teacher, seed][1] if study.scale.teacher_per_seed else None,
                )
                for seed in seeds
            ],
        )
        for axis, s in grid
    ]
    named = {_teacher_name(t, ts): c for (t, ts), (_, c) in made.items()}
    return Results(rows, bases, named, curves, own)


def write_outputs(
    out: Path, res: Results, grid: list[tuple[str, Setting]], seeds: list[int]
) -> str:
    """study.md, study.json, study.png and curves.png (the first seed's baseline, centre and
    best setting) under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    centre = grid[0][1]
    text = table.baseline_markdown(res.bases, res.teachers, res.own_teacher) + "\n\n"
    text += table.markdown(res.rows, seeds)
    order = sorted(range(len(grid)), key=lambda i: res.rows[i].summary.rank_key)
    text += "\n\nBest first (seeds not reaching, then mean reached-step fraction, then mean "
    text += "final diff): " + "; ".join(
        f"{res.rows[i].label} ({res.rows[i].summary.step_fraction.text(percent=True)})"
        for i in order
    )
    (out / "study.md").write_text(text + "\n")
    payload = table.to_json(res.rows, res.bases, res.teachers, res.own_teacher)
    (out / "study.json").write_text(json.dumps(payload, indent=1))
    table.plot_summary(res.rows, seeds, out / "study.png")
    best = grid[order[0]][1]
    seed = seeds[0]
    curves = {"baseline": res.bases[seed], "SALT centre": res.curves[centre, seed]}
    if best != centre:
        curves[f"SALT best: {best.label(centre)}"] = res.curves[best, seed]
    if seed in res.own_teacher:
        curves[f"teacher {centre.teacher.key}"] = res.own_teacher[seed]
    plot(curves, out / "curves.png", title=f"seed {seed}; centre: {centre.key}")
    gaps = {
        f"{axis}: {s.label(centre)}": [(res.curves[s, k], res.bases[k]) for k in seeds]
        for axis, s in grid
    }
    marks = {}
    for k, teacher in res.own_teacher.items():
        passes = table.passes_step(res.bases[k], teacher)
        if passes is not None:
            marks[f"baseline passes its teacher, seed {k}"] = passes
    table.plot_gaps(gaps, out / "gap.png", marks)
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add(
        "--axes",
        nargs="*",
        default=None,
        choices=list(AXES),
        help="axes varied around the centre (all; none with --quick)",
    )
    add(
        "--teacher-steps-x",
        type=float,
        default=CENTRE.teacher.steps_x,
        help="the centre teacher's steps / the student's",
    )
    add("--teacher-layers", type=int, default=CENTRE.teacher.layers, help="centre teacher")
    add("--teacher-hidden", type=int, default=CENTRE.teacher.hidden, help="centre teacher")
    add(
        "--teacher-per-seed",
        action="store_true",
        help="a teacher per seed, on that seed's data order and validation draw (the same "
        "tokens as its students); reports the step each student passes its teacher",
    )
    add("--kd-frac", type=float, default=CENTRE.kd_frac, help="the centre's n_kd / steps")
    add("--schedule", default=CENTRE.schedule, help="the centre's --kd-schedule")
    add(
        "--n-kd",
        type=float,
        nargs="+",
        default=None,
        help="the n_kd axis' levels (fractions of the steps)",
    )
    add("--schedules", nargs="+", default=None, help="the schedule axis' levels")
    add("--seeds", nargs="+", type=int, default=[1, 2])
    add("--steps", type=int, default=Scale.steps, help="student steps")
    add("--eval-interval", type=int, default=Scale.eval_interval)
    add("--eval-iters", type=int, default=Scale.eval_iters)
    add("--global-batch", type=int, default=Scale.global_batch)
    add("--seq-length", type=int, default=None, help="both models' (default: the configs' 128)")
    add("--student-layers", type=int, default=None, help="default: the student config's (4)")
    add("--student-hidden", type=int, default=None, help="default: the student config's (192)")
    add(
        "--corpus",
        choices=("docstrings", "code"),
        default="docstrings",
        help="the demo's stdlib docstrings (2 MB), or the Python sources of the stdlib and the "
        "installed packages (about 300 MB; salt_megatron/data/code_corpus.py)",
    )
    add("--jobs", type=int, default=2, help="runs at a time (1 process each)")
    add("--threads", type=int, default=1, help="OpenMP threads per run")
    add("--quick", action="store_true", help="tiny 2-run smoke: centre vs baseline")
    add("--out", type=Path, default=ROOT / "runs" / "study")
    add("--tables", default=None, help="tables folder in <out>/s<steps>/ (around-<centre>)")
    add("--cache", type=Path, default=None, help="data cache (cache/demo or cache/code)")
    return parser


def _scale(args: argparse.Namespace) -> Scale:
    shape = []
    if args.student_layers is not None:
        shape += ["--num-layers", str(args.student_layers)]
    if args.student_hidden is not None:
        shape += ["--hidden-size", str(args.student_hidden)]
    return Scale(
        steps=args.steps, global_batch=args.global_batch, eval_interval=args.eval_interval,
        eval_iters=args.eval_iters, threads=args.threads, student=tuple(shape),
        seq_length=args.seq_length, teacher_per_seed=args.teacher_per_seed,
    )  # fmt: skip


def main() -> None:
    args = _parser().parse_args()
    teacher = Teacher(args.teacher_layers, args.teacher_hidden, args.teacher_steps_x)
    centre = dataclasses.replace(
        CENTRE, teacher=teacher, kd_frac=args.kd_frac, schedule=args.schedule
    )
    axes = dict(AXES)
    if args.n_kd:
        axes["n_kd"] = [{"kd_frac": f} for f in args.n_kd]
    if args.schedules:
        axes["schedule"] = [{"schedule": name} for name in args.schedules]
    if args.quick:
        scale = dataclasses.replace(QUICK, teacher_per_seed=args.teacher_per_seed)
        grid, seeds = settings(args.axes or [], centre, axes), args.seeds[:1]
    else:
        scale = _scale(args)
        grid = settings(list(AXES) if args.axes is None else args.axes, centre, axes)
        seeds = args.seeds
    out = args.out.resolve() / ("quick" if args.quick else f"s{scale.steps}")  # flags name it
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or ROOT / "cache" / ("demo" if args.corpus == "docstrings" else "code")
    study = Study(out, data_flags(cache, args.corpus), scale)
    res = run_study(study, grid, seeds, max(1, args.jobs))
    tables = out / (args.tables or f"around-{centre.key}")
    print("\n" + write_outputs(tables, res, grid, seeds))
    print(f"\ntables and plots: {tables}/study.md, study.json, study.png, curves.png, gap.png")


if __name__ == "__main__":
    main()
