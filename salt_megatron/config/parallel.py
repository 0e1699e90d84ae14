"""The ``parallel`` section: how the student (and the teacher) are sharded over the ranks."""

from __future__ import annotations

from dataclasses import dataclass

from salt_megatron.config.base import check, check_positive


@dataclass
class ParallelConfig:
    """How the student (and the teacher) are sharded."""

    tensor_model_parallel_size: int = 1
    """Student tensor-parallel size (the vocabulary is sharded this many ways)."""
    pipeline_model_parallel_size: int = 1
    """Student pipeline-parallel size (stages)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule; None for plain 1F1B."""
    sequence_parallel: bool = False
    """Shard layer-norm/dropout activations along the sequence over the TP group."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass
    (needs --use-distributed-optimizer and --overlap-grad-reduce)."""
    align_param_gather: bool = False
    """Launch the overlapped parameter all-gathers of all pipeline stages together, from the
    schedule (needs --overlap-param-gather)."""
    grad_reduce_in_bf16: bool = False
    """Accumulate and reduce gradients in bfloat16 instead of float32 (needs --bf16)."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient-reduction bucket; None: megatron's max(40M, 1M x DP)."""
    expert_model_parallel_size: int = 1
    """Student expert-parallel size (EP): the experts of each MoE layer are spread over this many
    ranks, which hold different data (EP groups are carved out of TP x DP)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor-parallel size inside each expert (ETP); None: --tensor-model-parallel-size."""
    teacher_tensor_model_parallel_size: int = 1
    """Teacher tensor-parallel size: a divisor of the student's (or equal). An MoE teacher keeps
    all its experts on each rank (teacher EP 1), split by this size like its other layers."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""

    def __post_init__(self) -> None:
        check_positive(self, "", "tensor_model_parallel_size", "pipeline_model_parallel_size")
        check_positive(self, "", "virtual_pipeline_model_parallel_size")
        check_positive(
            self, "", "teacher_tensor_model_parallel_size", "distributed_timeout_minutes"
        )
        check_positive(self, "", "ddp_bucket_size", "expert_model_parallel_size")
        check_positive(self, "", "expert_tensor_parallel_size")
        check(
            not self.overlap_param_gather
            or (self.use_distributed_optimizer and self.overlap_grad_reduce),
            "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce",
        )
        check(
            not self.align_param_gather or self.overlap_param_gather,
            "--align-param-gather needs --overlap-param-gather",
        )
        vpp = self.virtual_pipeline_model_parallel_size
        check(
            vpp is None or self.pipeline_model_parallel_size > 1,
            "--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1",
        )
        check(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel needs --tensor-model-parallel-size > 1",
        )
        check(
            self.tensor_model_parallel_size % self.teacher_tensor_model_parallel_size == 0,
            f"--teacher-tensor-model-parallel-size {self.teacher_tensor_model_parallel_size} must "
            f"divide --tensor-model-parallel-size {self.tensor_model_parallel_size}",
        )

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the student's dense layers: TP x PP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def expert_tp(self) -> int:
        """Tensor-parallel size inside each expert (--expert-tensor-parallel-size, else TP)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def expert_model_parallel_ranks(self) -> int:
        """Ranks holding one copy of the student's experts: expert TP x EP x PP."""
        return self.expert_tp * self.expert_model_parallel_size * self.pipeline_model_parallel_size
