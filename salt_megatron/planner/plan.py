"""The plan of a SALT run: memory of the busiest rank, FLOPs, KD overhead, step time.

FLOPs come from :mod:`salt_megatron.models.flops` (an MoE layer counts the router, the top-k
experts and the shared expert a token passes through). The KD phase's ideal overhead is
``1 + F_teacher_fwd / F_student_fwd_bwd``. With PP > 1 every stage runs the teacher body for its
block of the step's micro-batches and the last stage the head: :func:`kd_step_ratio` gives the
KD step over the plain step at the pace of the slowest stage (1F1B steady state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from salt_megatron.config.schema import ModelConfig, SaltConfig
from salt_megatron.models import flops as model_flops
from salt_megatron.parallel.teacher_pipeline import stage_blocks
from salt_megatron.planner.memory import (
    GIB,
    RECOMPUTE_ALTERNATIVES,
    Recompute,
    padded_vocab,
    stage_memory,
    teacher_enabled,
)
from salt_megatron.planner.moe import moe_summary
from salt_megatron.planner.params import stage_params, total_params


@dataclass(frozen=True)
class Hardware:
    """The accelerator the plan is for."""

    gpu_memory_gib: float = 80.0
    gpu_tflops: float = 989.0
    mfu: float = 0.4


@dataclass
class Plan:
    """The planner's answer for one config at one world size."""

    world_size: int
    dp: int
    n_micro: int
    student_params: int
    teacher_params: int
    params_per_rank: dict[str, int]
    busiest_stage: int
    memory: dict[str, float]  # bytes on a rank of the busiest stage, by component
    recompute: Recompute
    memory_total: float  # the busiest rank with the run's recompute choice
    memory_alternatives: dict[str, float]  # the same under RECOMPUTE_ALTERNATIVES, by label
    flops: dict[str, float]  # per token
    step_seconds: dict[str, float]
    overhead_ideal: float
    overhead_pipeline: float
    total_hours: float
    hardware: Hardware
    warnings: list[str] = field(default_factory=list)
    overhead_last_stage: float = 1.0
    """KD over plain step with the whole teacher on the last stage (for comparison; PP > 1)."""
    moe: dict[str, float] = field(default_factory=dict)
    """Mixture-of-experts counts of the busiest stage (:func:`~salt_megatron.planner.moe.
    moe_summary`); empty for a dense student."""


def _flops(cfg: SaltConfig, vocab: int) -> dict[str, float]:
    s, spad = cfg.data.seq_length, padded_vocab(cfg, vocab)
    flops = {"student fwd+bwd": model_flops.train_flops_per_token(cfg.model, s, spad)}
    if teacher_enabled(cfg):
        tpad = padded_vocab(cfg, vocab, teacher=True)
        flops["teacher fwd"] = model_flops.forward_flops_per_token(cfg.teacher, s, tpad)
    return flops


def kd_step_ratio(
    student: ModelConfig,
    teacher: ModelConfig,
    seq: int,
    padded_vocab: int,
    pp: int,
    n_micro: int,
    *,
    balanced: bool = True,
) -> float:
    """KD step time over plain step time at PP = ``pp``, from FLOPs per token per stage.

    The pipeline runs at the pace of its slowest stage (1F1B steady state). A plain stage does
    the forward and backward of its ``L/pp`` layers, the last one also of the output layer. The
    teacher adds its body's forward for the stage's block of the ``n_micro`` micro-batches
    (:func:`~salt_megatron.parallel.teacher_pipeline.stage_blocks`) and, on the last stage, the
    head (``2·h_teacher·V``) for all of them; ``balanced=False``: the whole teacher on the last
    stage (the placement before the teacher pass). Both models use ``padded_vocab``.
    """
    s_head, t_head = (
        2.0 * student.hidden_size * padded_vocab,
        2.0 * teacher.hidden_size * padded_vocab,
    )
    s_layers = model_flops.forward_flops_per_token(student, seq, padded_vocab) - s_head
    t_body = model_flops.forward_flops_per_token(teacher, seq, padded_vocab) - t_head
    blocks = stage_blocks(n_micro, pp) if balanced else [range(0)] * (pp - 1) + [range(n_micro)]
    plain = [3.0 * (s_layers / pp + (s_head if i == pp - 1 else 0.0)) for i in range(pp)]
    extra = [t_body * len(blk) / n_micro for blk in blocks]
    extra[-1] += t_head
    return max(p + e for p, e in zip(plain, extra, strict=True)) / max(plain)


