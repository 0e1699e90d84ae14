"""Per-GPU memory of a SALT run, by component, on one rank of a pipeline stage.

* **Student weights, gradients, optimizer** per parameter on the rank: with ``--bf16`` the bf16
  weights (2), float32 gradients (4, megatron reduces in float32), float32 main weights (4) and
  Adam's m and v (4 + 4): 18 bytes; the distributed optimizer shards the main weights and Adam's
  states over data-parallel ranks: ``6 + 12 / dp``. In float32: ``16`` or ``8 + 8 / dp``. The
  routed experts of MoE layers are replicated over the expert data-parallel group (``edp``)
  instead, and sharded over it.
* **Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation"), per layer and
  micro-batch, 16-bit: ``s·b·h·(10 + 24/t) + 5·a·s²·b/t`` without sequence parallelism and all of it
  divided by ``t`` with it (``34 + 5as/h`` at ``t = 1``). The ``24`` generalises to GQA and SwiGLU
  (``8`` for attention, ``2f/h·(k + 1)`` for an MLP of width ``f`` with ``k`` fc1 outputs); flash
  attention (Transformer Engine) keeps no ``s²`` scores; an MoE layer's MLP part is
  :func:`salt_megatron.planner.moe.moe_mlp_activation_bytes`. The run's ``--recompute-*``
  choice (:class:`Recompute`) decides what stays: full recomputation keeps only the input
  (``2·s·b·h``, ``/t`` with SP) of each group of ``--recompute-num-layers`` layers (uniform) or of
  the first ``--recompute-num-layers`` layers of each chunk (block), plus one group's working set
  during its recompute; selective recomputation drops the recomputed modules' activations
  (``core_attn``: the ``s²`` scores; ``mlp``: the MLP's; ``layernorm``: the two norm outputs).
  The report also gives the totals under no, selective and full recomputation. The first pipeline
  stage holds ``min(pp, micro-batches)`` micro-batches in flight under 1F1B (interleaving
  multiplies it by ``1 + (pp - 1) / (pp·v)``).
* **Teacher** (:func:`teacher_memory`; every pipeline stage holds a teacher body at its own TP):
  the body's weights (the student's padded vocabulary in the embedding, no output layer; an
  MoE teacher's experts all on each rank, split over its TP) in the training dtype or FP8 (1
  byte, with ``--fp8-format``), plus one layer's no-grad working set; the last stage also
  holds the head (its ``V/t x h`` vocabulary slice of the output layer). With PP > 1 the last
  stage holds the final hidden states of all the step's micro-batches (``M·s·b·h_teacher``,
  gathered before the schedule) and every other stage those of its block.
* **Logits and the KD loss** on the last stage: the student's logits shard ``s·b·V/t`` and its
  gradient in the training dtype, the teacher's shard (bf16), a second teacher shard when the
  teacher's TP differs from the student's (the exchange's receive buffer), and the loss kernel's
  float32 chunk temporaries (see ``salt_megatron.loss.kd_cross_entropy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig, SaltConfig, TrainingConfig
from salt_megatron.parallel.teacher_pipeline import stage_blocks
from salt_megatron.planner.moe import moe_mlp_activation_bytes
from salt_megatron.planner.params import (
    stage_expert_params,
    stage_layers,
    stage_params,
    total_params,
)

GIB = 1024**3
#: Float32 temporaries of the KD loss per chunk, and the chunk size on a GPU (elements).
KD_CHUNK_TEMPORARIES = 3
KD_GPU_CHUNK_ELEMS = 1 << 26


def state_bytes_per_param(*, bf16: bool, distributed_optimizer: bool, dp: int) -> float:
    """Bytes per parameter of weights + gradients + main weights + Adam states on one rank."""
    if bf16:
        sharded = 4.0 + 8.0  # float32 main weights, Adam m and v
        return 2.0 + 4.0 + (sharded / dp if distributed_optimizer else sharded)
    return 4.0 + 4.0 + (8.0 / dp if distributed_optimizer else 8.0)


def activation_parts_per_layer(
    model: ModelConfig,
    seq: int,
    micro_batch: int,
    *,
    tp: int,
    sp: bool,
    flash: bool,
    moe: bool = False,
    etp: int | None = None,
) -> dict[str, float]:
    """The terms of :func:`activation_bytes_per_layer` on one TP rank, by what holds them.

    ``moe``: an MoE layer, whose ``mlp`` term is its router, dispatcher and experts' (expert TP
    ``etp``, None: ``tp``).
    """
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
    mlp_part = moe_mlp_activation_bytes(model, s, b, tp=tp, etp=etp or tp) if moe else mlp / tp
    return {
        "layernorm": norm_outputs / seq_split,
        "replicated": rest / seq_split,
        "attention": attention / tp,
        "mlp": mlp_part,
        "core_attn": scores / tp,
    }


def activation_bytes_per_layer(
    model: ModelConfig,
    seq: int,
    micro_batch: int,
    *,
    tp: int,
    sp: bool,
    flash: bool,
    moe: bool = False,
    etp: int | None = None,
) -> float:
    """Stored 16-bit activations of one layer and micro-batch (Korthikanti et al., generalised)."""
    parts = activation_parts_per_layer(
        model, seq, micro_batch, tp=tp, sp=sp, flash=flash, moe=moe, etp=etp
    )
    return sum(parts.values())


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


def teacher_enabled(cfg: SaltConfig) -> bool:
    return cfg.distill.kd_steps > 0 and cfg.distill.kd_teacher_load is not None


def teacher_fp8(cfg: SaltConfig) -> bool:
    """Whether the teacher keeps FP8-only weights (1 byte each): with ``--fp8-format``."""
    return cfg.training.fp8_format is not None


def padded_vocab(cfg: SaltConfig, vocab: int, teacher: bool = False) -> int:
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
    padded, dtype = padded_vocab(cfg, vocab), 2.0 if tr.bf16 else 4.0
    memory: dict[str, float] = {}
    if teacher_enabled(cfg):
        teacher, ttp = cfg.teacher, par.teacher_tensor_model_parallel_size
        untied = teacher.untie_embeddings_and_output_weights
        body = total_params(teacher, padded) - (padded * teacher.hidden_size if untied else 0)
        tb = max(1, math.ceil(b / (tp // ttp)))
        memory["teacher body weights"] = body / ttp * (1.0 if teacher_fp8(cfg) else dtype)
        flash = teacher.transformer_impl != "local"
        memory["teacher forward working set"] = max(
            activation_bytes_per_layer(teacher, s, tb, tp=ttp, sp=False, flash=flash, moe=bool(m))
            for m in set(teacher.moe_layer_pattern())
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
    ep, etp = par.expert_model_parallel_size, par.expert_tp
    edp = dp * tp // (etp * ep)
    dist_opt = par.use_distributed_optimizer
    params = stage_params(
        model, padded_vocab(cfg, vocab), tp=tp, pp=pp, stage=stage, ep=ep, etp=etp
    )
    experts = stage_expert_params(model, pp=pp, stage=stage, ep=ep, etp=etp)
    state = (params - experts) * state_bytes_per_param(
        bf16=tr.bf16, distributed_optimizer=dist_opt, dp=dp
    ) + experts * state_bytes_per_param(bf16=tr.bf16, distributed_optimizer=dist_opt, dp=edp)
    flash = model.transformer_impl == "transformer_engine"
    parts = _mean_layer_parts(model, s, b, tp=tp, sp=sp, flash=flash, etp=etp,
                              layers=stage_layers(model, pp, stage))  # fmt: skip
    stored = recompute_bytes_per_layer(s, b, model.hidden_size, tp=tp, sp=sp)
    held = in_flight_factor(pp, vpp, n_micro, stage)
    activations = stage_activation_bytes(parts, stored, model.num_layers // pp, vpp or 1, held, rc)
    memory = {
        "student weights+grads+optimizer": state,
        f"activations (recompute: {rc.label})": activations,
    }
    memory.update(teacher_memory(cfg, vocab, n_micro, stage))
    return memory


def _mean_layer_parts(
    model: ModelConfig, s: int, b: int, *, tp: int, sp: bool, flash: bool, etp: int,
    layers: list[int],
) -> dict[str, float]:  # fmt: skip
    """:func:`activation_parts_per_layer` averaged over a stage's dense and MoE layers."""
    kinds = [activation_parts_per_layer(model, s, b, tp=tp, sp=sp, flash=flash, moe=bool(m),
                                        etp=etp) for m in layers]  # fmt: skip
    return {key: sum(k[key] for k in kinds) / len(kinds) for key in kinds[0]}
