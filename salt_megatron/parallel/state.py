"""The student's process groups: megatron-core's global parallel state, as an explicit object."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from salt_megatron.config.schema import ParallelConfig


@dataclass(frozen=True)
class StudentLayout:
    """Sizes, ranks and groups of the student's TP x PP x DP layout on this rank.

    The experts of MoE layers have their own decomposition of each pipeline stage's ranks
    (megatron's): expert TP x EP x expert DP, ``etp * ep * edp = tp * dp``. Expert weights
    are replicated (and their gradients reduced) over the expert DP group only.
    """

    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    ep: int = 1
    etp: int = 1
    edp: int = 1
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank holds the first pipeline stage."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage (where the loss lives)."""
        return self.pp_rank == self.pp - 1


def init_student_parallel(par: ParallelConfig, seed: int) -> StudentLayout:
    """Create megatron's TP/PP/DP groups for the student and seed every rank's RNGs.

    Needs ``torch.distributed`` initialised. The dropout seed follows megatron's convention
    (seed + 2718 + tp_rank inside TP regions; seed + 1024 + 100 ep_rank + etp_rank in experts,
    the 'expert-parallel-rng' stream); weights are initialised from ``seed`` alone so that any
    layout gets the same weights.
    """
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        distributed_timeout_minutes=par.distributed_timeout_minutes,
    )
    reseed(seed)
    return current_layout()


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. building the teacher) without moving any RNG stream of this rank.

    Restores the CPU and current-GPU generators and megatron's model-parallel tracker states, so
    a run that builds the teacher at step k (a resume) draws the same numbers as one that built
    it at step 0.
    """
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = {k: v.clone() for k, v in tracker.get_states().items()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    tracker.set_states(states)


def reseed(seed: int) -> None:
    """Seed the default and the model-parallel RNG streams (megatron's convention)."""
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def current_layout() -> StudentLayout:
    """The layout megatron's parallel state holds now."""
    return StudentLayout(
        tp=mpu.get_tensor_model_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(),
        vpp=mpu.get_virtual_pipeline_model_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        ep=mpu.get_expert_model_parallel_world_size(),
        etp=mpu.get_expert_tensor_parallel_world_size(),
        edp=mpu.get_expert_data_parallel_world_size(),
        ep_rank=mpu.get_expert_model_parallel_rank(),
    )
