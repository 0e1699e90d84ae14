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


def pair(seed: int, base: Curve, salt: Curve) -> Paired:
    """Compare ``salt`` with ``base`` (the baseline of the same seed)."""
    target = base.losses[-1]
    hit = salt.first_step_reaching(target)
    return Paired(
        seed=seed,
        base_final=target,
        base_steps=base.steps[-1],
        base_seconds=base.seconds[-1],
        final=salt.losses[-1],
        reached_step=None if hit is None else hit[0],
        reached_seconds=None if hit is None else hit[1],
    )


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

    @classmethod
    def of(cls, rows: list[Paired]) -> Summary:
        return cls(
            Spread.of([r.step_fraction for r in rows]),
            Spread.of([r.seconds_fraction for r in rows]),
            Spread.of([r.final_diff for r in rows]),
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


def _cell(row: Paired) -> str:
    frac = "not reached" if row.step_fraction is None else f"{row.step_fraction:.0%}"
    step = "" if row.reached_step is None else f" (step {row.reached_step})"
    return f"{frac}{step}, {row.final_diff:+.4f}"


def markdown(rows: list[Row], seeds: list[int]) -> str:
    """The study's table: one line per setting, per-seed cells and the summary over seeds."""
    head = (
        "| axis | setting | "
        + " | ".join(f"seed {s}: reached, final diff" for s in seeds)
        + " | reached-step fraction, mean (range) | final loss diff, mean (range) "
        "| wall-clock fraction, mean (range) |"
    )
    lines = [head, "|" + "---|" * (len(seeds) + 5)]
    for row in rows:
        by_seed = {r.seed: r for r in row.runs}
        cells = [_cell(by_seed[s]) if s in by_seed else "" for s in seeds]
        summ = row.summary
        lines.append(
            f"| {row.axis} | {row.label} | "
            + " | ".join(cells)
            + f" | {summ.step_fraction.text(percent=True)} | {summ.final_diff.text('{:+.4f}')} "
            f"| {summ.seconds_fraction.text(percent=True)} |"
        )
    return "\n".join(lines)


def baseline_markdown(bases: dict[int, Curve], teachers: dict[str, Curve]) -> str:
    """The reference lines: the baselines' final losses per seed, the teachers' final losses."""
    lines = ["| run | final validation loss | training seconds |", "|---|---|---|"]
    for seed, curve in sorted(bases.items()):
        lines.append(
            f"| baseline, seed {seed} | {curve.losses[-1]:.4f} | {curve.seconds[-1]:.1f} |"
        )
    for name, curve in teachers.items():
        lines.append(
            f"| teacher {name} (its own seed and validation draw) | {curve.losses[-1]:.4f} "
            f"| {curve.seconds[-1]:.1f} |"
        )
    return "\n".join(lines)


def to_json(rows: list[Row], bases: dict[int, Curve], teachers: dict[str, Curve]) -> dict[str, Any]:
    """Everything the tables are made from, curves included."""

    def curve(c: Curve) -> dict[str, Any]:
        return asdict(c)

    return {
        "baselines": {str(s): curve(c) for s, c in bases.items()},
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
