"""Benchmark: KD-phase step time over the plain step time, against the FLOP-ideal ratio.

For each layout (world size, student TP, teacher TP, student PP) one process group is spawned;
inside it, for each teacher size, a teacher checkpoint is saved (random weights, our checkpoint
layout), a :class:`~salt_megatron.training.trainer.Trainer` with KD enabled (schedule ``step``,
w=0.5, so every step is a KD step) is built on a synthetic dataset, warmed up, and then timed in
alternating blocks of ``--steps`` plain steps and ``--steps`` KD steps of the *same* trainer (the
plain block swaps the KD forward step for the plain one; the teacher stays built), ``--rounds``
times. Reported per row (the fastest block of each kind: the machine may be shared):

* plain / KD ms per optimizer step, their ratio ("measured"; the median of the paired
  KD/plain block ratios in brackets), the FLOP-ideal ratio ``1 + F_teacher_fwd /
  F_student_fwd_bwd`` per token (:func:`flop_ideal_ratio`), measured/ideal;
* the teacher time share (``KDForwardStep.teacher_timer`` over the KD step time);
* where the excess ``KD - plain`` goes, per step (PP 1 rows): the teacher body (teacher time
  minus the exchange), the exchange into the student's vocabulary layout
  (``student_layout_logits`` minus ``final_hidden`` on the same rows, timed separately: the
  all-gather of hidden states and the output layer's vocabulary slice), the KD loss over
  megatron's ``vocab_parallel_cross_entropy`` (forward + backward on logits of the step's shape,
  timed separately, times the micro-batches), and the unexplained rest.

Pipeline rows (``--pipeline``: PP 1, 2 and 4 at the same shapes, where transformer layers, not
the output layer, dominate). At PP > 1 every round has two KD blocks beside its plain block: the
teacher balanced over the stages (the teacher pass of :mod:`salt_megatron.distill.teacher_pass`)
and, for comparison, the whole teacher on the last stage (the trainer's teacher pass switched
off, so the KD forward step runs the teacher in line there, as before the teacher pass): two
rows from one trainer, measured side by side. Rows come from the last stage; their FLOP-ideal
ratio is :func:`salt_megatron.planner.kd_step_ratio` (the slowest stage's pace), and the summary
gives each PP > 1 ratio over the PP 1 ratio.

Offline rows (``--offline-top-k k``, 0 disables; PP 1 layouts): KD steps on stored teacher
targets, :mod:`benchmarks.offline_rows`.

    python benchmarks/teacher_overhead.py [--quick] [--pipeline] [--offline-top-k 64] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import offline_rows  # noqa: E402
from benchmarks.common import machine, write_docs  # noqa: E402
from benchmarks.overhead_tables import online_table, pipeline_summary  # noqa: E402
from salt_megatron.config.schema import ModelConfig  # noqa: E402
from salt_megatron.models import flops as model_flops  # noqa: E402
from salt_megatron.planner import kd_step_ratio  # noqa: E402

KD_WEIGHT, TEMP = 0.5, 1.0
PIPELINE = {
    "student": "8x256x4", "teachers": ["4x256x4"], "vocab": 1024, "seq": 128, "mbs": 2,
    "gbs": 16, "threads": 1, "layouts": ["1:1:1", "2:1:1:2", "4:1:1:4"], "offline_top_k": 0,
}  # fmt: skip
"""``--pipeline``: shapes where transformer layers dominate (vocabulary 1024: the LM head is 4% of
the student's FLOPs), a teacher of half the student's layers (about 17% of a student step, as
in the paper), 8 micro-batches; PP 1, 2 and 4 (each with the teacher balanced, and on the last
stage); one thread per process at every layout (two threads of a shared 2-core machine wait on
each other whenever another job takes one core, and the KD step's extra small ops pay that more
often)."""


@dataclass(frozen=True)
class Shape:
    """A GPT shape: layers x hidden x heads (SwiGLU, RMSNorm, RoPE: the repo's defaults)."""

    layers: int
    hidden: int
    heads: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"4x256x4"`` -> Shape(4, 256, 4)."""
        layers, hidden, heads = (int(x) for x in text.split("x"))
        return cls(layers, hidden, heads)

    def flags(self, prefix: str = "") -> list[str]:
        """The model flags (``--teacher-`` prefixed with ``prefix="teacher-"``)."""
        return [f"--{prefix}num-layers", str(self.layers), f"--{prefix}hidden-size",
                str(self.hidden), f"--{prefix}num-attention-heads", str(self.heads)]  # fmt: skip

    def model(self, vocab: int) -> ModelConfig:
        """The ModelConfig of this shape."""
        return ModelConfig(self.layers, self.hidden, self.heads, vocab_size=vocab)

    def __str__(self) -> str:
        return f"{self.layers}L h{self.hidden}"


@dataclass(frozen=True)
class Layout:
    """``world:TP:teacher TP[:PP]``: the student's TP and PP, the teacher's TP."""

    world: int
    tp: int
    ttp: int
    pp: int = 1

    @classmethod
    def parse(cls, text: str) -> Layout:
        """``"4:1:1:4"`` -> Layout(4, 1, 1, 4); PP defaults to 1."""
        numbers = [int(x) for x in text.split(":")]
        if len(numbers) not in (3, 4):
            raise ValueError(f"layout {text!r}: world:TP:teacher TP[:PP]")
        return cls(*numbers)

    def flags(self) -> list[str]:
        """The parallelism flags."""
        return ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size",
                str(self.pp), "--teacher-tensor-model-parallel-size", str(self.ttp)]  # fmt: skip

    @property
    def placements(self) -> tuple[str, ...]:
        """Where the teacher runs in the KD blocks: ``balanced`` over the stages (the teacher
        pass), and at PP > 1 also ``last`` (all of it on the last stage, for comparison)."""
        return ("balanced", "last") if self.pp > 1 else ("balanced",)


def flop_ideal_ratio(
    student: ModelConfig, teacher: ModelConfig, seq_length: int, padded_vocab: int
) -> float:
    """``1 + F_teacher_fwd / F_student_fwd_bwd`` per token (both with the student's padded vocab,
    which is what the colocated teacher is built with)."""
    f_teacher = model_flops.forward_flops_per_token(teacher, seq_length, padded_vocab)
    f_student = model_flops.train_flops_per_token(student, seq_length, padded_vocab)
    return 1.0 + f_teacher / f_student


def head_share(model: ModelConfig, seq_length: int, padded_vocab: int) -> float:
    """Fraction of the forward FLOPs per token spent in the LM head (``2 h V``)."""
    head = 2.0 * model.hidden_size * padded_vocab
    return head / model_flops.forward_flops_per_token(model, seq_length, padded_vocab)


class RandomTokens:
    """A synthetic GPT dataset: uniform random tokens, deterministic per index, full loss mask."""

    def __init__(self, vocab: int, seq: int, n: int = 1 << 20) -> None:
        self.vocab, self.seq, self.n = vocab, seq, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        row = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}  # fmt: skip


# ---- worker side -----------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], reps: int) -> float:
    """Minimum seconds of ``fn`` over ``reps`` calls after one warm-up (all ranks in step)."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _save_teacher(root: str, shape: Shape, opts: dict[str, Any], tp: int) -> None:
    """Save a randomly initialised teacher of ``shape`` at TP ``tp`` under ``root`` (collective)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    from salt_megatron.checkpoint import layout
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.config import parse_config
    from salt_megatron.config.cli import to_dict
    from salt_megatron.models.gpt import build_gpt

    cfg = parse_config([*_common_flags(opts), *shape.flags(), "--tensor-model-parallel-size",
                        str(tp)])  # fmt: skip
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    padded = mcfg.padded_vocab_size(opts["vocab"], cfg.model.make_vocab_size_divisible_by, tp)
    model = build_gpt(
        cfg.model, mcfg.transformer_config(cfg.model, tp=tp), padded_vocab_size=padded,
        max_sequence_length=cfg.model.max_position_embeddings, pre_process=True,
        post_process=True, init_seed=7,
    )  # fmt: skip
    path = layout.iteration_dir(root, 1)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(layout.model_sharded_state_dict([model]), path)
    if dist.get_rank() == 0:
        meta = {"config": to_dict(cfg), "tokenizer_fingerprint": "", "step": 1}
        layout.write_meta(path, {**meta, "padded_vocab_size": padded})
        layout.write_latest_step(root, 1)
    dist.barrier()
    mpu.destroy_model_parallel()


def _common_flags(opts: dict[str, Any]) -> list[str]:
    flags = ["--mock-data", "--vocab-size", str(opts["vocab"]), "--seq-length", str(opts["seq"]),
             "--micro-batch-size", str(opts["mbs"]), "--global-batch-size", str(opts["gbs"]),
             "--train-iters", "100000", "--lr", "1e-4", "--lr-warmup-iters", "0",
             "--log-interval", "100000"]  # fmt: skip
    return [*flags, "--bf16"] if opts["bf16"] else flags


def _block(trainer: Any, steps: int, kd: bool) -> tuple[float, float]:
    """(seconds per step, teacher seconds per step) of ``steps`` KD or plain steps."""
    if not kd:  # plain steps of the same trainer (the teacher stays built): no teacher pass
        setattr(trainer.kd, "forward_step", lambda step: None)  # noqa: B010
        setattr(trainer.kd, "step_iterators", lambda iterators, n_micro: iterators)  # noqa: B010
    trainer.kd.take_teacher_seconds()
    try:
        results = [trainer.train_step() for _ in range(steps)]
    finally:
        if not kd:
            del trainer.kd.forward_step, trainer.kd.step_iterators
    assert all(r.kd_phase == kd for r in results)
    return sum(r.seconds for r in results) / steps, trainer.kd.take_teacher_seconds() / steps


def _loss_seconds(trainer: Any, reps: int) -> tuple[float, float]:
    """(KD path, plain path) loss seconds on one micro-batch's logits, forward + backward.

    Mirrors the two steps' layouts: the plain step's GPT computes megatron's CE on its ``[s, b, V]``
    logits; the KD step's GPT returns ``logits.transpose(0, 1).contiguous()`` and the KD loss
    reads the teacher's ``[s, b, V]`` logits through a transposed view (copied inside the loss).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from salt_megatron.loss import kd_cross_entropy

    cfg, lay = trainer.cfg, trainer.layout
    b, s, width = cfg.training.micro_batch_size, cfg.data.seq_length, trainer.padded_vocab // lay.tp
    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    g = torch.Generator().manual_seed(lay.tp_rank)
    student_sbv = (torch.randn(s, b, width, generator=g) * 2).to(dev, dtype).requires_grad_()
    teacher_sbv = (torch.randn(s, b, width, generator=g) * 2).to(dev, dtype)
    labels_sb = torch.randint(0, trainer.vocab_size, (s, b), generator=torch.Generator()).to(dev)
    group = lay.tp_group

    def kd() -> None:
        student_bsv = student_sbv.transpose(0, 1).contiguous()
        kd_cross_entropy(
            student_bsv,
            teacher_sbv.transpose(0, 1),
            labels_sb.t(),
            KD_WEIGHT,
            TEMP,
            group,
            teacher_scratch=True,
        ).sum().backward()
        student_sbv.grad = None

    def ce() -> None:
        vocab_parallel_cross_entropy(student_sbv, labels_sb).sum().backward()
        student_sbv.grad = None

    return _timed(kd, reps), _timed(ce, reps)


def _exchange_seconds(trainer: Any, reps: int) -> float:
    """``student_layout_logits`` minus ``final_hidden`` on the rows it computes (a micro-batch):
    the hidden-state all-gather and the output layer's vocabulary slice."""
    teacher = trainer.kd.step_fn.teacher
    batch = next(iter(trainer.train_iters[-1]))
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokens, pos = batch["tokens"].to(dev), batch["position_ids"].to(dev)
    rows = teacher.layout.rows(tokens.shape[0])
    whole = _timed(lambda: teacher.student_layout_logits(tokens, pos), reps)
    body = _timed(lambda: teacher.final_hidden(tokens[rows], pos[rows]), reps)
    return max(0.0, whole - body)


def _build_trainer(opts: dict[str, Any], root: str, lay: Layout, shape: Shape) -> Any:
    """A KD trainer (every step a KD step) with its teacher built."""
    import torch.distributed as dist

    from salt_megatron.config import parse_config
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config([
        *_common_flags(opts), *Shape.parse(opts["student"]).flags(), *shape.flags("teacher-"),
        "--kd-teacher-load", root, "--kd-steps", "100000", "--kd-schedule", "step",
        "--kd-weight", str(KD_WEIGHT), "--kd-temperature", str(TEMP), *lay.flags(),
    ])  # fmt: skip
    cfg.validate_world(dist.get_world_size())
    trainer = Trainer(cfg, (RandomTokens(opts["vocab"], opts["seq"]), None), opts["vocab"])
    trainer.kd.sync(trainer.step)
    return trainer


def _ideal(opts: dict[str, Any], lay: Layout, shape: Shape, padded: int, n_micro: int) -> dict:
    """The FLOP-ideal KD/plain ratio of each placement."""
    student, teacher = Shape.parse(opts["student"]).model(opts["vocab"]), shape.model(opts["vocab"])
    if lay.pp == 1:
        return {"balanced": flop_ideal_ratio(student, teacher, opts["seq"], padded)}
    args = (student, teacher, opts["seq"], padded, lay.pp, n_micro)
    return {p: kd_step_ratio(*args, balanced=p == "balanced") for p in lay.placements}


def _time_blocks(trainer: Any, opts: dict[str, Any], lay: Layout) -> dict[str, Any]:
    """Alternate a plain block with one KD block per placement, ``rounds`` times.

    ``last``: the trainer's teacher pass is switched off, so the KD forward step runs the whole
    teacher on the last stage, in line (the placement before the teacher pass).
    """
    teacher_pass = trainer.kd.teacher_pass
    plain: list[float] = []
    kd: dict[str, list[float]] = {p: [] for p in lay.placements}
    teach: dict[str, list[float]] = {p: [] for p in lay.placements}
    for round_ in range(opts["rounds"] + 1):  # round 0: warm-up
        p_seconds, _ = _block(trainer, opts["steps"] if round_ else 1, False)
        plain.append(p_seconds)
        for place in lay.placements:
            trainer.kd.teacher_pass = teacher_pass if place == "balanced" else None
            k_seconds, t_seconds = _block(trainer, opts["steps"] if round_ else 2, True)
            kd[place].append(k_seconds)
            teach[place].append(t_seconds)
    trainer.kd.teacher_pass = teacher_pass
    return {"plain": plain[1:], "kd": {p: v[1:] for p, v in kd.items()},
            "teacher": {p: v[1:] for p, v in teach.items()}}  # fmt: skip


def _run_case(opts: dict[str, Any], root: str, lay: Layout, shape: Shape) -> list[dict]:
    """Build a KD trainer for one (layout, teacher) case and time it; one row per placement."""
    from megatron.core import parallel_state as mpu

    trainer = _build_trainer(opts, root, lay, shape)
    times = _time_blocks(trainer, opts, lay)
    n_micro, padded = trainer.num_microbatches, trainer.padded_vocab
    nan = float("nan")
    loss_kd, loss_ce, exchange = nan, nan, nan  # micro-timings: PP 1 only (collective)
    if lay.pp == 1:
        loss_kd, loss_ce = _loss_seconds(trainer, opts["reps"])
        exchange = _exchange_seconds(trainer, opts["reps"])
    student, ideal = Shape.parse(opts["student"]), _ideal(opts, lay, shape, padded, n_micro)
    rows = []
    for place in lay.placements:
        kd_t, plain_t = times["kd"][place], times["plain"]
        rows.append({
            "layout": lay, "placement": place, "student": str(student), "teacher": str(shape),
            "n_micro": n_micro, "padded_vocab": padded, "plain": min(plain_t), "kd": min(kd_t),
            "ratio": min(kd_t) / min(plain_t),
            "paired": statistics.median(k / p for k, p in zip(kd_t, plain_t, strict=True)),
            "teacher_s": min(times["teacher"][place]), "exchange": exchange * n_micro,
            "loss_excess": (loss_kd - loss_ce) * n_micro, "loss_kd": loss_kd,
            "loss_ce": loss_ce, "ideal": ideal[place],
            "head_s": head_share(student.model(opts["vocab"]), opts["seq"], padded),
            "head_t": head_share(shape.model(opts["vocab"]), opts["seq"], padded),
        })  # fmt: skip
    if opts["offline_top_k"] and lay.pp == 1:
        rows[0].update(_offline_case(opts, root, lay, trainer))
    else:
        trainer.close()
        mpu.destroy_model_parallel()
    return rows


def _offline_case(opts: dict[str, Any], root: str, lay: Layout, trainer: Any) -> dict[str, Any]:
    """Store ``trainer``'s teacher targets (timed), close it, and time KD steps on the stored
    targets against plain steps of a trainer without a teacher."""
    from megatron.core import parallel_state as mpu

    n_steps = offline_rows.steps_read(opts["steps"], opts["rounds"])
    targets = os.path.join(root, f"targets_ttp{lay.ttp}")  # a fresh store per case: timed pass
    pass_s = offline_rows.store_targets(
        trainer, targets, n_steps, opts["gbs"], opts["offline_top_k"], TEMP
    )
    trainer.close()
    mpu.destroy_model_parallel()
    flags = [
        *_common_flags(opts), *Shape.parse(opts["student"]).flags(), "--kd-schedule", "step",
        "--kd-weight", str(KD_WEIGHT), "--kd-temperature", str(TEMP),
        "--tensor-model-parallel-size", str(lay.tp),
    ]  # fmt: skip
    data = RandomTokens(opts["vocab"], opts["seq"])
    offline = offline_rows.offline_trainer(flags, targets, n_steps, data, opts["vocab"])
    times = _time_blocks(offline, opts, Layout(lay.world, lay.tp, lay.ttp))
    offline.close()
    mpu.destroy_model_parallel()
    kd_t, plain_t = times["kd"]["balanced"], times["plain"]
    return {
        "pass_s": pass_s, "pass_steps": n_steps, "off_plain": min(plain_t), "off_kd": min(kd_t),
        "store_bytes_per_token": offline_rows.bytes_per_token(targets),
        "off_paired": statistics.median(k / p for k, p in zip(kd_t, plain_t, strict=True)),
    }  # fmt: skip


def bench_worker(opts: dict[str, Any], tmp: str, lay: Layout) -> list[dict]:
    """Every teacher of ``opts`` at one layout, in this process group; the last rank's rows are
    used (the last pipeline stage: the loss, the head, and the logging rank)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    torch.set_num_threads(opts["threads"] or max(1, (os.cpu_count() or 1) // world))
    rows = []
    for text in opts["teachers"]:
        shape = Shape.parse(text)
        root = os.path.join(tmp, f"teacher_{text}_w{world}_tp{lay.tp}")
        if not os.path.isdir(root):
            _save_teacher(root, shape, opts, lay.tp)
        rows += _run_case(opts, root, lay, shape)
    return rows


# ---- driver side -----------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--student", default="4x256x4", help="layers x hidden x heads")
    parser.add_argument("--teachers", nargs="+", default=["2x128x4", "4x192x4"])
    parser.add_argument("--layouts", nargs="+", default=["1:1:1", "2:2:1", "2:2:2"],
                        help="world:student TP:teacher TP[:student PP]")  # fmt: skip
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="KD/plain block pairs")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the micro-timings")
    parser.add_argument("--offline-top-k", type=int, default=64,
                        help="k of the stored-target rows (0: no offline rows)")  # fmt: skip
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="per process (0: cores / world)")
    parser.add_argument("--quick", action="store_true", help="one teacher, 2 layouts, short")
    parser.add_argument("--pipeline", action="store_true", help="PP 1/2/4 rows (PIPELINE)")
    parser.add_argument("--write-docs", action="store_true")
    if "--pipeline" in (argv if argv is not None else sys.argv[1:]):
        parser.set_defaults(**PIPELINE)
    args = parser.parse_args(argv)
    if args.quick:
        args.teachers, args.steps, args.rounds, args.reps = args.teachers[:1], 2, 2, 2
        args.layouts = ["1:1:1", "4:1:1:4"] if args.pipeline else ["1:1:1", "2:2:1"]
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every layout (one spawn each), print the table, optionally write the docs."""
    from tests.distributed.launcher import run_distributed

    args = _parse(argv)
    skip = ("layouts", "quick", "pipeline", "write_docs")
    opts = {k: v for k, v in vars(args).items() if k not in skip}
    rows: list[dict] = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teacher_overhead_") as tmp:
        for text in args.layouts:
            lay = Layout.parse(text)
            rows += run_distributed(bench_worker, lay.world, opts, tmp, lay)[-1]
            print(online_table(rows[-len(args.teachers) * len(lay.placements) :]), flush=True)
            if args.offline_top_k:
                print(offline_rows.offline_table(rows, args.offline_top_k), flush=True)
    offline = (
        "\n\n"
        + offline_rows.DOC.format(k=args.offline_top_k)
        + "\n\n"
        + offline_rows.offline_table(rows, args.offline_top_k)
        if any("off_kd" in r for r in rows)
        else ""
    )
    text = (
        f"Machine: {machine()}; torch {torch.__version__}; vocab {args.vocab} (padded as shown "
        f"by megatron), seq {args.seq}, micro-batch {args.mbs}, global batch {args.gbs} "
        f"({rows[0]['n_micro']} micro-batches/step at DP=1), {'bf16' if args.bf16 else 'fp32'}, "
        f"{args.threads or 'cores / world'} thread(s) per process, "
        f"KD w={KD_WEIGHT} T={TEMP}; {args.rounds} alternating blocks of {args.steps} KD / "
        f"{args.steps} plain steps of one trainer: ms/step = fastest block, measured = their "
        f"ratio (median of the paired KD/plain block ratios in brackets); micro-timings: min of "
        f"{args.reps}; {time.perf_counter() - start:.0f} s.\n"
        f"`python benchmarks/teacher_overhead.py {' '.join(argv or sys.argv[1:])}`; load "
        f"average before the run {load:.1f}\n\n" + online_table(rows) + offline
    )
    summary = pipeline_summary(rows)
    text += f"\n\n{summary}" if summary else ""
    print("\n" + text)
    if args.write_docs:
        pipeline = "## Teacher overhead over pipeline stages"
        write_docs(text, pipeline if args.pipeline else "## Teacher overhead")


if __name__ == "__main__":
    main()
