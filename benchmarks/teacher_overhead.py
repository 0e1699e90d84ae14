"""Benchmark: KD-phase step time over the plain step time, against the FLOP-ideal ratio.

For each layout (world size, student TP, teacher TP) one process group is spawned; inside it, for
each teacher size, a teacher checkpoint is saved (random weights, our checkpoint layout), a
:class:`~salt_megatron.training.trainer.Trainer` with KD enabled (schedule ``step``, w=0.5, so every
step is a KD step) is built on a synthetic dataset, warmed up, and then timed in alternating
blocks of ``--steps`` KD steps and ``--steps`` plain steps of the *same* trainer (the plain block
swaps the KD forward step for the plain one; the teacher stays built), ``--rounds`` times.
Reported per row (the fastest block of each kind: the machine may be shared):

* plain / KD ms per optimizer step, their ratio ("measured"), the FLOP-ideal ratio
  ``1 + F_teacher_fwd / F_student_fwd_bwd`` per token (:func:`flop_ideal_ratio`), measured/ideal;
* the teacher time share (``KDForwardStep.teacher_timer`` over the KD step time);
* where the excess ``KD - plain`` goes, per step: the teacher body (teacher time minus the
  exchange), the exchange into the student's vocabulary layout (``student_layout_logits`` minus
  ``final_hidden`` on the same rows, timed separately: the all-gather of hidden states and the
  output layer's vocabulary slice), the KD loss over megatron's
  ``vocab_parallel_cross_entropy`` (forward + backward on logits of the step's shape, timed
  separately, times the micro-batches), and the unexplained rest.

Offline rows (``--offline-top-k k``, 0 disables): the online trainer's teacher stores the top-k
targets of the samples a second trainer will read (the tool's pass, timed), and that trainer,
built with ``--kd-targets`` and no teacher, is timed the same way (KD on stored targets / plain).

    python benchmarks/teacher_overhead.py [--quick] [--offline-top-k 64] [--write-docs]
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

from benchmarks.common import machine, write_docs  # noqa: E402
from salt_megatron.config.schema import ModelConfig  # noqa: E402
from salt_megatron.models import flops as model_flops  # noqa: E402

KD_WEIGHT, TEMP = 0.5, 1.0


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
    if not kd:
        setattr(trainer.kd, "forward_step", lambda step: None)  # noqa: B010 (plain, teacher kept)
    trainer.kd.take_teacher_seconds()
    try:
        results = [trainer.train_step() for _ in range(steps)]
    finally:
        if not kd:
            del trainer.kd.forward_step
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


def _run_case(opts: dict[str, Any], root: str, tp: int, ttp: int, shape: Shape) -> dict:
    """Build a KD trainer for one (layout, teacher) case and time it; returns the row."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import parse_config
    from salt_megatron.training.trainer import Trainer

    student = Shape.parse(opts["student"])
    cfg = parse_config([
        *_common_flags(opts), *student.flags(), *shape.flags("teacher-"),
        "--kd-teacher-load", root, "--kd-steps", "100000", "--kd-schedule", "step",
        "--kd-weight", str(KD_WEIGHT), "--kd-temperature", str(TEMP),
        "--tensor-model-parallel-size", str(tp), "--teacher-tensor-model-parallel-size", str(ttp),
    ])  # fmt: skip
    cfg.validate_world(dist.get_world_size())
    trainer = Trainer(cfg, (RandomTokens(opts["vocab"], opts["seq"]), None), opts["vocab"])
    kd_t, plain_t, teach_t, ratios = _time_blocks(trainer, opts["steps"], opts["rounds"])
    loss_kd, loss_ce = _loss_seconds(trainer, opts["reps"])
    exchange = _exchange_seconds(trainer, opts["reps"])
    n_micro = trainer.num_microbatches
    padded = trainer.padded_vocab
    row: dict[str, Any] = {
        "world": dist.get_world_size(), "tp": tp, "ttp": ttp, "student": str(student),
        "teacher": str(shape), "n_micro": n_micro, "padded_vocab": padded,
        "plain": min(plain_t), "kd": min(kd_t), "ratio": min(kd_t) / min(plain_t),
        "paired": statistics.median(ratios), "teacher_s": min(teach_t),
        "exchange": exchange * n_micro, "loss_excess": (loss_kd - loss_ce) * n_micro,
        "loss_kd": loss_kd, "loss_ce": loss_ce,
        "ideal": flop_ideal_ratio(student.model(opts["vocab"]), shape.model(opts["vocab"]),
                                  opts["seq"], padded),
        "head_s": head_share(student.model(opts["vocab"]), opts["seq"], padded),
        "head_t": head_share(shape.model(opts["vocab"]), opts["seq"], padded),
    }  # fmt: skip
    targets = os.path.join(root, f"targets_ttp{ttp}")  # a fresh store per case: the pass is timed
    if opts["offline_top_k"]:
        row["pass_s"], row["pass_steps"] = _store_targets(trainer, targets, opts)
    trainer.close()
    mpu.destroy_model_parallel()
    if opts["offline_top_k"]:
        row.update(_offline_case(opts, targets, row["pass_steps"], student, tp))
        mpu.destroy_model_parallel()
    return row


