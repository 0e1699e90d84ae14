"""FLOPs per token of a GPT model, from its shape alone (training throughput, MFU, the planner).

A mixture-of-experts layer counts what a token computes: the router (``h x E``), its
``--moe-router-topk`` experts and the shared expert, not the experts it skips.
"""

from __future__ import annotations

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig


def mlp_params(model: ModelConfig, width: int) -> int:
    """Weights of one MLP of ``width`` (fc1, gated with SwiGLU, and fc2)."""
    return model.hidden_size * width * (2 if model.swiglu else 1) + width * model.hidden_size


def attention_params(model: ModelConfig) -> int:
    """Weights of one layer's QKV and output projection."""
    h, head_dim = model.hidden_size, model.head_dim
    q_dim = model.num_attention_heads * head_dim
    kv_dim = (model.num_query_groups or model.num_attention_heads) * head_dim
    return h * (q_dim + 2 * kv_dim) + q_dim * h


def expert_width(model: ModelConfig) -> int:
    """Width of one expert's MLP: --moe-ffn-hidden-size, else --ffn-hidden-size."""
    return model.moe_ffn_hidden_size or mcfg.ffn_hidden_size(model)


def linear_params_per_layer(model: ModelConfig, moe: bool = False) -> int:
    """Matrix-multiply weights one token passes through in one layer (dense or MoE)."""
    if not moe:
        return attention_params(model) + mlp_params(model, mcfg.ffn_hidden_size(model))
    assert model.num_experts is not None
    routed = model.moe_router_topk * mlp_params(model, expert_width(model))
    shared = mlp_params(model, model.moe_shared_expert_intermediate_size or 0)
    router = model.hidden_size * model.num_experts
    return attention_params(model) + router + routed + shared


def forward_flops_per_token(model: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Forward FLOPs per token: 2 x matmul weights, the LM head, and attention (QK^T and AV).

    Attention counts the full s x s square, as Megatron-LM's MFU does.
    """
    layers = model.num_layers
    weights = sum(linear_params_per_layer(model, bool(m)) for m in model.moe_layer_pattern())
    matmul = 2.0 * (weights + model.hidden_size * vocab_size)
    attention = layers * 4.0 * seq_length * model.num_attention_heads * model.head_dim
    return matmul + attention


def train_flops_per_token(model: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Forward + backward FLOPs per token (backward = 2 x forward)."""
    return 3.0 * forward_flops_per_token(model, seq_length, vocab_size)
