"""torch.distributed initialisation: NCCL on GPUs, gloo with the CPU redirects otherwise."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from salt_megatron.runtime import cpu_compat


def backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """This rank's compute device: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 10) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (or as a single process).

    Sets the local GPU, or enables :mod:`cpu_compat` on a CPU-only machine. Returns
    ``(rank, world_size)``. Idempotent.
    """
    if not torch.cuda.is_available():
        cpu_compat.enable()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend(),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return rank, world_size


def init_world() -> int:
    """Start torch.distributed (torchrun's env, or a world of 1 on a free port); the world size."""
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    return init_distributed()[1]


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
