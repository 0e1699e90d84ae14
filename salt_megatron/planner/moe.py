"""Mixture-of-experts terms of the plan: expert counts, active parameters, activations, all-to-all.

All of it assumes balanced routing without dropped tokens (every expert gets ``T k / E`` of the
``T`` tokens routed ``k`` ways): dropless routing is as uneven as the router makes it, and the
busiest expert's rank holds more (``moe/load_max_over_mean`` in the training logs measures it).

Expert layout (megatron's): each pipeline stage's ``TP x DP`` ranks are also ``ETP x EP x EDP``.
With sequence parallelism (required with MoE at TP > 1) a rank routes ``T = s b / TP`` tokens
of a micro-batch. Under the all-to-all dispatcher it sends ``T k (EP-1)/EP`` of its token copies
to the other EP ranks and receives as many back after the experts, forward and again backward;
the expert TP group then all-gathers its ranks' tokens, so each rank computes its ``1/ETP``
shard of the experts on ``T k ETP`` tokens. Under the all-gather dispatcher every rank gathers
all ``T ETP EP`` tokens of its ``ETP x EP`` group and reduce-scatters the outputs.
"""

from __future__ import annotations

from salt_megatron.config.schema import ModelConfig, SaltConfig
from salt_megatron.models.flops import expert_width
from salt_megatron.planner.params import active_params, stage_layers, total_params


def routed_tokens(seq: int, micro_batch: int, tp: int) -> float:
    """Tokens one rank routes per micro-batch: ``s b / TP`` (sequence parallel at TP > 1)."""
    return seq * micro_batch / tp


def moe_mlp_activation_bytes(
    model: ModelConfig, seq: int, micro_batch: int, *, tp: int, etp: int
) -> float:
    """Stored 16-bit activations of an MoE layer's MLP part on one rank, per micro-batch.

    The experts' inputs, fc1 outputs and activation outputs on their ``T k ETP`` tokens (each
    rank holding ``1/ETP`` of the widths), the dispatcher's permuted copies of the rank's
    ``T k`` token assignments (dispatch and combine), the router's float32 logits and scores
    (``T x E``), and the shared expert (a dense MLP split over TP).
    """
    assert model.num_experts is not None
    h, k = model.hidden_size, model.moe_router_topk
    t = routed_tokens(seq, micro_batch, tp)
    fc1_outputs = 2 if model.swiglu else 1
    expert_tokens = t * k * etp
    experts = 2.0 * expert_tokens * (h + expert_width(model) * (fc1_outputs + 1) / etp)
    permuted = 2.0 * 2.0 * t * k * h
    router = 2.0 * 4.0 * t * model.num_experts
    shared = model.moe_shared_expert_intermediate_size or 0
    shared_bytes = 2.0 * seq * micro_batch * shared * (fc1_outputs + 1) / tp
    return experts + permuted + router + shared_bytes


def dispatch_bytes_per_layer(
    model: ModelConfig, seq: int, micro_batch: int, *, tp: int, ep: int, etp: int, dtype: float
) -> float:
    """Bytes one rank sends (= receives) per MoE layer and micro-batch, forward and backward.

    All-to-all: dispatch and combine, ``T k h (EP-1)/EP`` each way, twice per direction of the
    pass. All-gather: the gather and the reduce-scatter of ``(ETP EP - 1) T h``, likewise.
    """
    h, k = model.hidden_size, model.moe_router_topk
    t = routed_tokens(seq, micro_batch, tp)
    if model.moe_token_dispatcher_type == "allgather":
        return 4.0 * (etp * ep - 1) * t * h * dtype
    return 4.0 * t * k * h * (ep - 1) / ep * dtype


def moe_summary(cfg: SaltConfig, padded_vocab: int, n_micro: int, stage: int) -> dict[str, float]:
    """Expert counts, active parameters and the dispatcher's traffic per step on one rank of
    pipeline stage ``stage`` (empty for a dense student)."""
    model, par, tr = cfg.model, cfg.parallel, cfg.training
    if not model.is_moe:
        return {}
    assert model.num_experts is not None
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    ep = par.expert_model_parallel_size
    moe_layers = sum(stage_layers(model, pp, stage))
    dtype = 2.0 if tr.bf16 else 4.0
    per_layer = dispatch_bytes_per_layer(
        model, cfg.data.seq_length, tr.micro_batch_size, tp=tp, ep=ep, etp=par.expert_tp,
        dtype=dtype,
    )  # fmt: skip
    total, active = total_params(model, padded_vocab), active_params(model, padded_vocab)
    return {
        "experts per MoE layer": float(model.num_experts),
        "MoE layers": float(sum(model.moe_layer_pattern())),
        "experts per rank and layer": float(model.num_experts // ep),
        "active parameters per token": float(active),
        "active fraction": active / total,
        "dispatcher traffic per step and rank": per_layer * moe_layers * n_micro,
    }
