"""Benchmark: our KD losses (dense and sparse targets) vs megatron-core CE vs a naive KL+CE.

Methods (forward + backward, bf16 logits, w=0.5, T=2, same inputs alive for all):
  * ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (hard labels only: the floor;
    every ratio is against it);
  * ``salt_megatron.loss.kd_cross_entropy`` on the teacher's dense logits shard, with
    ``teacher_scratch=True`` as the KD step calls it (a fresh copy of the teacher shard is made
    before each call, untimed);
  * ``naive_kd_loss`` below: float32 log-softmax of both models with the usual all-reduces;
  * ``salt_megatron.loss.sparse_kd_cross_entropy`` on stored-target-like inputs: k distinct ids
    per token with their log-probabilities and residual (``--sparse-k``).

TP > 1 runs on real gloo processes (``tests/distributed/launcher.py``), one spawn per TP size.
Time: minimum over ``--reps`` interleaved repetitions of the slowest rank (the machine may be
shared); the ratios to CE are also given from the medians (slowest rank). Peak memory: each worker
starts with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor buffer is its own mmap that is
returned to the OS when freed; the peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident set before the call is the call's peak extra memory
("extra"); "total" adds the live inputs each method reads (the student shard; plus the teacher
shard for the dense losses, the sparse targets for the sparse one) and is given against CE's.
Collectives: calls of torch.distributed collectives during one forward + backward.

    python benchmarks/kd_loss.py [--tokens 256 1024] [--vocab 32768 131072] [--tp 1 2 4]
                                 [--reps 3] [--sparse-k 8 32 128] [--write-docs]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine, write_docs  # noqa: E402

W, TEMP = 0.5, 2.0


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


@dataclass
class Method:
    """One loss under test: ``run`` is timed; ``prepare`` (untimed) runs before every call."""

    name: str
    run: Callable[[], None]
    inputs: int  # bytes of the live inputs it reads (student shard plus teacher data)
    prepare: Callable[[], None] = lambda: None


def _sparse_targets(n_tok: int, vocab: int, k: int) -> tuple[torch.Tensor, ...]:
    """``k`` distinct ids per token (a stride coprime to the power-of-two vocabulary), their
    log-probabilities (95% of the mass) and the residual, the same on every rank."""
    gen = torch.Generator().manual_seed(1)
    base_n1 = torch.randint(0, vocab, (n_tok, 1), generator=gen)
    ids_nk = ((base_n1 + 997 * torch.arange(k)) % vocab).to(torch.int32)
    logq_nk = torch.log_softmax(torch.randn(n_tok, k, generator=gen), dim=-1) + math.log(0.95)
    return ids_nk, logq_nk, torch.full((n_tok,), 0.05)


def _methods(s_nv, t_nv, y_n, group, start: int, vocab: int, sparse_k: list[int]) -> list[Method]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from salt_megatron.loss import kd_cross_entropy, sparse_kd_cross_entropy

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss_fn().sum().backward()
            s_nv.grad = None

        return step

    shard = s_nv.numel() * s_nv.element_size()
    scratch = [t_nv.clone()]  # the teacher's logits: a temporary the KD step lets the loss reuse

    def fresh_teacher() -> None:
        scratch[0].copy_(t_nv)

    def dense() -> torch.Tensor:
        return kd_cross_entropy(s_nv, scratch[0], y_n, W, TEMP, group, teacher_scratch=True)

    methods = [
        Method("CE (megatron)", run(lambda: vocab_parallel_cross_entropy(s_nv, y_n)), shard),
        Method("dense KD (ours)", run(dense), 2 * shard, fresh_teacher),
        Method("naive KL+CE", run(lambda: naive_kd_loss(s_nv, t_nv, y_n, group, start)), 2 * shard),
    ]
    for k in sparse_k:
        targets = _sparse_targets(y_n.numel(), vocab, k)
        size = sum(x.numel() * x.element_size() for x in targets)

        def sparse(targets: tuple[torch.Tensor, ...] = targets) -> torch.Tensor:
            ids_nk, logq_nk, resid_n = targets
            return sparse_kd_cross_entropy(s_nv, ids_nk, logq_nk, resid_n, y_n, W, TEMP, group)

        methods.append(Method(f"sparse KD k={k} (ours)", run(sparse), shard + size))
    return methods


def _measure(methods: list[Method], reps: int, group) -> list[dict]:
    out: list[dict[str, Any]] = [{"name": m.name, "inputs": m.inputs, "times": []} for m in methods]
    for m, res in zip(methods, out):
        m.prepare()
        m.run()  # warm-up
        m.prepare()
        res["coll"] = _count_collectives(m.run)
        m.prepare()
        res["mem"] = _peak_extra(m.run)
    for _ in range(reps):
        for m, res in zip(methods, out):
            m.prepare()
            dist.barrier(group=group)
            t0 = time.perf_counter()
            m.run()
            res["times"].append(time.perf_counter() - t0)
    for res in out:
        vals = torch.tensor(
            [min(res["times"]), statistics.median(res["times"]), float(res["mem"])],
            dtype=torch.float64,
        )
        dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group)
        res["time"], res["median"], res["mem"] = vals[0].item(), vals[1].item(), int(vals[2])
        del res["times"]
    return out


def bench_worker(
    tp: int, tokens: list[int], vocabs: list[int], reps: int, sparse_k: list[int]
) -> list[dict]:
    """Run every (tokens, vocab) case on a TP group of size ``tp``; rank 0's rows are used."""
    from megatron.core import parallel_state

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    cases = []
    for vocab in vocabs:
        for n_tok in tokens:
            width = vocab // tp
            gen = torch.Generator().manual_seed(rank)
            s_nv = (torch.randn(n_tok, width, generator=gen) * 2).bfloat16().requires_grad_()
            t_nv = (torch.randn(n_tok, width, generator=gen) * 2).bfloat16()
            y_n = torch.randint(0, vocab, (n_tok,), generator=torch.Generator().manual_seed(0))
            methods = _methods(s_nv, t_nv, y_n, group, rank * width, vocab, sparse_k)
            cases.append({"tp": tp, "tokens": n_tok, "vocab": vocab, "width": width,
                          "methods": _measure(methods, reps, group)})  # fmt: skip
            del s_nv, t_nv, methods
    return cases


