"""FLOPs per token of a GPT model, from its shape alone (training throughput, MFU, the planner)."""

from __future__ import annotations

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig


def linear_params_per_layer(model: ModelConfig) -> int:
    """Weights of one transformer layer's matrix multiplies (QKV, projection, MLP)."""
    h, head_dim = model.hidden_size, model.head_dim
    q_dim = model.num_attention_heads * head_dim
    kv_dim = (model.num_query_groups or model.num_attention_heads) * head_dim
    ffn = mcfg.ffn_hidden_size(model)
    mlp_in = ffn * (2 if model.swiglu else 1)
    return h * (q_dim + 2 * kv_dim) + q_dim * h + h * mlp_in + ffn * h


def forward_flops_per_token(model: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Forward FLOPs per token: 2 x matmul weights, the LM head, and attention (QK^T and AV).

    Attention counts the full s x s square, as Megatron-LM's MFU does.
    """
    layers = model.num_layers
    matmul = 2.0 * (layers * linear_params_per_layer(model) + model.hidden_size * vocab_size)
    attention = layers * 4.0 * seq_length * model.num_attention_heads * model.head_dim
    return matmul + attention


def train_flops_per_token(model: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Forward + backward FLOPs per token (backward = 2 x forward)."""
    return 3.0 * forward_flops_per_token(model, seq_length, vocab_size)
