"""The tables of ``benchmarks/teacher_overhead.py``: its online rows and the pipeline summary.

A row is a dict of one (layout, teacher, placement) case: ``layout`` (world, TP, teacher TP, PP),
``student``/``teacher`` shapes, ``plain``/``kd`` seconds per optimizer step (fastest block),
``ratio`` and ``paired`` (KD/plain: fastest blocks, median of paired blocks), ``ideal`` (the
FLOP-ideal ratio), ``teacher_s``, ``exchange`` and ``loss_excess`` seconds per step (NaN where not
measured) and the LM-head FLOP shares ``head_s``/``head_t``.
"""

from __future__ import annotations

import math

PIPELINE_TARGET = 1.15
"""The KD/plain ratio at PP > 1 may exceed PP 1's by at most this factor (teacher balanced)."""


def ms(seconds: float) -> str:
    """Seconds as whole milliseconds; NaN (not measured) as a dash."""
    return "-" if math.isnan(seconds) else f"{1000.0 * seconds:.0f}"


def online_table(rows: list[dict]) -> str:
    """The online rows (one per layout, teacher and placement) as a Markdown table."""
    lines = [
        "| world | TP | teacher TP | PP | teacher on | student | teacher | plain ms | KD ms | "
        "measured (paired median) | FLOP-ideal | measured/ideal | teacher share | excess ms: "
        "teacher fwd / exchange / KD loss - CE / rest | LM-head FLOP share S / T |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lay, excess = r["layout"], r["kd"] - r["plain"]
        fwd = r["teacher_s"] - (0.0 if math.isnan(r["exchange"]) else r["exchange"])
        rest = excess - r["teacher_s"] - r["loss_excess"]
        where = {"balanced": "stages", "last": "last stage"}[r["placement"]] if lay.pp > 1 else "-"
        lines.append(
            f"| {lay.world} | {lay.tp} | {lay.ttp} | {lay.pp} | {where} | {r['student']} "
            f"| {r['teacher']} | {ms(r['plain'])} | {ms(r['kd'])} "
            f"| {r['ratio']:.2f} ({r['paired']:.2f}) | {r['ideal']:.3f} "
            f"| {r['ratio'] / r['ideal']:.2f} | {r['teacher_s'] / r['kd']:.0%} "
            f"| {ms(fwd)} / {ms(r['exchange'])} / {ms(r['loss_excess'])} / {ms(rest)} "
            f"| {r['head_s']:.0%} / {r['head_t']:.0%} |"
        )
    return "\n".join(lines)


def pipeline_summary(rows: list[dict], target: float = PIPELINE_TARGET) -> str:
    """Each PP > 1 row's KD/plain ratio over the PP 1 row's (same student and teacher, TP 1):
    the fastest blocks' ratios and the paired medians."""
    lines = []
    for r in rows:
        lay = r["layout"]
        base = [b for b in rows if b["layout"].pp == 1 and b["layout"].tp == lay.tp
                and (b["student"], b["teacher"]) == (r["student"], r["teacher"])]  # fmt: skip
        balanced = r["placement"] == "balanced"
        if lay.pp == 1 or not base:
            continue
        best, median = r["ratio"] / base[0]["ratio"], r["paired"] / base[0]["paired"]
        verdict = "met" if max(best, median) <= target else "not met"
        where = "balanced over the stages" if balanced else "on the last stage"
        lines.append(
            f"- PP {lay.pp}, teacher {where}: KD/plain {r['ratio']:.2f} (median "
            f"{r['paired']:.2f}) against {base[0]['ratio']:.2f} ({base[0]['paired']:.2f}) at "
            f"PP 1: x{best:.2f} (median x{median:.2f})"
            + (f"; target <= x{target:g}: {verdict}" if balanced else "")
        )
    return "\n".join(lines)
