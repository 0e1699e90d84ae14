"""The typed config tree: one dataclass per section, a docstring per field, checks in __post_init__.

Each field becomes a Megatron-style flag (``num_layers`` -> ``--num-layers``); the ``teacher``
section's flags carry a ``teacher-`` prefix (``--teacher-num-layers``). Checks that involve several
sections (or the world size) live in :meth:`SaltConfig.validate_world`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from salt_megatron.config.base import ConfigError, check, check_positive, flag
from salt_megatron.config.distill import DistillConfig
from salt_megatron.config.model import ModelConfig, TeacherModelConfig
from salt_megatron.config.parallel import ParallelConfig
from salt_megatron.config.sft import SFTConfig, check_sft_run

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DistillConfig", "LoggingConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "SFTConfig", "SaltConfig",
    "TeacherModelConfig", "TrainingConfig",
]  # fmt: skip


@dataclass
class DataConfig:
    """Data, tokenizer and sequence length."""

    data_path: list[str] | None = None
    """Blend of indexed-dataset prefixes, Megatron-style: 'prefix' or 'w1 prefix1 w2 prefix2'."""
    split: str = "969,30,1"
    """Train/valid/test split weights of each prefix."""
    data_cache_path: str | None = None
    """Directory for the dataset index caches (default: beside the data)."""
    tokenizer_model: str | None = None
    """The tokenizer: a sentencepiece .model file, or a Hugging Face tokenizer folder or its
    tokenizer.json."""
    tokenizer_type: Literal["SentencePieceTokenizer", "HuggingFaceTokenizer"] | None = None
    """Kind of --tokenizer-model (Megatron-LM's names); None infers it: a .model file is
    sentencepiece, a folder or a .json file Hugging Face."""
    mock_data: bool = False
    """Train on megatron-core's synthetic mock GPT dataset (no files needed)."""
    seq_length: int = 256
    """Tokens per training sequence."""
    num_workers: int = 0
    """DataLoader worker processes per rank that read and collate micro-batches (0: on the
    training thread). On GPUs batches are also collated into pinned memory."""

    def __post_init__(self) -> None:
        check_positive(self, "", "seq_length")
        check(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        parts = self.split.replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split {self.split!r} is not a comma-separated list") from None
        check(
            len(weights) == 3 and min(weights) >= 0 and sum(weights) > 0,
            f"--split {self.split!r} needs three non-negative weights",
        )


@dataclass
class OptimConfig:
    """Adam and the learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps from 0 to --lr."""
    lr_decay_iters: int | None = None
    """Steps over which the LR decays; None means --train-iters."""
    lr_decay_style: Literal["cosine", "linear", "constant", "WSD"] = "cosine"
    """Shape of the decay after warm-up; WSD (warmup-stable-decay) holds --lr until the last
    --lr-wsd-decay-iters of --lr-decay-iters, then anneals to --min-lr."""
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "exponential"
    """Shape of WSD's final anneal."""
    lr_wsd_decay_iters: int | None = None
    """Length of WSD's final anneal in steps (needed by --lr-decay-style WSD)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""

    def __post_init__(self) -> None:
        check_positive(self, "", "lr", "adam_eps", "lr_decay_iters", "lr_wsd_decay_iters")
        check(
            self.lr_decay_style != "WSD" or self.lr_wsd_decay_iters is not None,
            "--lr-decay-style WSD needs --lr-wsd-decay-iters",
        )
        check(0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, --lr], got {self.min_lr}")
        check(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        check(self.clip_grad >= 0, f"--clip-grad must be >= 0, got {self.clip_grad}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"{flag(name)} must be in [0, 1), got {value}")


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, precision, seed."""

    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step across all data-parallel ranks."""
    train_iters: int = 100
    """Optimizer steps to train."""
    seed: int = 1234
    """Seed of weights, dropout and data order."""
    bf16: bool = False
    """Train in bfloat16 with float32 main weights and gradients."""
    fp8_format: Literal["e4m3", "hybrid"] | None = None
    """FP8 linear layers via Transformer Engine (needs --transformer-impl transformer_engine and
    an FP8-capable GPU): e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients). The student
    trains under FP8 autocast; the teacher keeps FP8-only weights. None: no FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe: delayed (amax history), tensorwise (current scaling, TE >= 2.2),
    blockwise (TE >= 2.3, Hopper), mxfp8 (Blackwell). Used only with --fp8-format."""
    eval_interval: int = 0
    """Steps between validation runs, plus one after the last step (0 disables)."""
    eval_iters: int = 4
    """Micro-batches of validation per data-parallel rank and evaluation."""
    exit_interval: int | None = None
    """Save and exit when the step count is a multiple of this."""
    exit_duration_in_mins: float | None = None
    """Save and exit after this many minutes of training."""
    skip_nonfinite_steps: int = 0
    """Skip up to this many steps with a non-finite loss or grad norm instead of halting."""
    rampup_batch_size: list[int] | None = None
    """Batch-size ramp-up 'start increment samples' (megatron's calculator): the global batch
    starts at start and grows by increment, evenly over the first samples samples. Steps stay
    steps: --train-iters, the LR schedule, the KD phase and its schedule count optimizer steps."""
    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation: full (whole layers, see --recompute-method) or selective (the
    --recompute-modules of every layer). None keeps all activations."""
    recompute_method: Literal["uniform", "block"] | None = None
    """Full recompute: uniform (every layer, in groups of --recompute-num-layers that keep only
    their input) or block (only the first --recompute-num-layers layers of each pipeline chunk)."""
    recompute_num_layers: int | None = None
    """Layers per recompute group (uniform) or recomputed layers per chunk (block)."""
    recompute_modules: list[str] | None = None
    """Selective recompute: submodules recomputed in backward, of core_attn, mlp, layernorm;
    None: core_attn."""

    RECOMPUTE_MODULES: ClassVar[tuple[str, ...]] = ("core_attn", "mlp", "layernorm")

    def __post_init__(self) -> None:
        check_positive(
            self, "", "micro_batch_size", "global_batch_size", "train_iters", "eval_iters"
        )
        check_positive(self, "", "exit_interval", "exit_duration_in_mins", "recompute_num_layers")
        check(self.eval_interval >= 0, "--eval-interval must be >= 0")
        check(self.skip_nonfinite_steps >= 0, "--skip-nonfinite-steps must be >= 0")
        check(
            self.global_batch_size % self.micro_batch_size == 0,
            f"--global-batch-size {self.global_batch_size} is not divisible by "
            f"--micro-batch-size {self.micro_batch_size}",
        )
        self._check_rampup()
        self._check_recompute()

    def _check_rampup(self) -> None:
        if self.rampup_batch_size is None:
            return
        ramp = self.rampup_batch_size
        check(len(ramp) == 3, f"--rampup-batch-size takes start increment samples, got {ramp}")
        start, increment, samples = ramp
        check(
            0 < start < self.global_batch_size and increment > 0 and samples >= 0,
            f"--rampup-batch-size {start} {increment} {samples}: needs 0 < start < "
            f"--global-batch-size {self.global_batch_size}, increment > 0, samples >= 0",
        )
        check(
            (self.global_batch_size - start) % increment == 0,
            f"--rampup-batch-size: --global-batch-size {self.global_batch_size} minus the start "
            f"{start} is not a multiple of the increment {increment}",
        )

    def ramp_batch_sizes(self) -> list[int]:
        """Every global batch size a step can have: the ramp-up's, then --global-batch-size."""
        if self.rampup_batch_size is None:
            return [self.global_batch_size]
        start, increment, _ = self.rampup_batch_size
        return list(range(start, self.global_batch_size + 1, increment))

    def _check_recompute(self) -> None:
        granularity, method = self.recompute_granularity, self.recompute_method
        if granularity == "full":
            check(
                method is not None and self.recompute_num_layers is not None,
                "--recompute-granularity full needs --recompute-method and --recompute-num-layers",
            )
        else:
            check(
                method is None and self.recompute_num_layers is None,
                "--recompute-method and --recompute-num-layers need --recompute-granularity full",
            )
        if self.recompute_modules is not None:
            check(
                granularity == "selective",
                "--recompute-modules needs --recompute-granularity selective",
            )
            unknown = sorted(set(self.recompute_modules) - set(self.RECOMPUTE_MODULES))
            check(
                not unknown and len(self.recompute_modules) > 0,
                f"--recompute-modules: {unknown or 'empty'}; choose from "
                f"{list(self.RECOMPUTE_MODULES)}",
            )


@dataclass
class CheckpointConfig:
    """Saving, loading and preemption."""

    save: str | None = None
    """Directory to save checkpoints in."""
    load: str | None = None
    """Directory to resume from (its latest complete checkpoint)."""
    save_interval: int = 0
    """Steps between saves (0: only at the end and on a signal)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    exit_signal: Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"] = "SIGTERM"
    """Signal that makes every rank finish its step, save and exit 0."""
    fallback_to_previous: bool = False
    """If the latest checkpoint is corrupt, load the previous complete one instead of failing."""
    async_save: bool = False
    """Write checkpoints in a background process (megatron-core's async machinery); a save is
    marked complete (renamed, tracker updated) only once every rank has written it."""
    ckpt_fully_reshardable: bool = False
    """Save the distributed optimizer's state in the layout-portable fully_reshardable form
    (gathered per data-parallel group: slow and memory-hungry) instead of dp_reshardable, which
    every rank writes in parallel but which resumes only at the same TP, PP and virtual PP (and
    DP only while the gradient buckets stay alike)."""

    def __post_init__(self) -> None:
        check(self.save_interval >= 0, "--save-interval must be >= 0")
        check_positive(self, "", "keep_last")


@dataclass
class LoggingConfig:
    """Console, TensorBoard, Weights & Biases, memory and profiling."""

    log_interval: int = 10
    """Steps between console lines and TensorBoard scalars."""
    tensorboard_dir: str | None = None
    """Write TensorBoard event files here (rank 0 of the last stage)."""
    metrics_file: str | None = None
    """Append every logged scalar as a JSON line {"step", "group", name: value} to this file."""
    wandb_project: str | None = None
    """Weights & Biases project: log the TensorBoard scalars and the run config there, from the
    logging rank (needs the `wandb` extra; `WANDB_MODE=offline` writes the run locally)."""
    wandb_exp_name: str = ""
    """Weights & Biases run name (required with --wandb-project, as in Megatron-LM)."""
    wandb_save_dir: str = ""
    """Directory for the local Weights & Biases files; empty: `<--save>/wandb`."""
    log_memory: bool = False
    """Log each rank's peak memory per logging window: allocated and reserved on GPU, resident
    set on CPU (console: the largest rank; TensorBoard: every rank)."""
    profile: bool = False
    """Record a torch.profiler Chrome trace of steps --profile-step-start to --profile-step-end."""
    profile_step_start: int = 10
    """First profiled step (0-based global step index)."""
    profile_step_end: int = 12
    """Profiling stops before this step."""
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks that record a trace."""
    profile_dir: str | None = None
    """Directory of the traces (trace_rank<r>_steps<a>-<b>.json); None: --tensorboard-dir, else
    ./profile."""

    def __post_init__(self) -> None:
        check_positive(self, "", "log_interval")
        check(
            not self.wandb_project or bool(self.wandb_exp_name),
            "--wandb-project needs --wandb-exp-name (the run's name)",
        )
        check(
            0 <= self.profile_step_start < self.profile_step_end,
            f"--profile-step-start {self.profile_step_start} must be >= 0 and below "
            f"--profile-step-end {self.profile_step_end}",
        )
        check(len(self.profile_ranks) > 0, "--profile-ranks needs at least one rank")


@dataclass
class SaltConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        par = self.parallel
        self.model.validate_tp(par.tensor_model_parallel_size, "--tensor-model-parallel-size")
        self.teacher.validate_tp(
            par.teacher_tensor_model_parallel_size, "--teacher-tensor-model-parallel-size"
        )
        stages = par.pipeline_model_parallel_size * (par.virtual_pipeline_model_parallel_size or 1)
        check(
            self.model.num_layers % stages == 0,
            f"--num-layers {self.model.num_layers} is not divisible by the "
            f"{stages} pipeline stages (--pipeline-model-parallel-size x virtual size)",
        )
        check(
            self.data.seq_length <= self.model.max_position_embeddings,
            f"--seq-length {self.data.seq_length} exceeds --max-position-embeddings "
            f"{self.model.max_position_embeddings}",
        )
        check(
            self.training.fp8_format is None or self.model.transformer_impl == "transformer_engine",
            f"--fp8-format {self.training.fp8_format} needs --transformer-impl "
            "transformer_engine (FP8 runs in Transformer Engine's layers)",
        )
        if self.sft.sft:
            check_sft_run(self)
        else:
            check(
                self.data.mock_data or bool(self.data.data_path),
                "--data-path is required unless --mock-data is set",
            )
        check(
            not par.grad_reduce_in_bf16 or self.training.bf16,
            "--grad-reduce-in-bf16 needs --bf16 (float32 training reduces float32 gradients)",
        )
        check(
            "layernorm" not in (self.training.recompute_modules or [])
            or self.model.transformer_impl == "transformer_engine",
            "--recompute-modules layernorm needs --transformer-impl transformer_engine "
            "(megatron-core's output-discarding checkpoint imports Transformer Engine)",
        )
        self._check_moe()
        decay_iters = self.optim.lr_decay_iters or self.training.train_iters
        wsd = self.optim.lr_wsd_decay_iters
        check(
            wsd is None or wsd <= decay_iters,
            f"--lr-wsd-decay-iters {wsd} exceeds the {decay_iters} steps of the decay "
            "(--lr-decay-iters, else --train-iters)",
        )
        per_chunk, n = self.model.num_layers // stages, self.training.recompute_num_layers
        check(
            n is None or (n <= per_chunk and (self.training.recompute_method == "block"
                                              or per_chunk % n == 0)),
            f"--recompute-num-layers {n} must be at most the {per_chunk} layers of a pipeline "
            "chunk (and divide them with --recompute-method uniform)",
        )  # fmt: skip

    def _check_moe(self) -> None:
        """Expert parallelism against the student's shape (Megatron-LM's checks)."""
        par, model = self.parallel, self.model
        ep = par.expert_model_parallel_size
        if not model.is_moe:
            check(
                ep == 1 and par.expert_tensor_parallel_size is None,
                "--expert-model-parallel-size and --expert-tensor-parallel-size need an MoE "
                "student (--num-experts)",
            )
            return
        assert model.num_experts is not None
        check(
            model.num_experts % ep == 0,
            f"--num-experts {model.num_experts} is not divisible by "
            f"--expert-model-parallel-size {ep}",
        )
        check(
            par.tensor_model_parallel_size == 1 or par.sequence_parallel,
            "an MoE student with --tensor-model-parallel-size > 1 needs --sequence-parallel "
            "(as in Megatron-LM: the router and the dispatchers take each token once)",
        )
        check(
            not model.add_bias_linear or par.expert_tp == 1,
            "--add-bias-linear in MoE layers needs --expert-tensor-parallel-size 1",
        )

    def validate_world(self, world_size: int) -> None:
        """Checks that need the world size (before any process group starts)."""
        mp = self.parallel.model_parallel_size
        check(
            world_size % mp == 0,
            f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size = {mp}",
        )
        emp = self.parallel.expert_model_parallel_ranks
        check(
            world_size % emp == 0,
            f"world size {world_size} is not divisible by expert TP x "
            f"--expert-model-parallel-size x --pipeline-model-parallel-size = {emp}",
        )
        dp = world_size // mp
        tr = self.training
        vpp = self.parallel.virtual_pipeline_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        ramp = "--global-batch-size" if tr.rampup_batch_size is None else "ramp-up batch size"
        for gbs in tr.ramp_batch_sizes():
            check(
                gbs % (tr.micro_batch_size * dp) == 0,
                f"{ramp} {gbs} is not divisible by --micro-batch-size "
                f"{tr.micro_batch_size} x data-parallel size {dp}",
            )
            n_micro = gbs // (tr.micro_batch_size * dp)
            check(
                vpp is None or n_micro % pp == 0,
                f"{ramp} {gbs}: the interleaved schedule needs the {n_micro} micro-batches per "
                f"step to be a multiple of --pipeline-model-parallel-size {pp}",
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size at this world size."""
        return world_size // self.parallel.model_parallel_size