def _times(
    cfg: SaltConfig, flops: dict[str, float], world_size: int, hw: Hardware, pipelined: float
) -> tuple[dict[str, float], float, float]:
    """Step seconds by kind, the ideal KD overhead, and the whole run's hours (``pipelined``:
    :func:`kd_step_ratio` of the run)."""
    tr, pp = cfg.training, cfg.parallel.pipeline_model_parallel_size
    ideal = 1.0 + flops.get("teacher fwd", 0.0) / flops["student fwd+bwd"]
    tokens = tr.global_batch_size * cfg.data.seq_length
    plain = tokens * flops["student fwd+bwd"] / (world_size * hw.gpu_tflops * 1e12 * hw.mfu)
    steps = {"plain step": plain}
    kd_steps = min(cfg.distill.kd_steps, tr.train_iters) if "teacher fwd" in flops else 0
    if kd_steps:
        steps["KD step (ideal)"] = plain * ideal
        if pp > 1:
            steps["KD step (slowest pipeline stage)"] = plain * pipelined
    hours = (kd_steps * plain * pipelined + (tr.train_iters - kd_steps) * plain) / 3600.0
    return steps, ideal, hours


def plan(cfg: SaltConfig, world_size: int, vocab_size: int, hardware: Hardware) -> Plan:
    """Memory, FLOPs and step time of ``cfg`` on ``world_size`` GPUs of ``hardware``."""
    cfg.validate_world(world_size)
    par, tr = cfg.parallel, cfg.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = cfg.data_parallel_size(world_size)
    n_micro = tr.global_batch_size // (tr.micro_batch_size * dp)
    stages = sorted({0, pp - 1})
    memories = {st: stage_memory(cfg, vocab_size, dp, n_micro, st) for st in stages}
    busiest = max(stages, key=lambda st: sum(memories[st].values()))
    alternatives = {
        rc.label: max(
            sum(stage_memory(cfg, vocab_size, dp, n_micro, st, rc).values()) for st in stages
        )
        for rc in RECOMPUTE_ALTERNATIVES
    }
    flops = _flops(cfg, vocab_size)
    spad = padded_vocab(cfg, vocab_size)
    pipelined = last = 1.0 + flops.get("teacher fwd", 0.0) / flops["student fwd+bwd"]
    if "teacher fwd" in flops and pp > 1:
        shapes = (cfg.model, cfg.teacher, cfg.data.seq_length, spad, pp, n_micro)
        pipelined = kd_step_ratio(*shapes)
        last = kd_step_ratio(*shapes, balanced=False)
    steps, ideal, hours = _times(cfg, flops, world_size, hardware, pipelined)
    experts = {"ep": par.expert_model_parallel_size, "etp": par.expert_tp}
    per_rank = {
        f"stage {st}": stage_params(cfg.model, spad, tp=tp, pp=pp, stage=st, **experts)
        for st in stages
    }
    result = Plan(
        world_size=world_size,
        dp=dp,
        n_micro=n_micro,
        student_params=total_params(cfg.model, spad),
        teacher_params=(
            total_params(cfg.teacher, padded_vocab(cfg, vocab_size, True))
            if "teacher fwd" in flops
            else 0
        ),
        params_per_rank=per_rank,
        busiest_stage=busiest,
        memory=memories[busiest],
        recompute=Recompute.of(tr),
        memory_total=sum(memories[busiest].values()),
        memory_alternatives=alternatives,
        flops=flops,
        step_seconds=steps,
        overhead_ideal=ideal,
        overhead_pipeline=pipelined,
        total_hours=hours,
        hardware=hardware,
        overhead_last_stage=last,
        moe=moe_summary(cfg, spad, n_micro, busiest),
    )
    result.warnings = _warnings(cfg, result)
    return result


def _warnings(cfg: SaltConfig, p: Plan) -> list[str]:
    limit = p.hardware.gpu_memory_gib * GIB
    out = []
    gib = p.hardware.gpu_memory_gib
    if p.memory_total > limit:
        fitting = [rc for rc in RECOMPUTE_ALTERNATIVES if p.memory_alternatives[rc.label] <= limit]
        where = (
            f"does not fit with recompute {p.recompute.label}: {p.memory_total / GIB:.1f} GiB per "
            f"GPU > {gib:g} GiB"
        )
        if fitting:
            need = p.memory_alternatives[fitting[0].label] / GIB
            out.append(f"{where}; recompute {fitting[0].label} needs {need:.1f} GiB: "
                       f"{fitting[0].flags}")  # fmt: skip
        else:
            full = p.memory_alternatives[RECOMPUTE_ALTERNATIVES[-1].label] / GIB
            out.append(
                f"{where}, {full:.1f} GiB even with full recomputation; raise TP/PP, use the "
                "distributed optimizer or lower --micro-batch-size"
            )
    par = cfg.parallel
    replicas = par.tensor_model_parallel_size // par.teacher_tensor_model_parallel_size
    if "teacher fwd" in p.flops and cfg.training.micro_batch_size < replicas:
        out.append(
            f"--micro-batch-size {cfg.training.micro_batch_size} < {replicas} teacher replicas "
            "per student TP group: the teacher forward is partly redundant"
        )
    return out