def _time_blocks(trainer: Any, steps: int, rounds: int) -> tuple[list[float], ...]:
    """Warm up, then ``rounds`` blocks of ``steps`` KD steps and ``steps`` plain steps:
    (KD s/step, plain s/step, teacher s/step, KD/plain) per round."""
    for kd in (True, True, False):  # warm-up: 2 KD steps, 1 plain step
        _block(trainer, 1, kd)
    kd_t, plain_t, teach_t, ratios = [], [], [], []
    for _ in range(rounds):
        k, t = _block(trainer, steps, True)
        p, _ = _block(trainer, steps, False)
        kd_t.append(k)
        plain_t.append(p)
        teach_t.append(t)
        ratios.append(k / p)
    return kd_t, plain_t, teach_t, ratios


def _store_targets(trainer: Any, root: str, opts: dict[str, Any]) -> tuple[float, int]:
    """The one-off teacher pass of ``tools/save_teacher_targets.py`` over the samples an
    offline trainer of this layout reads (the online trainer's teacher, its student layout).
    Returns (seconds of the pass, optimizer steps it covers)."""
    import torch.distributed as dist

    from salt_megatron.data.teacher_targets import TargetSpec, write_spec
    from salt_megatron.distill.targets import save_targets

    lay, dataset = trainer.layout, trainer.train_ds
    n_steps = 3 + 2 * opts["steps"] * opts["rounds"]
    spec = TargetSpec(
        teacher="benchmark", tokenizer_fingerprint="", dataset_fingerprint="",
        dataset_length=len(dataset), num_samples=n_steps * opts["gbs"], seq_length=opts["seq"],
        vocab_size=opts["vocab"], temperature=TEMP, top_k=opts["offline_top_k"], top_p=None,
        samples_per_shard=opts["gbs"],
    )  # fmt: skip
    if dist.get_rank() == 0:
        write_spec(root, spec)
    dist.barrier()
    start = time.perf_counter()
    save_targets(trainer.kd.step_fn.teacher, dataset, root, spec, opts["mbs"], lay.dp_rank,
                 lay.dp, lay.tp_group, lay.tp_rank == 0)  # fmt: skip
    return time.perf_counter() - start, n_steps


def _offline_case(
    opts: dict[str, Any], targets: str, n_steps: int, student: Shape, tp: int
) -> dict[str, float]:
    """KD steps on the stored targets (no teacher) against plain steps of the same trainer."""
    import torch.distributed as dist

    from salt_megatron.config import parse_config
    from salt_megatron.data.teacher_targets import TargetStore
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config([
        *_common_flags(opts), *student.flags(), "--kd-targets", targets,
        "--kd-steps", str(n_steps), "--kd-schedule", "step", "--kd-weight", str(KD_WEIGHT),
        "--kd-temperature", str(TEMP), "--tensor-model-parallel-size", str(tp),
    ])  # fmt: skip
    cfg.validate_world(dist.get_world_size())
    data = (RandomTokens(opts["vocab"], opts["seq"]), None)
    trainer = Trainer(cfg, data, opts["vocab"], kd_targets=TargetStore(targets))
    kd_t, plain_t, _, ratios = _time_blocks(trainer, opts["steps"], opts["rounds"])
    trainer.close()
    return {"off_plain": min(plain_t), "off_kd": min(kd_t),
            "off_paired": statistics.median(ratios)}  # fmt: skip


def bench_worker(opts: dict[str, Any], tmp: str, tp: int, ttp: int) -> list[dict]:
    """Every teacher of ``opts`` at one layout, in this process group; rank 0's rows are used."""
    import torch.distributed as dist

    world = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rows = []
    for text in opts["teachers"]:
        shape = Shape.parse(text)
        root = os.path.join(tmp, f"teacher_{text}_w{world}_tp{tp}")
        _save_teacher(root, shape, opts, tp)
        rows.append(_run_case(opts, root, tp, ttp, shape))
    return rows


