"""GPU check + benchmark of the KD loss (one CUDA device, TP=1, simulated shard widths).

1. Correctness: the Triton path (and the PyTorch path on CUDA) against the float64 reference.
2. Timing (CUDA events, fwd+bwd, bf16, w=0.5, T=2) and peak memory (``max_memory_allocated``
   above the live inputs) of (a) ``kd_cross_entropy``, (b) megatron-core's
   ``vocab_parallel_cross_entropy`` when installed, else ``F.cross_entropy`` on float32 as the
   hard-label floor, (c) the straightforward float32 KL+CE of ``benchmarks/kd_loss.py``.
3. Bandwidth: (a) moves at least 5 logits-sized bf16 tensors (fwd reads s, t; bwd reads s, t and
   writes the gradient); achieved = that / time, against a large device-to-device copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from kd_loss import TEMP, W, naive_kd_loss  # noqa: E402  (this directory)

from salt_megatron.loss import kd_cross_entropy, reference_kd_loss  # noqa: E402


def check_correctness() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype, width in ((torch.float32, 5000), (torch.bfloat16, 40000)):
        s = (torch.randn(64, width, generator=gen) * 3).to(dtype)
        t = (torch.randn(64, width, generator=gen) * 3).to(dtype)
        t[:4] = s[:4]
        y = torch.randint(0, width, (64,), generator=gen)
        y[5] = -100
        s64 = s.double().requires_grad_()
        ref = reference_kd_loss(s64, t, y, 0.3, 2.0, t2_scaling=True)
        (g64,) = torch.autograd.grad(ref["loss"].sum(), s64)
        for impl in ("triton", "torch"):
            sc = s.cuda().requires_grad_()
            loss, st = kd_cross_entropy(sc, t.cuda(), y.cuda(), 0.3, 2.0, t2_scaling=True,
                                        return_stats=True, impl=impl)  # fmt: skip
            loss.sum().backward()
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            err_l = (loss.double().cpu() - ref["loss"]).abs().max().item()
            err_g = (sc.grad.double().cpu() - g64).abs().max().item()  # type: ignore[union-attr]
            agree_ok = torch.equal(st.top1_agree.double().cpu(), ref["top1_agree"])
            print(f"check {impl:6s} {dtype!s:14s} loss err {err_l:.2e} grad err {err_g:.2e} "
                  f"top1 ok {agree_ok}")  # fmt: skip
            assert err_l < 1e-4 and err_g < tol and agree_ok, "GPU result differs from reference"


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def _peak(fn: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    sec = _time(lambda: y.copy_(x), 10)
    return 2 * x.numel() / sec


def _floor_fn() -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        return "megatron CE", vocab_parallel_cross_entropy
    except ImportError:
        return "F.cross_entropy fp32", lambda s, y: F.cross_entropy(s.float(), y, reduction="none")


def bench_case(n_tok: int, width: int, floor, reps: int, copy_bw: float) -> str:
    s = (torch.randn(n_tok, width, device="cuda") * 2).bfloat16().requires_grad_()
    t = (torch.randn(n_tok, width, device="cuda") * 2).bfloat16()
    y = torch.randint(0, width, (n_tok,), device="cuda")

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss_fn().sum().backward()
            s.grad = None

        return step

    fns = {
        "a": run(lambda: kd_cross_entropy(s, t, y, W, TEMP)),
        "b": run(lambda: floor(s, y)),
        "c": run(lambda: naive_kd_loss(s, t, y, None, 0)),
    }
    res = {}
    for name, fn in fns.items():
        try:
            res[name] = (_time(fn, reps), _peak(fn))
        except torch.cuda.OutOfMemoryError:
            res[name] = (float("nan"), -1)
        torch.cuda.empty_cache()
    inputs = 2 * s.numel() * s.element_size()
    bw = 5 * s.numel() * s.element_size() / res["a"][0]
    (ta, ma), (tb, mb), (tc, mc) = res["a"], res["b"], res["c"]
    gib = 2.0**30
    return (f"| {n_tok} | {width} | {ta * 1e3:.2f} / {tb * 1e3:.2f} / {tc * 1e3:.2f} "
            f"| {ma / gib:.2f} / {mb / gib:.2f} / {mc / gib:.2f} | {ta / tb:.2f} "
            f"| {(inputs + ma) / (inputs + mb):.2f} | {(inputs + ma) / (inputs + mc):.2f} "
            f"| {bw / 1e9:.0f} ({bw / copy_bw:.0%}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--widths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)  # (b)/(c) call all-reduces
    t0 = time.time()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_correctness()
    copy_bw = copy_bandwidth()
    floor_name, floor = _floor_fn()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s; (b) = {floor_name}")
    print(
        "| tokens | V/tp | time a / b / c (ms) | extra peak a / b / c (GiB) | time a/b "
        "| total mem a/b | total mem a/c | (a) GB/s (of copy) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        for n_tok in args.tokens:
            print(bench_case(n_tok, width, floor, args.reps, copy_bw), flush=True)
    print(f"total {time.time() - t0:.0f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
