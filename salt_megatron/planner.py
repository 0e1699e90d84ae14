"""Capacity planner: per-GPU memory and step time of a SALT run, from its config alone.

Everything here is arithmetic on shapes (no GPU, no process group), so ``tools/plan.py`` runs
anywhere.

Memory of the busiest rank (bytes):

* **Student weights, gradients, optimizer** per parameter on the rank: with ``--bf16`` the bf16
  weights (2), float32 gradients (4, megatron reduces in float32), float32 main weights (4) and
  Adam's m and v (4 + 4): 18 bytes; the distributed optimizer shards the main weights and Adam's
  states over data-parallel ranks: ``6 + 12 / dp``. In float32: ``16`` or ``8 + 8 / dp``.
* **Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation"), per layer and
  micro-batch, 16-bit: ``s·b·h·(10 + 24/t) + 5·a·s²·b/t`` without sequence parallelism and all of it
  divided by ``t`` with it (``34 + 5as/h`` at ``t = 1``). The ``24`` generalises to GQA and SwiGLU
  (``8`` for attention, ``2f/h·(k + 1)`` for an MLP of width ``f`` with ``k`` fc1 outputs); flash
  attention (Transformer Engine) keeps no ``s²`` scores. The run's ``--recompute-*`` choice
  (:class:`Recompute`) decides what stays: full recomputation keeps only the input (``2·s·b·h``,
  ``/t`` with SP) of each group of ``--recompute-num-layers`` layers (uniform) or of the first
  ``--recompute-num-layers`` layers of each chunk (block), plus one group's working set during its
  recompute; selective recomputation drops the recomputed modules' activations (``core_attn``: the
  ``s²`` scores; ``mlp``: the MLP's; ``layernorm``: the two norm outputs). The report also gives
  the totals under no, selective and full recomputation. The first pipeline stage holds
  ``min(pp, micro-batches)`` micro-batches in flight under 1F1B (interleaving multiplies it by
  ``1 + (pp - 1) / (pp·v)``).
* **Teacher** (:func:`teacher_memory`; every pipeline stage holds a teacher body at its own TP):
  the body's weights (the student's padded vocabulary in the embedding, no output layer) in the
  training dtype or FP8 (1 byte, with ``--fp8-format``), plus one layer's no-grad working set;
  the last stage also holds the head (its ``V/t x h`` vocabulary slice of the output layer).
  With PP > 1 the last stage holds the final hidden states of all the step's micro-batches
  (``M·s·b·h_teacher``, gathered before the schedule) and every other stage those of its block.
* **Logits and the KD loss** on the last stage: the student's logits shard ``s·b·V/t`` and its
  gradient in the training dtype, the teacher's shard (bf16), a second teacher shard when the
  teacher's TP differs from the student's (the exchange's receive buffer), and the loss kernel's
  float32 chunk temporaries (see ``salt_megatron.loss.kd_cross_entropy``).

FLOPs come from :mod:`salt_megatron.models.flops`. The KD phase's ideal overhead is
``1 + F_teacher_fwd / F_student_fwd_bwd``. With PP > 1 every stage runs the teacher body for its
block of the step's micro-batches and the last stage the head: :func:`kd_step_ratio` gives the
KD step over the plain step at the pace of the slowest stage (1F1B steady state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig, SaltConfig, TrainingConfig
from salt_megatron.models import flops as model_flops
from salt_megatron.parallel.teacher_pipeline import stage_blocks

GIB = 1024**3
#: Float32 temporaries of the KD loss per chunk, and the chunk size on a GPU (elements).
KD_CHUNK_TEMPORARIES = 3
KD_GPU_CHUNK_ELEMS = 1 << 26


@dataclass(frozen=True)
class Hardware:
    """The accelerator the plan is for."""

    gpu_memory_gib: float = 80.0
    gpu_tflops: float = 989.0
    mfu: float = 0.4


# ----------------------------------------------------------------------------- parameters


def _norm_params(model: ModelConfig, width: int | None = None) -> int:
    return (width or model.hidden_size) * (2 if model.normalization == "LayerNorm" else 1)


def layer_params(model: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank (megatron-core's local/TE layout).

    Column-parallel QKV and fc1 shard weights and biases; row-parallel projection and fc2 shard
    their weights, and their biases and the two norms are replicated.
    """
    h, head_dim = model.hidden_size, model.head_dim
    q = model.num_attention_heads * head_dim
    kv = (model.num_query_groups or model.num_attention_heads) * head_dim
    ffn = mcfg.ffn_hidden_size(model)
    fc1_out = ffn * (2 if model.swiglu else 1)
    bias = model.add_bias_linear
    qkv_bias = q + 2 * kv if bias or model.add_qkv_bias else 0
    column = h * (q + 2 * kv) + h * fc1_out + qkv_bias + (fc1_out if bias else 0)
    row = q * h + ffn * h
    replicated = 2 * _norm_params(model) + (2 * h if bias else 0)
    if model.qk_layernorm:
        replicated += 2 * _norm_params(model, head_dim)  # one query and one key norm
    return column // tp + row // tp + replicated


