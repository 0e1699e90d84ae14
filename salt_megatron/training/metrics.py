"""Throughput, model-FLOP utilisation (MFU) and per-rank peak memory of the training loop.

FLOPs per token come from :mod:`salt_megatron.models.flops`.
"""

from __future__ import annotations

import torch

#: Dense bf16 peak TFLOP/s by GPU name fragment (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops() -> float | None:
    """Dense bf16 peak of this rank's GPU, or None (CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _read_peak_rss() -> int:
    """This process's peak resident set since start or the last reset (Linux VmHWM), bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0); elsewhere the peak spans the whole run
    except OSError:
        pass


def peak_memory_mib() -> dict[str, float]:
    """This rank's peak memory since the previous call, in MiB; resets the peak.

    GPU: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``. CPU: the peak resident
    set size of the process (``VmHWM``).
    """
    if torch.cuda.is_available():
        peaks = {
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        }
        torch.cuda.reset_peak_memory_stats()
        return peaks
    peak = _read_peak_rss() / 2**20
    _reset_peak_rss()
    return {"peak_rss_mib": peak}


def gather_memory(peaks: dict[str, float]) -> list[dict[str, float]]:
    """Every rank's :func:`peak_memory_mib` values, in rank order (a collective)."""
    import torch.distributed as dist

    from salt_megatron.runtime import device

    mine = torch.tensor(list(peaks.values()), dtype=torch.float64, device=device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [dict(zip(peaks, t.tolist(), strict=True)) for t in every]
