"""The planner's parameter counts equal those of the real megatron-core GPT built at TP = 1."""

from __future__ import annotations

import dataclasses

import pytest

from salt_megatron import planner
from salt_megatron.config.schema import ModelConfig
from tests.distributed.launcher import run_distributed

SHAPES = {
    "gelu_layernorm_bias_learned_untied": ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        swiglu=False,
        normalization="LayerNorm",
        add_bias_linear=True,
        position_embedding_type="learned_absolute",
        max_position_embeddings=64,
    ),
    "swiglu_rmsnorm_gqa_tied": ModelConfig(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        untie_embeddings_and_output_weights=False,
        max_position_embeddings=64,
    ),
    "defaults": ModelConfig(num_layers=2, hidden_size=64, max_position_embeddings=64),
    "qwen2_qkv_bias": ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        add_qkv_bias=True, max_position_embeddings=64,
    ),
    "qwen3_qk_norm_wide_heads": ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        qk_layernorm=True, max_position_embeddings=64,
    ),
    "moe_dense_layer_shared_expert": ModelConfig(
        num_layers=3, hidden_size=32, num_attention_heads=4, num_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=24, moe_layer_freq=[1, 0, 1], moe_shared_expert_intermediate_size=16,
        max_position_embeddings=64,
    ),
    "moe_gelu_biases": ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=2, moe_router_topk=1,
        moe_router_pre_softmax=True, swiglu=False, add_bias_linear=True, normalization="LayerNorm",
        max_position_embeddings=64,
    ),
}  # fmt: skip
VOCAB = 256


def _count(shapes: dict[str, dict]) -> dict[str, int]:
    """On one rank: build each GPT (TP = PP = 1) and count its parameters."""
    from megatron.core import parallel_state

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.models.gpt import build_gpt

    parallel_state.initialize_model_parallel(1, 1)
    counts = {}
    for name, fields in shapes.items():
        model = ModelConfig(**fields)
        gpt = build_gpt(
            model,
            mcfg.transformer_config(model, tp=1),
            padded_vocab_size=VOCAB,
            max_sequence_length=model.max_position_embeddings,
            pre_process=True,
            post_process=True,
        )
        counts[name] = sum(p.numel() for p in gpt.parameters())
    return counts


@pytest.mark.distributed
def test_planner_counts_match_megatron() -> None:
    fields = {name: dataclasses.asdict(model) for name, model in SHAPES.items()}
    (measured,) = run_distributed(_count, 1, fields)
    expected = {name: planner.total_params(model, VOCAB) for name, model in SHAPES.items()}
    assert measured == expected
