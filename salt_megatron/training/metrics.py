"""FLOP counts, throughput and model-FLOP utilisation (MFU)."""

from __future__ import annotations

import torch

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import ModelConfig

#: Dense bf16 peak TFLOP/s by GPU name fragment (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


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


def peak_tflops() -> float | None:
    """Dense bf16 peak of this rank's GPU, or None (CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
