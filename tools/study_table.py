"""Bookkeeping of tools/study.py: paired-seed comparisons against the baseline, their summary
over seeds, and the study's tables (JSON rows and Markdown).

Every SALT run is compared with the baseline run of the *same seed* (same initial weights, same
data order, same validation sequences): the baseline's final validation loss is the target, the
SALT run's first evaluation at or below it gives the reached step and the training seconds to
get there (``elapsed_s`` of the metrics file, the trainer's own clock).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.runs import Curve


@dataclass(frozen=True)
class Paired:
    """One SALT run against the baseline run of the same seed."""

    seed: int
    base_final: float  # the baseline's final validation loss (the target)
    base_steps: int  # the baseline's last step
    base_seconds: float  # the baseline's training seconds at its last step
    final: float  # the SALT run's final validation loss
    reached_step: int | None  # first evaluated step with loss <= base_final; None: not reached
    reached_seconds: float | None  # training seconds at that step
    kd_steps: int | None = None  # the SALT run's n_kd
    # SALT's loss minus the baseline's at the first evaluation at or after n_kd (None: n_kd is
    # the whole run, or no evaluation there)
    diff_at_kd_end: float | None = None
    teacher_final: float | None = None  # its own teacher's final loss (same validation draw)
    passes_teacher_step: int | None = None  # first evaluation at or below teacher_final

    @property
    def final_diff(self) -> float:
        """SALT's final loss minus the baseline's (nats; negative: SALT is better)."""
        return self.final - self.base_final

    @property
    def step_fraction(self) -> float | None:
        """Reached step / the baseline's steps (None: not reached)."""
        return None if self.reached_step is None else self.reached_step / self.base_steps

    @property
    def seconds_fraction(self) -> float | None:
        """Training seconds to the reached step / the baseline's training seconds."""
        if self.reached_seconds is None or self.base_seconds <= 0:
            return None
        return self.reached_seconds / self.base_seconds


def gap(salt: Curve, base: Curve) -> dict[int, float]:
    """``salt``'s loss minus ``base``'s at every step both evaluated."""
    at_base = dict(zip(base.steps, base.losses))
    return {s: loss - at_base[s] for s, loss in zip(salt.steps, salt.losses) if s in at_base}


def diff_at(salt: Curve, base: Curve, step: int) -> float | None:
    """``salt``'s loss minus ``base``'s at their first common evaluation at or after ``step``."""
    at_base = dict(zip(base.steps, base.losses))
    for s, loss in zip(salt.steps, salt.losses):
        if s >= step and s in at_base:
            return loss - at_base[s]
    return None


def passes_step(curve: Curve, teacher: Curve | None) -> int | None:
    """First evaluated step of ``curve`` at or below ``teacher``'s final loss."""
    if teacher is None:
        return None
    hit = curve.first_step_reaching(teacher.losses[-1])
    return None if hit is None else hit[0]


def pair(
    seed: int,
    base: Curve,
    salt: Curve,
    kd_steps: int | None = None,
    teacher: Curve | None = None,
) -> Paired:
    """Compare ``salt`` (``kd_steps`` of KD) with ``base`` (the baseline of the same seed) and,
    when given, with ``teacher``, its own teacher evaluated on the same validation draw."""
    target = base.losses[-1]
    hit = salt.first_step_reaching(target)
    kd_end = None
    if kd_steps is not None and kd_steps < base.steps[-1]:
        kd_end = diff_at(salt, base, kd_steps)
    return Paired(
        seed=seed,
        base_final=target,
        base_steps=base.steps[-1],
        base_seconds=base.seconds[-1],
        final=salt.losses[-1],
        reached_step=None if hit is None else hit[0],
        reached_seconds=None if hit is None else hit[1],
        kd_steps=kd_steps,
        diff_at_kd_end=kd_end,
        teacher_final=None if teacher is None else teacher.losses[-1],
        passes_teacher_step=passes_step(salt, teacher),
    )


def first_step_below(curve: Curve, other: Curve) -> int | None:
    """First step evaluated in both at which ``curve``'s loss is below ``other``'s (the same
    step's): where a student overtakes its teacher step for step."""
    at_other = dict(zip(other.steps, other.losses))
    for step, loss in zip(curve.steps, curve.losses):
        if step in at_other and loss < at_other[step]:
            return step
    return None