def stage_params(
    model: ModelConfig, padded_vocab: int, *, tp: int = 1, pp: int = 1, stage: int = 0
) -> int:
    """Parameters on one rank of pipeline stage ``stage`` (0-based) under TP = ``tp``, PP = ``pp``.

    The first stage holds the word (and learned position) embeddings; the last the final norm and
    the output layer, which with tied embeddings is a copy of the word embeddings when PP > 1.
    """
    h = model.hidden_size
    total = (model.num_layers // pp) * layer_params(model, tp)
    embedding = padded_vocab // tp * h
    if stage == 0:
        total += embedding
        if model.position_embedding_type == "learned_absolute":
            total += model.max_position_embeddings * h
    if stage == pp - 1:
        total += _norm_params(model)
        if model.untie_embeddings_and_output_weights or pp > 1:
            total += embedding
    return total


def total_params(model: ModelConfig, padded_vocab: int) -> int:
    """All parameters of the model (TP = PP = 1)."""
    return stage_params(model, padded_vocab)


# ----------------------------------------------------------------------------- memory


def state_bytes_per_param(*, bf16: bool, distributed_optimizer: bool, dp: int) -> float:
    """Bytes per parameter of weights + gradients + main weights + Adam states on one rank."""
    if bf16:
        sharded = 4.0 + 8.0  # float32 main weights, Adam m and v
        return 2.0 + 4.0 + (sharded / dp if distributed_optimizer else sharded)
    return 4.0 + 4.0 + (8.0 / dp if distributed_optimizer else 8.0)


def activation_parts_per_layer(
    model: ModelConfig, seq: int, micro_batch: int, *, tp: int, sp: bool, flash: bool
) -> dict[str, float]:
    """The terms of :func:`activation_bytes_per_layer` on one TP rank, by what holds them."""
    s, b, h, a = seq, micro_batch, model.hidden_size, model.num_attention_heads
    q, kv = a * model.head_dim, (model.num_query_groups or a) * model.head_dim
    ffn = mcfg.ffn_hidden_size(model)
    fc1_outputs = 2 if model.swiglu else 1
    norm_outputs = 4.0 * s * b * h  # the QKV and fc1 inputs
    rest = 6.0 * s * b * h  # 2 norm inputs, 2 dropout masks
    attention = 2.0 * s * b * (2 * q + 2 * kv)  # Q, K, V and the projection's input
    mlp = 2.0 * s * b * ffn * (fc1_outputs + 1)  # fc1 outputs and the activation's output
    scores = 0.0 if flash else 5.0 * a * s * s * b
    seq_split = tp if sp else 1
    return {
        "layernorm": norm_outputs / seq_split,
        "replicated": rest / seq_split,
        "attention": attention / tp,
        "mlp": mlp / tp,
        "core_attn": scores / tp,
    }


def activation_bytes_per_layer(
    model: ModelConfig, seq: int, micro_batch: int, *, tp: int, sp: bool, flash: bool
) -> float:
    """Stored 16-bit activations of one layer and micro-batch (Korthikanti et al., generalised)."""
    return sum(
        activation_parts_per_layer(model, seq, micro_batch, tp=tp, sp=sp, flash=flash).values()
    )


def recompute_bytes_per_layer(
    seq: int, micro_batch: int, hidden: int, *, tp: int, sp: bool
) -> float:
    """Stored activations of one layer under full recomputation: its 16-bit input."""
    stored = 2.0 * seq * micro_batch * hidden
    return stored / tp if sp else stored


@dataclass(frozen=True)
class Recompute:
    """An activation-recomputation choice, as megatron-core's ``TransformerConfig`` takes it."""

    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None
    modules: tuple[str, ...] = ("core_attn",)

    @classmethod
    def of(cls, tr: TrainingConfig) -> Recompute:
        """The run's ``--recompute-*`` choice."""
        modules = tuple(tr.recompute_modules or ("core_attn",))
        return cls(tr.recompute_granularity, tr.recompute_method, tr.recompute_num_layers, modules)

    @property
    def label(self) -> str:
        """``none``, ``selective (core_attn)``, ``full (uniform, 1 layer)``..."""
        if self.granularity is None:
            return "none"
        if self.granularity == "selective":
            return f"selective ({', '.join(self.modules)})"
        return f"full ({self.method}, {self.num_layers} layer{'s' if self.num_layers != 1 else ''})"

    @property
    def flags(self) -> str:
        """The flags that select this choice."""
        if self.granularity is None:
            return "no --recompute-granularity"
        if self.granularity == "selective":
            return f"--recompute-granularity selective --recompute-modules {' '.join(self.modules)}"
        return (
            f"--recompute-granularity full --recompute-method {self.method} "
            f"--recompute-num-layers {self.num_layers}"
        )


#: The alternatives every report compares: none, selective (core attention), full per layer.
RECOMPUTE_ALTERNATIVES = (Recompute(), Recompute("selective"), Recompute("full", "uniform", 1))


def stage_activation_bytes(
    parts: dict[str, float], stored: float, layers: int, chunks: int, held: float, rc: Recompute
) -> float:
    """Activations on a rank of a stage with ``layers`` layers in ``chunks`` virtual chunks.

    ``parts``: :func:`activation_parts_per_layer`; ``stored``: a layer input kept under full
    recompute; ``held``: micro-batches in flight (:func:`in_flight_factor`). The working set of
    one recompute (a group of layers, or one layer's recomputed modules) comes on top.
    """
    full = sum(parts.values())
    if rc.granularity is None:
        return held * layers * full
    if rc.granularity == "selective":
        dropped = sum(parts[m] for m in rc.modules)
        return held * layers * (full - dropped) + dropped
    n = rc.num_layers or 1
    if rc.method == "uniform":
        return held * layers / n * stored + n * full
    per_chunk = layers // chunks
    return held * chunks * (n * stored + (per_chunk - n) * full) + full


def in_flight_factor(pp: int, vpp: int | None, n_micro: int, stage: int = 0) -> float:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B (interleaved)."""
    if pp == 1:
        return 1.0
    factor = float(min(pp - stage, n_micro))
    if vpp is not None:
        factor *= 1.0 + (pp - 1) / (pp * vpp)
    return factor


def kd_buffer_bytes(
    seq: int, micro_batch: int, padded_vocab: int, *, tp: int, teacher_tp: int, bf16: bool
) -> float:
    """Logits-sized buffers of the KD step on one last-stage rank.

    Student logits and their gradient (training dtype), the teacher's shard (bf16), a receive
    buffer when the teacher's TP differs, and the loss kernel's float32 chunk temporaries.
    """
    shard = float(seq * micro_batch * (padded_vocab // tp))
    dtype = 2.0 if bf16 else 4.0
    teacher = 2.0 * shard * (2 if teacher_tp != tp else 1)
    temporaries = 4.0 * KD_CHUNK_TEMPORARIES * min(shard, KD_GPU_CHUNK_ELEMS)
    return 2 * dtype * shard + teacher + temporaries


# ----------------------------------------------------------------------------- the plan


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


def _teacher_enabled(cfg: SaltConfig) -> bool:
    return cfg.distill.kd_steps > 0 and cfg.distill.kd_teacher_load is not None


def teacher_fp8(cfg: SaltConfig) -> bool:
    """Whether the teacher keeps FP8-only weights (1 byte each): with ``--fp8-format``."""
    return cfg.training.fp8_format is not None


def _padded(cfg: SaltConfig, vocab: int, teacher: bool = False) -> int:
    if teacher:
        tp = cfg.parallel.teacher_tensor_model_parallel_size
        return mcfg.padded_vocab_size(vocab, cfg.teacher.make_vocab_size_divisible_by, tp)
    tp = cfg.parallel.tensor_model_parallel_size
    return mcfg.padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, tp)


def teacher_memory(cfg: SaltConfig, vocab: int, n_micro: int, stage: int) -> dict[str, float]:
    """The teacher's and the logits' bytes on one rank of pipeline stage ``stage``, by component.

    Every stage holds the teacher body (built with the student's padded vocabulary, its output
    layer dropped) and, at PP > 1, the hidden states of its block of the ``n_micro``
    micro-batches; the last stage holds all ``n_micro`` of them, the head and the logits-sized
    buffers.
    """
    par, tr = cfg.parallel, cfg.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    s, b, last = cfg.data.seq_length, tr.micro_batch_size, stage == pp - 1
    padded, dtype = _padded(cfg, vocab), 2.0 if tr.bf16 else 4.0
    memory: dict[str, float] = {}
    if _teacher_enabled(cfg):
        teacher, ttp = cfg.teacher, par.teacher_tensor_model_parallel_size
        untied = teacher.untie_embeddings_and_output_weights
        body = total_params(teacher, padded) - (padded * teacher.hidden_size if untied else 0)
        tb = max(1, math.ceil(b / (tp // ttp)))
        memory["teacher body weights"] = body / ttp * (1.0 if teacher_fp8(cfg) else dtype)
        memory["teacher forward working set"] = activation_bytes_per_layer(
            teacher, s, tb, tp=ttp, sp=False, flash=teacher.transformer_impl != "local"
        )
        if pp > 1:
            held = n_micro if last else len(stage_blocks(n_micro, pp)[stage])
            memory["teacher hidden states of the step"] = held * s * b * teacher.hidden_size * dtype
        if last:
            memory["teacher head (vocabulary slice)"] = padded // tp * teacher.hidden_size * dtype
            memory["logits + KD loss buffers"] = kd_buffer_bytes(
                s, b, padded, tp=tp, teacher_tp=ttp, bf16=tr.bf16
            )
    elif last:
        memory["logits + loss buffers"] = 2 * dtype * s * b * (padded // tp)
    return memory


def stage_memory(
    cfg: SaltConfig, vocab: int, dp: int, n_micro: int, stage: int, rc: Recompute | None = None
) -> dict[str, float]:
    """Bytes on one rank of pipeline stage ``stage``, by component (``rc``: the run's choice)."""
    par, tr, model = cfg.parallel, cfg.training, cfg.model
    rc = rc or Recompute.of(tr)
    tp, pp, vpp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size,
    )
    sp, s, b = par.sequence_parallel, cfg.data.seq_length, tr.micro_batch_size
    per_param = state_bytes_per_param(
        bf16=tr.bf16, distributed_optimizer=par.use_distributed_optimizer, dp=dp
    )
    params = stage_params(model, _padded(cfg, vocab), tp=tp, pp=pp, stage=stage)
    flash = model.transformer_impl == "transformer_engine"
    parts = activation_parts_per_layer(model, s, b, tp=tp, sp=sp, flash=flash)
    stored = recompute_bytes_per_layer(s, b, model.hidden_size, tp=tp, sp=sp)
    held = in_flight_factor(pp, vpp, n_micro, stage)
    activations = stage_activation_bytes(parts, stored, model.num_layers // pp, vpp or 1, held, rc)
    memory = {
        "student weights+grads+optimizer": params * per_param,
        f"activations (recompute: {rc.label})": activations,
    }
    memory.update(teacher_memory(cfg, vocab, n_micro, stage))
    return memory


def _flops(cfg: SaltConfig, vocab: int) -> dict[str, float]:
    s, spad = cfg.data.seq_length, _padded(cfg, vocab)
    flops = {"student fwd+bwd": model_flops.train_flops_per_token(cfg.model, s, spad)}
    if _teacher_enabled(cfg):
        tpad = _padded(cfg, vocab, teacher=True)
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
    spad = _padded(cfg, vocab_size)
    pipelined = last = 1.0 + flops.get("teacher fwd", 0.0) / flops["student fwd+bwd"]
    if "teacher fwd" in flops and pp > 1:
        shapes = (cfg.model, cfg.teacher, cfg.data.seq_length, spad, pp, n_micro)
        pipelined = kd_step_ratio(*shapes)
        last = kd_step_ratio(*shapes, balanced=False)
    steps, ideal, hours = _times(cfg, flops, world_size, hardware, pipelined)
    result = Plan(
        world_size=world_size,
        dp=dp,
        n_micro=n_micro,
        student_params=total_params(cfg.model, spad),
        teacher_params=(
            total_params(cfg.teacher, _padded(cfg, vocab_size, True))
            if "teacher fwd" in flops
            else 0
        ),
        params_per_rank={
            f"stage {st}": stage_params(cfg.model, spad, tp=tp, pp=pp, stage=st) for st in stages
        },
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


# ----------------------------------------------------------------------------- report


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [title, *(f"  {k.ljust(width)}  {v}" for k, v in rows), ""]


def format_plan(cfg: SaltConfig, p: Plan) -> str:
    """A readable report of a :class:`Plan`."""
    par, hw = cfg.parallel, p.hardware
    layout = (
        f"world {p.world_size} = TP {par.tensor_model_parallel_size} x PP "
        f"{par.pipeline_model_parallel_size} x DP {p.dp}; {p.n_micro} micro-batches of "
        f"{cfg.training.micro_batch_size} x {cfg.data.seq_length} tokens per step"
    )
    lines = [layout, ""]
    params = [("student", f"{p.student_params / 1e9:8.3f} B")]
    if p.teacher_params:
        params.append(("teacher", f"{p.teacher_params / 1e9:8.3f} B"))
    params += [
        (f"student per rank, {k}", f"{v / 1e6:8.1f} M") for k, v in p.params_per_rank.items()
    ]
    lines += _table("Parameters", params)
    mem = [(k, _gib(v)) for k, v in p.memory.items()]
    mem.append((f"total (recompute: {p.recompute.label})", _gib(p.memory_total)))
    mem += [(f"  total with recompute {k}", _gib(v)) for k, v in p.memory_alternatives.items()]
    title = f"Memory per GPU (stage {p.busiest_stage}; {hw.gpu_memory_gib:g} GiB available)"
    lines += _table(title, mem)
    flops = [(k, f"{v / 1e9:8.2f} GFLOP/token") for k, v in p.flops.items()]
    if "teacher fwd" in p.flops:
        flops.append(("KD overhead, ideal", f"x{p.overhead_ideal:.3f}"))
        if par.pipeline_model_parallel_size > 1:
            flops.append(("KD overhead, slowest pipeline stage", f"x{p.overhead_pipeline:.3f}"))
            flops.append(("  (whole teacher on the last stage", f"x{p.overhead_last_stage:.3f})"))
    lines += _table("FLOPs", flops)
    times = [(k, f"{v:8.3f} s") for k, v in p.step_seconds.items()]
    times.append(
        ("whole run", f"{p.total_hours:8.1f} h ({p.total_hours * p.world_size:,.0f} GPU-h)")
    )
    lines += _table(f"Time at MFU {hw.mfu:g} of {hw.gpu_tflops:g} TFLOP/s per GPU", times)
    lines += [f"WARNING: {w}" for w in p.warnings] or ["fits"]
    return "\n".join(lines)
