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
