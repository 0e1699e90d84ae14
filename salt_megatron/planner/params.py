"""Parameter counts of a GPT (dense or mixture-of-experts) per rank of a TP x PP x EP layout.

megatron-core's local/TE layout: column-parallel QKV and fc1 shard weights and biases;
row-parallel projection and fc2 shard their weights, and their biases and the norms are
replicated. An MoE layer replaces the MLP by a router (``E x h``, replicated), ``E / EP`` local
experts (each an MLP of ``--moe-ffn-hidden-size`` split over the expert TP size) and an optional
shared expert (an MLP split over TP). tests/distributed/test_planner_counts.py and
tests/distributed/test_moe.py check these against the built models.
"""

from __future__ import annotations

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig
from salt_megatron.models.flops import expert_width


def _norm_params(model: ModelConfig, width: int | None = None) -> int:
    return (width or model.hidden_size) * (2 if model.normalization == "LayerNorm" else 1)


def mlp_params(model: ModelConfig, width: int, tp: int = 1) -> int:
    """One MLP of ``width`` on one of ``tp`` ranks (biases with --add-bias-linear)."""
    h, bias = model.hidden_size, model.add_bias_linear
    fc1_out = width * (2 if model.swiglu else 1)
    column = h * fc1_out + (fc1_out if bias else 0)
    return column // tp + width * h // tp + (h if bias else 0)


def attention_params(model: ModelConfig, tp: int = 1) -> int:
    """Attention (QKV, projection) and the layer's two norms on one of ``tp`` ranks."""
    h, head_dim = model.hidden_size, model.head_dim
    q = model.num_attention_heads * head_dim
    kv = (model.num_query_groups or model.num_attention_heads) * head_dim
    bias = model.add_bias_linear
    qkv_bias = q + 2 * kv if bias or model.add_qkv_bias else 0
    column, row = h * (q + 2 * kv) + qkv_bias, q * h
    replicated = 2 * _norm_params(model) + (h if bias else 0)
    if model.qk_layernorm:
        replicated += 2 * _norm_params(model, head_dim)  # one query and one key norm
    return column // tp + row // tp + replicated


def expert_params(model: ModelConfig, ep: int = 1, etp: int = 1) -> int:
    """The routed experts of one MoE layer on one rank: ``E / ep`` MLPs split ``etp`` ways."""
    assert model.num_experts is not None
    return model.num_experts // ep * mlp_params(model, expert_width(model), etp)


def layer_params(
    model: ModelConfig, tp: int = 1, *, moe: bool = False, ep: int = 1, etp: int | None = None
) -> int:
    """Parameters of one transformer layer (``moe``: an MoE layer) on one rank.

    ``etp``: expert tensor-parallel size (None: ``tp``).
    """
    if not moe:
        return attention_params(model, tp) + mlp_params(model, mcfg.ffn_hidden_size(model), tp)
    assert model.num_experts is not None
    router = model.num_experts * (model.hidden_size + (1 if model.add_bias_linear else 0))
    shared = model.moe_shared_expert_intermediate_size
    shared_params = mlp_params(model, shared, tp) if shared else 0
    experts = expert_params(model, ep, etp or tp)
    return attention_params(model, tp) + router + experts + shared_params


def stage_layers(model: ModelConfig, pp: int, stage: int) -> list[int]:
    """1 for each MoE layer, 0 for each dense one, of pipeline stage ``stage`` (no virtual PP)."""
    per = model.num_layers // pp
    return model.moe_layer_pattern()[stage * per : (stage + 1) * per]


def stage_params(
    model: ModelConfig,
    padded_vocab: int,
    *,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    ep: int = 1,
    etp: int | None = None,
) -> int:
    """Parameters on one rank of pipeline stage ``stage`` (0-based) under TP, PP and EP.

    The first stage holds the word (and learned position) embeddings; the last the final norm and
    the output layer, which with tied embeddings is a copy of the word embeddings when PP > 1.
    """
    h = model.hidden_size
    layers = stage_layers(model, pp, stage)
    total = sum(layer_params(model, tp, moe=bool(m), ep=ep, etp=etp) for m in layers)
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


def stage_expert_params(
    model: ModelConfig, *, pp: int = 1, stage: int = 0, ep: int = 1, etp: int = 1
) -> int:
    """The routed experts' parameters on one rank of stage ``stage``: those replicated (and
    sharded by the distributed optimizer) over the expert data-parallel group, not over DP."""
    if not model.is_moe:
        return 0
    return sum(stage_layers(model, pp, stage)) * expert_params(model, ep, etp)


def total_params(model: ModelConfig, padded_vocab: int) -> int:
    """All parameters of the model (TP = PP = EP = 1)."""
    return stage_params(model, padded_vocab)


def active_params(model: ModelConfig, padded_vocab: int) -> int:
    """Parameters one token passes through: all but the ``E - k`` routed experts it skips in
    each MoE layer (Mixtral's "active parameters")."""
    if not model.is_moe:
        return total_params(model, padded_vocab)
    assert model.num_experts is not None
    skipped = (model.num_experts - model.moe_router_topk) * mlp_params(model, expert_width(model))
    return total_params(model, padded_vocab) - sum(model.moe_layer_pattern()) * skipped
