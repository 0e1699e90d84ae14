"""Model provider: Transformer Engine asked for and absent is a clear error, never a fallback."""

from __future__ import annotations

import pytest

from salt_megatron.config import ModelConfig
from salt_megatron.config import megatron as mcfg
from salt_megatron.models.gpt import (
    TransformerEngineUnavailable,
    have_transformer_engine,
    layer_spec,
)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine is installed")
def test_transformer_engine_absent_is_an_error() -> None:
    model = ModelConfig(transformer_impl="transformer_engine")
    tf = mcfg.transformer_config(model, tp=1)
    with pytest.raises(TransformerEngineUnavailable, match="--transformer-impl local"):
        layer_spec(model, tf)


def test_ffn_sizes() -> None:
    assert mcfg.ffn_hidden_size(ModelConfig(hidden_size=256, swiglu=False)) == 1024
    assert mcfg.ffn_hidden_size(ModelConfig(hidden_size=256, swiglu=True)) == 704  # 682.7 -> 704
    assert mcfg.ffn_hidden_size(ModelConfig(ffn_hidden_size=100)) == 100
