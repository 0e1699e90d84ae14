"""Benchmark: an MoE student's KD step time over its plain step time, against the FLOP-ideal ratio.

For each layout (world size, EP, dispatcher) one process group is spawned; inside it, for each
teacher (dense, and MoE), a teacher checkpoint is saved (random weights), a KD trainer
(schedule ``step``: every step a KD step) is built for the MoE student on random tokens, warmed
up, and timed in alternating blocks of ``--steps`` plain steps and ``--steps`` KD steps of the
*same* trainer (:func:`benchmarks.teacher_overhead._block`: the plain block swaps the KD forward
step for the plain one, the teacher stays built), ``--rounds`` times. Per row: plain and KD ms
per step (the fastest block of each, and the median), their ratio ("measured"; the median of
the paired block ratios in brackets), the FLOP-ideal ratio ``1 + F_teacher_fwd /
F_student_fwd_bwd`` per token with the MoE layers counting only the experts a token uses
(:mod:`salt_megatron.models.flops`), measured/ideal, and the teacher's share of the KD step.

The FLOP-ideal ratio is what a step costs if time follows FLOPs; on the CPU an MoE layer's
routing, permutation and (at EP > 1) all-to-all cost time that is not in the FLOPs, and they
make the student's plain step slower than its FLOPs say, which lowers the measured ratio.

    python benchmarks/moe_overhead.py [--quick] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, write_docs  # noqa: E402
from benchmarks.teacher_overhead import (  # noqa: E402
    KD_WEIGHT,
    TEMP,
    RandomTokens,
    _block,
    flop_ideal_ratio,
)

STUDENT = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "4",
           "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "384",
           "--moe-aux-loss-coeff", "1e-2"]  # fmt: skip
"""8 layers, h 256, 8 experts of width 384 (top-2: 2 x 384 ~ a dense MLP's 683), ~4.3x the
parameters a token uses."""
TEACHERS = {
    "dense 4L h256": ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4"],
    "MoE 4L h256": ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
                    "--num-experts", "8", "--moe-router-topk", "2",
                    "--moe-ffn-hidden-size", "384"],
}  # fmt: skip
"""Half the student's layers: about 1/6 of a student step's FLOPs, as in the paper."""
LAYOUTS = {"EP 1": (1, []), "EP 2 all-to-all": (2, ["--expert-model-parallel-size", "2",
           "--moe-token-dispatcher-type", "alltoall"]),
           "EP 2 all-gather": (2, ["--expert-model-parallel-size", "2"])}  # fmt: skip


def _common(opts: dict[str, Any]) -> list[str]:
    return ["--mock-data", "--vocab-size", str(opts["vocab"]), "--seq-length", str(opts["seq"]),
            "--micro-batch-size", str(opts["mbs"]), "--global-batch-size", str(opts["gbs"]),
            "--train-iters", "100000", "--lr", "1e-4", "--log-interval", "100000",
            "--make-vocab-size-divisible-by", "128"]  # fmt: skip


def _save_teacher(opts: dict[str, Any], flags: list[str], root: str) -> None:
    """A teacher of ``flags`` with random weights (one step of training), saved at EP 1."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.checkpoint.manager import Checkpointer
    from salt_megatron.config import parse_config
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config([*_common(opts), *flags, "--save", root])
    trainer = Trainer(cfg, (RandomTokens(opts["vocab"], opts["seq"]), None), opts["vocab"])
    trainer.train_step()
    Checkpointer(trainer, "", install_signal=False).save()
    trainer.close()
    mpu.destroy_model_parallel()


def _case(opts: dict[str, Any], layout: list[str], root: str, name: str) -> dict[str, Any]:
    """Time one (layout, teacher) case: alternating plain and KD blocks of one trainer."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import parse_config
    from salt_megatron.teacher.checks import resolve_checkpoint, teacher_model_config
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config([*_common(opts), *STUDENT, *layout, "--kd-teacher-load", root,
                        "--kd-steps", "100000", "--kd-schedule", "step", "--kd-weight",
                        str(KD_WEIGHT), "--kd-temperature", str(TEMP)])  # fmt: skip
    cfg.validate_world(dist.get_world_size())
    trainer = Trainer(cfg, (RandomTokens(opts["vocab"], opts["seq"]), None), opts["vocab"])
    trainer.kd.sync(trainer.step)
    plain, kd, teacher = [], [], []
    for round_ in range(opts["rounds"] + 1):  # round 0: warm-up
        steps = opts["steps"] if round_ else 1
        plain.append(_block(trainer, steps, False)[0])
        k_seconds, t_seconds = _block(trainer, steps, True)
        kd.append(k_seconds)
        teacher.append(t_seconds)
    plain, kd, teacher = plain[1:], kd[1:], teacher[1:]
    teacher_model = teacher_model_config(resolve_checkpoint(root), cfg)
    ideal = flop_ideal_ratio(cfg.model, teacher_model, opts["seq"], trainer.padded_vocab)
    trainer.close()
    mpu.destroy_model_parallel()
    return {
        "teacher": name, "plain": min(plain), "kd": min(kd), "plain_med": statistics.median(plain),
        "kd_med": statistics.median(kd), "ratio": min(kd) / min(plain),
        "paired": statistics.median(k / p for k, p in zip(kd, plain, strict=True)),
        "ideal": ideal, "teacher_share": min(teacher) / min(kd),
    }  # fmt: skip


def bench_worker(opts: dict[str, Any], tmp: str, layout: list[str]) -> list[dict[str, Any]]:
    """Every teacher at one layout, in this process group (rank results alike; last used)."""
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rows = []
    for name in opts["teachers"]:
        rows.append(_case(opts, layout, os.path.join(tmp, name.replace(" ", "_")), name))
    return rows


def _teachers_worker(opts: dict[str, Any], tmp: str) -> None:
    for name in opts["teachers"]:
        _save_teacher(opts, TEACHERS[name], os.path.join(tmp, name.replace(" ", "_")))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| layout | teacher | plain ms: best (median) | KD ms: best (median) | "
        "measured KD/plain (paired median) | FLOP-ideal | measured/ideal | teacher share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['teacher']} | {1000 * r['plain']:.0f} "
            f"({1000 * r['plain_med']:.0f}) | {1000 * r['kd']:.0f} ({1000 * r['kd_med']:.0f}) "
            f"| {r['ratio']:.2f} ({r['paired']:.2f}) | {r['ideal']:.3f} "
            f"| {r['ratio'] / r['ideal']:.2f} | {r['teacher_share']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Save the teachers, run every layout (one spawn each), print the table."""
    from tests.distributed.launcher import run_distributed

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="plain/KD block pairs")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--quick", action="store_true", help="EP 1 and EP 2 all-to-all, short")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.layouts, args.rounds = ["EP 1", "EP 2 all-to-all"], 2
    opts = {k: v for k, v in vars(args).items() if k not in ("layouts", "quick", "write_docs")}
    load, start, rows = os.getloadavg()[0], time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="moe_overhead_") as tmp:
        run_distributed(_teachers_worker, 1, opts, tmp)
        for name in args.layouts:
            world, flags = LAYOUTS[name]
            for row in run_distributed(bench_worker, world, opts, tmp, flags)[-1]:
                rows.append({**row, "layout": name})
            print(_table(rows), flush=True)
    text = (
        f"Machine: {machine()}; torch {torch.__version__}; MoE student 8L h256, 8 experts of "
        f"width 384, top-2 (aux loss 0.01); vocab {args.vocab}, seq {args.seq}, micro-batch "
        f"{args.mbs}, global batch {args.gbs}, fp32, cores / world threads per process, KD "
        f"w={KD_WEIGHT} T={TEMP}; {args.rounds} alternating blocks of {args.steps} KD / "
        f"{args.steps} plain steps of one trainer; {time.perf_counter() - start:.0f} s.\n"
        f"`python benchmarks/moe_overhead.py {' '.join(argv or sys.argv[1:])}`; load average "
        f"before the run {load:.1f}, after it {os.getloadavg()[0]:.1f}\n\n" + _table(rows)
    )
    print("\n" + text)
    if args.write_docs:
        write_docs(text, "## MoE student: KD step over plain step")


if __name__ == "__main__":
    main()
