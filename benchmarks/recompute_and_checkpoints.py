"""Benchmark: activation memory with and without recomputation; checkpoint saves at scale.

Two sections of docs/benchmarks.md, each measured side by side in one run:

* **Activation recomputation** (``--tp`` ranks, one process group): for each ``--recompute-*``
  choice one trainer is built on the same shapes, warmed up one step, then ``--reps`` steps are
  recorded with ``torch.profiler(profile_memory=True)``: the peak of the bytes torch allocated
  during the step and still held (its "Total Allocated" counter, zero at the step's start) is the
  step's peak activation memory (activations, their gradients, the logits and temporaries; the
  weights, gradient buffers and optimizer state predate the step). Per rank, the largest over
  ranks is reported (best and median over the steps, identical when allocation is
  deterministic), with ms per step (an unprofiled step per rep) and the planner's activation
  estimate for the same shapes (16-bit formula, doubled for float32).
* **Checkpoints at scale** (``--dp`` ranks, distributed optimizer): the same trainer saves
  ``--reps`` times in each mode, modes interleaved: synchronous ``dp_reshardable`` (the default),
  asynchronous ``dp_reshardable`` (``--async-save``) and synchronous ``fully_reshardable``
  (``--ckpt-fully-reshardable``). Reported: training time blocked per save (the whole save when
  synchronous; the fork of the writer when asynchronous) and for async the time to the commit;
  peak host memory during the save above the resident set before it (the rank's ``VmHWM``,
  reset before each save, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers leave the
  resident set), largest over ranks.

    python benchmarks/recompute_and_checkpoints.py [--quick] [--write-docs]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import load_average, machine, write_docs  # noqa: E402

MIB = 2**20
#: name -> flags of each recomputation choice measured.
RECOMPUTE = {
    "none": [],
    "selective (core_attn)": ["--recompute-granularity", "selective"],
    "selective (core_attn, mlp)": [
        "--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"
    ],
    "full (block, half the layers)": [
        "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "HALF",
    ],
    "full (uniform, 1 layer)": [
        "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "1",
    ],
}  # fmt: skip
CHECKPOINT_MODES = {
    "sync dp_reshardable": {},
    "async dp_reshardable": {"async_save": True},
    "sync fully_reshardable": {"ckpt_fully_reshardable": True},
}


class RandomTokens:
    """Fixed random sequences (no files): sample ``i`` is seeded by ``i``."""

    def __init__(self, vocab: int, seq: int) -> None:
        self.vocab, self.seq = vocab, seq

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        row = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}  # fmt: skip


def _flags(opts: dict[str, Any]) -> list[str]:
    layers, hidden, heads = (int(x) for x in opts["model"].split("x"))
    return [
        "--mock-data", "--vocab-size", str(opts["vocab"]), "--seq-length", str(opts["seq"]),
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads",
        str(heads), "--micro-batch-size", str(opts["mbs"]), "--global-batch-size",
        str(opts["mbs"] * opts["dp"]), "--train-iters", "1000", "--log-interval", "1000",
        "--make-vocab-size-divisible-by", "8",
    ]  # fmt: skip


def _trainer(argv: list[str]) -> Any:
    import torch.distributed as dist

    from salt_megatron.config import parse_config
    from salt_megatron.training.trainer import Trainer

    cfg = parse_config(argv)
    cfg.validate_world(dist.get_world_size())
    return Trainer(cfg, (RandomTokens(cfg.model.vocab_size or 0, cfg.data.seq_length), None),
                   cfg.model.vocab_size or 0)  # fmt: skip


def _close(trainer: Any) -> None:
    from megatron.core import parallel_state

    trainer.close()
    parallel_state.destroy_model_parallel()


def _step_peak_bytes(trainer: Any, trace: str) -> int:
    """Peak bytes torch allocated during one training step and held (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
    prof.export_chrome_trace(trace)
    events = json.loads(Path(trace).read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    os.unlink(trace)
    return max(totals, default=0)


def _planner_activation_bytes(trainer: Any) -> float:
    """The planner's activation estimate for this trainer's config (16-bit formula x 2 in fp32)."""
    from salt_megatron import planner

    cfg, lay = trainer.cfg, trainer.layout
    memory = planner.stage_memory(cfg, trainer.vocab_size, lay.dp, trainer.num_microbatches, 0)
    activations = next(v for k, v in memory.items() if k.startswith("activations"))
    return activations * (1.0 if cfg.training.bf16 else 2.0)


def recompute_worker(opts: dict[str, Any], tmp: str) -> list[dict[str, Any]]:
    """Every recompute choice on this process group; per choice this rank's numbers."""
    import torch.distributed as dist

    rank, rows = dist.get_rank(), []
    layers = int(opts["model"].split("x")[0])
    for name, flags in RECOMPUTE.items():
        flags = [str(layers // 2) if f == "HALF" else f for f in flags]
        tp = ["--tensor-model-parallel-size", str(opts["tp"])] if opts["tp"] > 1 else []
        trainer = _trainer(_flags({**opts, "dp": 1}) + tp + flags)
        trainer.train_step()  # warm-up: Adam's state exists from here on
        peaks, seconds = [], []
        for rep in range(opts["reps"]):
            peaks.append(_step_peak_bytes(trainer, f"{tmp}/trace_{rank}_{rep}.json"))
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step()
            seconds.append(time.perf_counter() - start)
        rows.append({"name": name, "peaks": peaks, "seconds": seconds,
                     "planner": _planner_activation_bytes(trainer)})  # fmt: skip
        _close(trainer)
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed_save(trainer: Any, cfg: Any, mode: dict[str, Any], root: str) -> dict[str, float]:
    """One save in ``mode``: training time blocked, time to the commit, peak extra host memory."""
    import torch.distributed as dist

    from salt_megatron.checkpoint.manager import Checkpointer
    from salt_megatron.training.metrics import peak_memory_mib

    checkpoint = dataclasses.replace(cfg.checkpoint, save=root, keep_last=1, **mode)
    trainer.cfg = dataclasses.replace(cfg, checkpoint=checkpoint)
    ckpt = Checkpointer(trainer, "benchmark", install_signal=False)
    dist.barrier()
    before = _rss_bytes()
    peak_memory_mib()  # resets the peak
    start = time.perf_counter()
    ckpt.save()
    blocked = time.perf_counter() - start
    peak = peak_memory_mib()["peak_rss_mib"] * MIB - before
    ckpt.wait()
    committed = time.perf_counter() - start
    ckpt.close()
    shutil.rmtree(root, ignore_errors=True)
    return {"blocked": blocked, "committed": committed, "peak": peak}


def checkpoint_worker(opts: dict[str, Any], tmp: str) -> dict[str, Any]:
    """Every save mode ``reps`` times, interleaved, on one trainer; this rank's numbers."""
    import torch.distributed as dist

    trainer = _trainer([*_flags(opts), "--use-distributed-optimizer"])
    trainer.train_step()  # Adam's state exists
    cfg = trainer.cfg
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CHECKPOINT_MODES}
    for rep in range(opts["reps"]):
        for name, mode in CHECKPOINT_MODES.items():
            results[name].append(_timed_save(trainer, cfg, mode, f"{tmp}/ckpt_{rep}"))
    from salt_megatron.models.student import count_parameters

    params = count_parameters(trainer.model)
    dist.barrier()
    _close(trainer)
    return {"results": results, "params": params}


# ---- driver side -----------------------------------------------------------------------------
def _best_median(values: list[float], scale: float, fmt: str) -> str:
    return f"{min(values) / scale:{fmt}} ({statistics.median(values) / scale:{fmt}})"


def recompute_table(per_rank: list[list[dict[str, Any]]]) -> str:
    lines = [
        "| recompute | peak step memory, MiB: best (median) | vs none | ms per step: best "
        "(median) | vs none | planner activations, MiB (fp32) |",
        "|---|---|---|---|---|---|",
    ]
    base_peak = base_ms = 0.0
    for i, row in enumerate(per_rank[0]):
        peaks = [max(rank[i]["peaks"][r] for rank in per_rank) for r in range(len(row["peaks"]))]
        seconds = [max(rank[i]["seconds"][r] for rank in per_rank) for r in range(len(peaks))]
        if i == 0:
            base_peak, base_ms = min(peaks), min(seconds)
        lines.append(
            f"| {row['name']} | {_best_median(peaks, MIB, '.1f')} | {min(peaks) / base_peak:.2f} "
            f"| {_best_median(seconds, 1e-3, '.0f')} | {min(seconds) / base_ms:.2f} "
            f"| {row['planner'] / MIB:.1f} |"
        )
    return "\n".join(lines)


def checkpoint_table(per_rank: list[dict[str, Any]]) -> str:
    lines = [
        "| save | training blocked, s: best (median) | vs sync dp_reshardable | until committed, "
        "s: best (median) | peak extra host memory, MiB: best (median) |",
        "|---|---|---|---|---|",
    ]
    names = list(CHECKPOINT_MODES)
    reps = len(per_rank[0]["results"][names[0]])

    def worst(name: str, key: str) -> list[float]:
        return [max(r["results"][name][i][key] for r in per_rank) for i in range(reps)]

    base = min(worst(names[0], "blocked"))
    for name in names:
        blocked = worst(name, "blocked")
        lines.append(
            f"| {name} | {_best_median(blocked, 1, '.3f')} | {min(blocked) / base:.2f} "
            f"| {_best_median(worst(name, 'committed'), 1, '.3f')} "
            f"| {_best_median(worst(name, 'peak'), MIB, '.1f')} |"
        )
    return "\n".join(lines)


def _shape(text: str) -> str:
    layers, hidden, heads = text.split("x")
    return f"{layers} layers of width {hidden} ({heads} heads)"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="8x256x8", help="layers x hidden x heads (recompute)")
    parser.add_argument("--ckpt-model", default="8x512x8", help="layers x hidden x heads (saves)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2, help="ranks of the recompute measurement")
    parser.add_argument("--dp", type=int, default=2, help="ranks of the checkpoint measurement")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", choices=["recompute", "checkpoints"])
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 repetitions")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.ckpt_model, args.seq, args.reps = "4x128x4", "4x256x4", 128, 2
    return args


def main(argv: list[str] | None = None) -> None:
    """Run both measurements (one process group each), print the tables, optionally write docs."""
    from tests.distributed.launcher import run_distributed

    args = _parse(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    opts = {k: v for k, v in vars(args).items() if k not in ("quick", "write_docs", "only")}
    command = f"`python benchmarks/recompute_and_checkpoints.py {' '.join(argv or sys.argv[1:])}`"

    def header(model: str, start: float, load: str) -> str:
        return (
            f"Machine: {machine()}; torch {torch.__version__}; load average {load} at the start "
            f"(shared machine); {_shape(model)}, seq {args.seq}, micro-batch {args.mbs}, vocab "
            f"{args.vocab}, fp32; {args.reps} repetitions; {time.perf_counter() - start:.0f} s."
            f"\n{command}\n\n"
        )

    sections: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="scale_bench_") as tmp:
        if args.only in (None, "recompute"):
            start, load = time.perf_counter(), load_average()
            ranks = run_distributed(recompute_worker, args.tp, {**opts, "model": args.model}, tmp)
            text = f"TP {args.tp}. " + header(args.model, start, load) + recompute_table(ranks)
            sections.append(("## Activation recomputation", text))
        if args.only in (None, "checkpoints"):
            start, load = time.perf_counter(), load_average()
            ckpt = {**opts, "model": args.ckpt_model}
            ranks = run_distributed(checkpoint_worker, args.dp, ckpt, tmp)
            what = f"DP {args.dp}, distributed optimizer, {ranks[0]['params'] / 1e6:.1f}M params"
            text = f"{what} per rank. " + header(args.ckpt_model, start, load)
            sections.append(("## Checkpoints at scale", text + checkpoint_table(ranks)))
    for heading, text in sections:
        print(text, flush=True)
        if args.write_docs:
            write_docs(text, heading)


if __name__ == "__main__":
    main()