def _table(cases: list[dict]) -> str:
    mib = 2.0**20
    lines = [
        "| TP | tokens | V | V/tp | method | time (s) best / median | / CE best | / CE median "
        "| extra peak (MiB) | total mem / CE | collectives |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        ce = case["methods"][0]
        ce_total = ce["inputs"] + ce["mem"]
        for m in case["methods"]:
            lines.append(
                f"| {case['tp']} | {case['tokens']} | {case['vocab']} | {case['width']} "
                f"| {m['name']} | {m['time']:.3f} / {m['median']:.3f} "
                f"| {m['time'] / ce['time']:.2f} | {m['median'] / ce['median']:.2f} "
                f"| {m['mem'] / mib:.0f} | {(m['inputs'] + m['mem']) / ce_total:.2f} "
                f"| {m['coll']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sparse-k", type=int, nargs="*", default=[8, 32, 128],
                        help="k of the sparse-target loss rows (none: no sparse rows)")  # fmt: skip
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    from tests.distributed.launcher import run_distributed

    cases: list[dict] = []
    for tp in args.tp:
        cases += run_distributed(
            bench_worker, tp, tp, args.tokens, args.vocab, args.reps, args.sparse_k
        )[0]
        print(_table(cases[-len(args.tokens) * len(args.vocab) :]), flush=True)
    text = (
        f"Machine: {machine()}; torch {torch.__version__}; bf16 logits, w={W}, T={TEMP}; "
        f"forward+backward, min (and median) of {args.reps} interleaved runs (slowest rank); "
        f"load average before the run {os.getloadavg()[0]:.1f}.\n"
        f"`python benchmarks/kd_loss.py {' '.join(sys.argv[1:])}`\n\n" + _table(cases)
    )
    print("\n" + text)
    if args.write_docs:
        write_docs(text, "## KD loss")


if __name__ == "__main__":
    main()
