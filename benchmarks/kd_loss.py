"""Benchmark: fused vocab-parallel KD loss vs megatron-core CE vs a straightforward KL+CE.

Methods (forward + backward, bf16 logits, w=0.5, T=2, same inputs alive for all three):
  (a) ``salt_megatron.loss.kd_cross_entropy``
  (b) ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (hard labels only: the floor)
  (c) ``naive_kd_loss`` below: float32 log-softmax of both models with the usual all-reduces.

TP > 1 runs on real gloo processes (``tests/distributed/launcher.py``), one spawn per TP size.
Time: minimum over ``--reps`` interleaved repetitions of the slowest rank (the machine may be
shared); the ratio a/b is also given from the medians (slowest rank). Peak memory: each worker
starts with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor buffer is its own mmap that is
returned to the OS when freed; the peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident set before the call is the call's peak extra memory
("extra"); "total" adds the live input shards (student + teacher).
Collectives: calls of torch.distributed collectives during one forward + backward.

    python benchmarks/kd_loss.py [--tokens 256 1024] [--vocab 32768 131072] [--tp 1 2 4]
                                 [--reps 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine, write_docs  # noqa: E402

W, TEMP = 0.5, 2.0
METHODS = ("a", "b", "c")


def _vp_log_softmax(x_nv: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel float32 log-softmax: MAX all-reduce, differentiable SUM all-reduce."""
    from torch.distributed.nn.functional import all_reduce as diff_all_reduce

    max_n1 = x_nv.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(max_n1, op=dist.ReduceOp.MAX, group=group)
    sum_n1 = diff_all_reduce((x_nv - max_n1).exp().sum(dim=-1, keepdim=True), group=group)
    return x_nv - (sum_n1.log() + max_n1)