@dataclass(frozen=True)
class Spread:
    """Mean and range of one quantity over seeds (``n`` values; ``missing`` seeds without one)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    missing: int

    @classmethod
    def of(cls, values: list[float | None]) -> Spread:
        have = [v for v in values if v is not None]
        missing = len(values) - len(have)
        if not have:
            return cls(None, None, None, 0, missing)
        return cls(statistics.fmean(have), min(have), max(have), len(have), missing)

    def text(self, fmt: str = "{:.3f}", percent: bool = False) -> str:
        """``mean (low to high)``, with ``, k not reached`` when seeds lack a value."""

        def f(x: float) -> str:
            return f"{x:.0%}" if percent else fmt.format(x)

        if self.mean is None or self.low is None or self.high is None:
            return "not reached"
        if self.n == 1:
            body = f(self.mean)
        elif f(self.low) == f(self.high):
            body = f"{f(self.mean)} (every seed)"
        else:
            body = f"{f(self.mean)} ({f(self.low)} to {f(self.high)})"
        return body + (f", {self.missing} not reached" if self.missing else "")


@dataclass(frozen=True)
class Summary:
    """One setting over its seeds."""

    step_fraction: Spread  # over the seeds that reached the target
    seconds_fraction: Spread
    final_diff: Spread
    diff_at_kd_end: Spread
    passes_teacher_step: Spread  # over the seeds that passed their teacher's final loss

    @classmethod
    def of(cls, rows: list[Paired]) -> Summary:
        return cls(
            Spread.of([r.step_fraction for r in rows]),
            Spread.of([r.seconds_fraction for r in rows]),
            Spread.of([r.final_diff for r in rows]),
            Spread.of([r.diff_at_kd_end for r in rows]),
            Spread.of(
                [
                    None if r.passes_teacher_step is None else float(r.passes_teacher_step)
                    for r in rows
                ]
            ),
        )

    @property
    def rank_key(self) -> tuple[int, float, float]:
        """Sort key, best first: seeds not reaching the target, mean step fraction, final diff."""
        frac = self.step_fraction.mean if self.step_fraction.mean is not None else 9.0
        diff = self.final_diff.mean if self.final_diff.mean is not None else 9.0
        return (self.step_fraction.missing, frac, diff)


@dataclass(frozen=True)
class Row:
    """A setting of the study: its axis, label, the paired runs and their summary."""

    axis: str
    label: str
    flags: str  # the SALT flags of this setting, as given to pretrain_salt.py
    runs: list[Paired]

    @property
    def summary(self) -> Summary:
        return Summary.of(self.runs)


def _cell(row: Paired, regime: bool) -> str:
    frac = "not reached" if row.step_fraction is None else f"{row.step_fraction:.0%}"
    step = "" if row.reached_step is None else f" (step {row.reached_step})"
    text = f"{frac}{step}, {row.final_diff:+.4f}"
    if not regime:
        return text
    if row.diff_at_kd_end is not None:
        text += f"; {row.diff_at_kd_end:+.4f} after KD"
    passes = "never" if row.passes_teacher_step is None else f"step {row.passes_teacher_step}"
    return text + f"; passes the teacher: {passes}"


def markdown(rows: list[Row], seeds: list[int]) -> str:
    """The study's table: one line per setting, per-seed cells and the summary over seeds.

    With teachers per seed (the runs know their teacher's final loss), a cell also gives the
    loss difference at the end of the KD phase and the step at which the student passes its
    teacher's final loss, with two more summary columns."""
    regime = any(r.teacher_final is not None for row in rows for r in row.runs)
    seed_head = "reached, final diff" + ("; diff after KD; passes the teacher" if regime else "")
    extra = (" | diff at the end of KD, mean (range) | step passing the teacher, mean (range)"
             if regime else "")  # fmt: skip
    head = (
        "| axis | setting | "
        + " | ".join(f"seed {s}: {seed_head}" for s in seeds)
        + " | reached-step fraction, mean (range) | final loss diff, mean (range)"
        + extra
        + " | wall-clock fraction, mean (range) |"
    )
    lines = [head, "|" + "---|" * (len(seeds) + 5 + (2 if regime else 0))]
    for row in rows:
        by_seed = {r.seed: r for r in row.runs}
        cells = [_cell(by_seed[s], regime) if s in by_seed else "" for s in seeds]
        summ = row.summary
        more = ""
        if regime:
            kd_end = summ.diff_at_kd_end.text("{:+.4f}").replace("not reached", "-")
            passes = summ.passes_teacher_step.text("{:.0f}").replace("not reached", "never")
            more = f" | {kd_end} | {passes}"
        lines.append(
            f"| {row.axis} | {row.label} | "
            + " | ".join(cells)
            + f" | {summ.step_fraction.text(percent=True)} | {summ.final_diff.text('{:+.4f}')}"
            + more
            + f" | {summ.seconds_fraction.text(percent=True)} |"
        )
    return "\n".join(lines)


def baseline_markdown(
    bases: dict[int, Curve], teachers: dict[str, Curve], own: dict[int, Curve] | None = None
) -> str:
    """The reference lines: the baselines' final losses per seed, the teachers' final losses.

    ``own``: each seed's centre teacher, trained on that seed's data order and evaluated on its
    validation draw; then the baseline lines also give the step at which the baseline passes the
    teacher's final loss and the first step at which it is below the teacher's loss at the same
    step."""
    own = own or {}
    cols = " | passes the teacher's final loss at step | below the teacher, step for step, from"
    lines = [
        "| run | final validation loss | training seconds" + (cols if own else "") + " |",
        "|---|---|---|" + ("---|---|" if own else ""),
    ]
    for seed, curve in sorted(bases.items()):
        line = f"| baseline, seed {seed} | {curve.losses[-1]:.4f} | {curve.seconds[-1]:.1f} |"
        if seed in own:
            passes, below = passes_step(curve, own[seed]), first_step_below(curve, own[seed])
            line += f" {'never' if passes is None else passes} | "
            line += f"{'never' if below is None else below} |"
        lines.append(line)
    for name, curve in teachers.items():
        where = "same data order and validation draw as its seed's students" if own else (
            "its own seed and validation draw")  # fmt: skip
        lines.append(
            f"| teacher {name} ({where}) | {curve.losses[-1]:.4f} | {curve.seconds[-1]:.1f} |"
            + (" | |" if own else "")
        )
    return "\n".join(lines)


def to_json(
    rows: list[Row],
    bases: dict[int, Curve],
    teachers: dict[str, Curve],
    own: dict[int, Curve] | None = None,
) -> dict[str, Any]:
    """Everything the tables are made from, curves included; with ``own`` (each seed's centre
    teacher), the steps at which each baseline passes it (see :func:`baseline_markdown`)."""

    def curve(c: Curve) -> dict[str, Any]:
        return asdict(c)

    return {
        "baselines": {str(s): curve(c) for s, c in bases.items()},
        "baselines_vs_teacher": {
            str(s): {
                "passes_teacher_step": passes_step(bases[s], t),
                "below_teacher_from_step": first_step_below(bases[s], t),
            }
            for s, t in (own or {}).items()
        },
        "teachers": {n: curve(c) for n, c in teachers.items()},
        "settings": [
            {
                "axis": r.axis,
                "label": r.label,
                "flags": r.flags,
                "runs": [
                    {
                        **asdict(p),
                        "final_diff": p.final_diff,
                        "step_fraction": p.step_fraction,
                        "seconds_fraction": p.seconds_fraction,
                    }
                    for p in r.runs
                ],
                "summary": asdict(r.summary),
            }
            for r in rows
        ],
    }


def plot_summary(rows: list[Row], seeds: list[int], path: Path) -> bool:
    """Per setting (one line each, the centre on top), per seed: the reached-step fraction (left;
    not reached drawn at 1.05) and the final-loss difference against the paired baseline (right).
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.5), sharey=True)
    ys = list(range(len(rows)))[::-1]
    markers = "os^Dv<>p"
    for k, seed in enumerate(seeds):
        frac, diff = [], []
        for row in rows:
            run = next((r for r in row.runs if r.seed == seed), None)
            f = None if run is None else run.step_fraction
            frac.append(1.05 if f is None else f)
            diff.append(float("nan") if run is None else run.final_diff)
        style = {"marker": markers[k % len(markers)], "ls": "", "label": f"seed {seed}"}
        axes[0].plot(frac, ys, **style)
        axes[1].plot(diff, ys, **style)
    axes[0].axvline(1.0, color="grey", lw=0.8)
    axes[1].axvline(0.0, color="grey", lw=0.8)
    axes[0].set_xlabel("step reaching the baseline's final loss / baseline steps (1.05: never)")
    axes[1].set_xlabel("final validation loss - paired baseline's (nats)")
    axes[0].set_yticks(ys, [f"{r.axis}: {r.label}" for r in rows], fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_gaps(
    gaps: dict[str, list[tuple[Curve, Curve]]], path: Path, marks: dict[str, int] | None = None
) -> bool:
    """SALT's validation loss minus its paired baseline's against step, one line per setting
    (the mean over its seeds, at the steps all of them evaluated), with vertical lines at
    ``marks`` (label -> step). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, pairs in gaps.items():
        per_seed = [gap(salt, base) for salt, base in pairs]
        steps = sorted(set.intersection(*(set(d) for d in per_seed)))
        mean = [statistics.fmean(d[s] for d in per_seed) for s in steps]
        ax.plot(steps, mean, marker="o", ms=2, label=label)
    for k, (label, step) in enumerate((marks or {}).items()):
        ax.axvline(step, color="grey", lw=0.8, ls=("--", ":", "-.")[k % 3], label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss - paired baseline's (nats; mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
