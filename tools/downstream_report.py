"""Tables and plot of ``tools/downstream.py``: few-shot scores, accuracy after SFT with bootstrap
intervals, and each SALT student's paired difference from the baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from salt_megatron.eval import intervals

PER_EXAMPLE = ("acc", "acc_norm", "exact_match")
"""Metrics scored 0/1 per example (their samples give intervals); others are corpus-level."""


def per_example(result: dict[str, Any], task: str, metric: str, flt: str) -> np.ndarray:
    """``[examples]`` scores of one task/metric/filter from an eval JSON's samples, by doc_id."""
    rows = [s for s in result["samples"][task] if s.get("filter", "none") == flt]
    rows.sort(key=lambda s: s["doc_id"])
    return np.array([float(s[metric]) for s in rows])


def _metric_key(key: str) -> tuple[str, str]:
    """``"exact_match,first_word"`` -> ``("exact_match", "first_word")``; no comma: "none"."""
    metric, _, flt = key.partition(",")
    return metric, flt or "none"


def fewshot_table(fewshot: dict[str, dict[str, Any]], names: dict[str, str]) -> list[str]:
    """One row per task and metric; 0/1 metrics with their interval and the paired difference of
    each SALT student from the baseline, in percent; the others as lm-eval reports them."""
    base = fewshot.get("baseline")
    header = "| task | metric | " + " | ".join(names.values())
    others = [n for n in names if n != "baseline"] if base is not None else []
    header += "".join(f" | {names[n]} - baseline" for n in others) + " |"
    rows = [header, "|" + "---|" * (2 + len(names) + len(others))]
    first = next(iter(fewshot.values()))
    for task, metrics in sorted(first["metrics"].items()):
        for key in sorted(k for k in metrics if not k.endswith("_stderr") and k != "alias"):
            metric, flt = _metric_key(key)
            if metric in PER_EXAMPLE:
                scores = {n: per_example(fewshot[n], task, metric, flt) for n in names}
                cells = [intervals.accuracy(scores[n]).format() for n in names]
                cells += [intervals.paired_difference(scores[n], scores["baseline"]).format()
                          for n in others]  # fmt: skip
            else:
                cells = [f"{fewshot[n]['metrics'][task][key]:.4g}" for n in names] + [""] * len(
                    others
                )
            rows.append(f"| {task} | {key} | " + " | ".join(cells) + " |")
    return rows


def sft_scores(runs: list[dict[str, Any]], task: str) -> np.ndarray:
    """``[seeds, examples]`` exact-match scores of one student's SFT runs on ``task``."""
    return np.stack([per_example(r, task, "exact_match", "answer") for r in runs])


def sft_table(
    after: dict[str, dict[str, list[dict[str, Any]]]],
    names: dict[str, str],
    task_names: dict[str, str],
    seeds: list[int],
) -> tuple[list[str], dict[str, Any]]:
    """Accuracy after SFT per task and student (pooled seeds, interval, per seed) and the paired
    difference from the baseline; also the numbers, JSON-able."""
    rows = ["| task | student | accuracy % [95% CI] | per seed (" + ", ".join(map(str, seeds))
            + ") | difference from baseline, points [95% CI] | test examples |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    numbers: dict[str, Any] = {}
    for task, runs_by_student in after.items():
        lm_task = task_names[task]
        scores = {n: sft_scores(runs_by_student[n], lm_task) for n in names}
        for n in names:
            acc = intervals.accuracy(scores[n])
            per_seed = ", ".join(f"{100 * s:.1f}" for s in scores[n].mean(axis=1))
            diff = (intervals.paired_difference(scores[n], scores["baseline"])
                    if n != "baseline" and "baseline" in scores else None)  # fmt: skip
            rows.append(f"| {task} | {names[n]} | {acc.format()} | {per_seed} | "
                        f"{diff.format() if diff else ''} | {scores[n].shape[1]} |")  # fmt: skip
            numbers.setdefault(task, {})[n] = {
                "accuracy": acc.__dict__, "per_seed": scores[n].mean(axis=1).tolist(),
                "difference": diff.__dict__ if diff else None,
            }  # fmt: skip
    return rows, numbers


def plot(numbers: dict[str, Any], names: dict[str, str], path: Path) -> None:
    """Accuracy after SFT with its interval (bars) and per-seed accuracies (dots), per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(numbers), figsize=(5 * len(numbers), 4), squeeze=False)
    for ax, (task, by_student) in zip(axes[0], numbers.items()):
        for i, n in enumerate(names):
            acc = by_student[n]["accuracy"]
            err = [[100 * (acc["value"] - acc["low"])], [100 * (acc["high"] - acc["value"])]]
            ax.bar(i, 100 * acc["value"], yerr=err, capsize=6, color=f"C{i}", alpha=0.7)
            seeds = by_student[n]["per_seed"]
            ax.plot([i] * len(seeds), [100 * s for s in seeds], "k.", ms=8)
        ax.set_xticks(range(len(names)), list(names.values()), fontsize=8)
        ax.set_title(f"{task}: exact match after SFT")
        ax.set_ylabel("accuracy (%), 95% bootstrap CI; dots: seeds")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(
    out: Path,
    sizes: dict[str, dict[str, int]],
    fewshot: dict[str, dict[str, Any]],
    after: dict[str, dict[str, list[dict[str, Any]]]],
    names: dict[str, str],
    seeds: list[int],
) -> str:
    """Write ``downstream.md``, ``downstream.json`` and ``downstream.png`` under ``out``."""
    task_names = {"arith": "salt_arith", "reading": "salt_reading"}
    sft_rows, numbers = sft_table(after, names, task_names, seeds)
    size_rows = ["| task | generated | too long for the model | SFT train | SFT valid | test |",
                 "|---|---|---|---|---|---|"] + [
        f"| {t} | {s['generated']} | {s['too_long']} | {s['train']} | {s['valid']} | {s['test']} |"
        for t, s in sizes.items()]  # fmt: skip
    text = "\n".join(
        ["### Tasks", *size_rows, "", "### Few-shot (1-shot), before fine-tuning",
         *fewshot_table(fewshot, names), "", "### After SFT", *sft_rows]
    )  # fmt: skip
    (out / "downstream.md").write_text(text + "\n")
    (out / "downstream.json").write_text(json.dumps({"sizes": sizes, "sft": numbers}, indent=2))
    plot(numbers, names, out / "downstream.png")
    return text