# ---- driver side -----------------------------------------------------------------------------
def _table(rows: list[dict]) -> str:
    lines = [
        "| world | TP | teacher TP | student | teacher | plain ms | KD ms | measured "
        "(paired median) | FLOP-ideal | measured/ideal | teacher share | excess ms: teacher fwd / "
        "exchange / KD loss - CE / rest | LM-head FLOP share S / T |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = 1000.0
        excess = r["kd"] - r["plain"]
        fwd = r["teacher_s"] - r["exchange"]
        rest = excess - r["teacher_s"] - r["loss_excess"]
        lines.append(
            f"| {r['world']} | {r['tp']} | {r['ttp']} | {r['student']} | {r['teacher']} "
            f"| {r['plain'] * ms:.0f} | {r['kd'] * ms:.0f} | {r['ratio']:.2f} ({r['paired']:.2f}) "
            f"| {r['ideal']:.3f} "
            f"| {r['ratio'] / r['ideal']:.2f} | {r['teacher_s'] / r['kd']:.0%} "
            f"| {fwd * ms:.0f} / {r['exchange'] * ms:.0f} / {r['loss_excess'] * ms:.0f} "
            f"/ {rest * ms:.0f} | {r['head_s']:.0%} / {r['head_t']:.0%} |"
        )
    return "\n".join(lines)


def _offline_table(rows: list[dict], top_k: int) -> str:
    lines = [
        f"| world | TP | teacher TP | student | teacher | plain ms | offline KD ms (k={top_k}) "
        "| offline/plain (paired median) | online KD / plain | one-off teacher pass ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = 1000.0
        lines.append(
            f"| {r['world']} | {r['tp']} | {r['ttp']} | {r['student']} | {r['teacher']} "
            f"| {r['off_plain'] * ms:.0f} | {r['off_kd'] * ms:.0f} "
            f"| {r['off_kd'] / r['off_plain']:.2f} ({r['off_paired']:.2f}) | {r['ratio']:.2f} "
            f"| {r['pass_s'] / r['pass_steps'] * ms:.0f} |"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--student", default="4x256x4", help="layers x hidden x heads")
    parser.add_argument("--teachers", nargs="+", default=["2x128x4", "4x192x4"])
    parser.add_argument("--layouts", nargs="+", default=["1:1:1", "2:2:1", "2:2:2"],
                        help="world:student TP:teacher TP")  # fmt: skip
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
    parser.add_argument("--quick", action="store_true", help="one teacher, 2 layouts, short")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.teachers, args.layouts = args.teachers[:1], ["1:1:1", "2:2:1"]
        args.steps, args.rounds, args.reps = 2, 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every layout (one spawn each), print the table, optionally write the docs."""
    from tests.distributed.launcher import run_distributed

    args = _parse(argv)
    opts = {k: v for k, v in vars(args).items() if k not in ("layouts", "quick", "write_docs")}
    rows: list[dict] = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teacher_overhead_") as tmp:
        for text in args.layouts:
            world, tp, ttp = (int(x) for x in text.split(":"))
            rows += run_distributed(bench_worker, world, opts, tmp, tp, ttp)[0]
            print(_table(rows[-len(args.teachers) :]), flush=True)
            if args.offline_top_k:
                print(_offline_table(rows[-len(args.teachers) :], args.offline_top_k), flush=True)
    offline = (
        "\n\nOffline rows (`--kd-targets`): the online trainer's teacher stores its top-"
        f"{args.offline_top_k} targets of the samples a second trainer reads "
        "(`salt_megatron.distill.targets.save_targets`, the tool's pass, timed: one-off ms per "
        "optimizer step of samples), then that trainer, without a teacher, is timed like the "
        "online one (its plain blocks read the same batches, targets unused).\n\n"
        + _offline_table(rows, args.offline_top_k)
        if args.offline_top_k
        else ""
    )
    text = (
        f"Machine: {machine()}; torch {torch.__version__}; vocab {args.vocab} (padded as shown "
        f"by megatron), seq {args.seq}, micro-batch {args.mbs}, global batch {args.gbs} "
        f"({rows[0]['n_micro']} micro-batches/step at DP=1), {'bf16' if args.bf16 else 'fp32'}, "
        f"KD w={KD_WEIGHT} T={TEMP}; {args.rounds} alternating blocks of {args.steps} KD / "
        f"{args.steps} plain steps of one trainer: ms/step = fastest block, measured = their "
        f"ratio (median of the paired KD/plain block ratios in brackets); micro-timings: min of "
        f"{args.reps}; {time.perf_counter() - start:.0f} s.\n"
        f"`python benchmarks/teacher_overhead.py {' '.join(argv or sys.argv[1:])}`; load "
        f"average before the run {load:.1f}\n\n" + _table(rows) + offline
    )
    print("\n" + text)
    if args.write_docs:
        write_docs(text, "## Teacher overhead")


if __name__ == "__main__":
    main()