def naive_kd_loss(s_nv, t_nv, y_n, group, vocab_start: int) -> torch.Tensor:
    """(c): per-token (1-w) CE + w KD with float32 log-softmax copies of both models."""
    from torch.distributed.nn.functional import all_reduce as diff_all_reduce

    s32_nv = s_nv.float()
    logp_nv = _vp_log_softmax(s32_nv / TEMP, group)
    with torch.no_grad():
        q_nv = _vp_log_softmax(t_nv.float() / TEMP, group).exp()
    kd_n = -diff_all_reduce((q_nv * logp_nv).sum(dim=-1), group=group)
    logp1_nv = _vp_log_softmax(s32_nv, group)
    col_n = y_n - vocab_start
    local_n = (col_n >= 0) & (col_n < s_nv.shape[-1])
    picked_n = logp1_nv.gather(1, col_n.clamp(0, s_nv.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    ce_n = -diff_all_reduce(picked_n * local_n, group=group)
    return (1 - W) * ce_n + W * kd_n


def _rss_bytes() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss * 1024, hwm * 1024


def _peak_extra(fn: Callable[[], None]) -> int:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0, _ = _rss_bytes()
    fn()
    return _rss_bytes()[1] - rss0


def _count_collectives(fn: Callable[[], None]) -> int:
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "reduce", "all_to_all_single")  # fmt: skip
    saved = {n: getattr(dist, n) for n in names}
    calls = [0]

    def wrap(orig):  # type: ignore[no-untyped-def]
        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return orig(*args, **kwargs)

        return counted

    for n, orig in saved.items():
        setattr(dist, n, wrap(orig))
    try:
        fn()
    finally:
        for n, orig in saved.items():
            setattr(dist, n, orig)
    return calls[0]


def _runners(s_nv, t_nv, y_n, group, start: int) -> dict[str, Callable[[], None]]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from salt_megatron.loss import kd_cross_entropy

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss_fn().sum().backward()
            s_nv.grad = None

        return step

    return {
        "a": run(lambda: kd_cross_entropy(s_nv, t_nv, y_n, W, TEMP, group)),
        "b": run(lambda: vocab_parallel_cross_entropy(s_nv, y_n)),
        "c": run(lambda: naive_kd_loss(s_nv, t_nv, y_n, group, start)),
    }


def _measure(runners: dict[str, Callable[[], None]], reps: int, group) -> dict[str, dict]:
    out: dict[str, dict] = {m: {"times": []} for m in METHODS}
    for m in METHODS:
        runners[m]()  # warm-up
        out[m]["coll"] = _count_collectives(runners[m])
        out[m]["mem"] = _peak_extra(runners[m])
    for _ in range(reps):
        for m in METHODS:
            dist.barrier(group=group)
            t0 = time.perf_counter()
            runners[m]()
            out[m]["times"].append(time.perf_counter() - t0)
    for m in METHODS:
        vals = torch.tensor([min(out[m]["times"]), float(out[m]["mem"])], dtype=torch.float64)
        dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group)
        out[m]["time"], out[m]["mem"] = vals[0].item(), int(vals[1].item())
        med = torch.tensor([statistics.median(out[m]["times"])], dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
        out[m]["median"] = med.item()
    return out


def bench_worker(tp: int, tokens: list[int], vocabs: list[int], reps: int) -> list[dict]:
    """Run every (tokens, vocab) case on a TP group of size ``tp``; rank 0's rows are used."""
    from megatron.core import parallel_state

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    rows = []
    for vocab in vocabs:
        for n_tok in tokens:
            width = vocab // tp
            gen = torch.Generator().manual_seed(rank)
            s_nv = (torch.randn(n_tok, width, generator=gen) * 2).bfloat16().requires_grad_()
            t_nv = (torch.randn(n_tok, width, generator=gen) * 2).bfloat16()
            y_n = torch.randint(0, vocab, (n_tok,), generator=torch.Generator().manual_seed(0))
            res = _measure(_runners(s_nv, t_nv, y_n, group, rank * width), reps, group)
            rows.append({"tp": tp, "tokens": n_tok, "vocab": vocab, "width": width,
                         "inputs": 2 * s_nv.numel() * s_nv.element_size(), **res})  # fmt: skip
            del s_nv, t_nv
    return rows


def _table(rows: list[dict]) -> str:
    mib = 2.0**20
    lines = [
        "| TP | tokens | V | V/tp | time a / b / c (s) | extra peak a / b / c (MiB) "
        "| collectives a / b / c | time a/b | time a/b (median) | total mem a/b | total mem a/c |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b, c = r["a"], r["b"], r["c"]
        tot = {m: r["inputs"] + r[m]["mem"] for m in METHODS}
        lines.append(
            f"| {r['tp']} | {r['tokens']} | {r['vocab']} | {r['width']} "
            f"| {a['time']:.3f} / {b['time']:.3f} / {c['time']:.3f} "
            f"| {a['mem'] / mib:.0f} / {b['mem'] / mib:.0f} / {c['mem'] / mib:.0f} "
            f"| {a['coll']} / {b['coll']} / {c['coll']} "
            f"| {a['time'] / b['time']:.2f} | {a['median'] / b['median']:.2f} "
            f"| {tot['a'] / tot['b']:.2f} "
            f"| {tot['a'] / tot['c']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    from tests.distributed.launcher import run_distributed

    rows: list[dict] = []
    for tp in args.tp:
        rows += run_distributed(bench_worker, tp, tp, args.tokens, args.vocab, args.reps)[0]
        print(_table(rows[-len(args.tokens) * len(args.vocab) :]), flush=True)
    text = (
        f"Machine: {machine()}; torch {torch.__version__}; bf16 logits, w={W}, T={TEMP}; "
        f"forward+backward, min (and median) of {args.reps} interleaved runs (slowest rank).\n\n"
        + _table(rows)
    )
    print("\n" + text)
    if args.write_docs:
        write_docs(text, "## KD loss")


if __name__ == "__main__":
    main()
