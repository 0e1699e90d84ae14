"""Model provider: Transformer Engine asked for and absent is a clear error, never a fallback."""

from __future__ import annotations

import pytest
import torch

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


def test_gpu_fusions_follow_the_available_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU each fusion is on where its kernel exists; all off on the CPU."""
    from salt_megatron.runtime.kernels import FusedKernels

    rope, gelu = (
        ModelConfig(),
        ModelConfig(swiglu=False, position_embedding_type="learned_absolute"),
    )
    cpu = mcfg.transformer_config(rope, tp=1)
    flags = ("bias_activation_fusion", "gradient_accumulation_fusion", "apply_rope_fusion",
             "bias_dropout_fusion", "masked_softmax_fusion")  # fmt: skip
    assert not any(getattr(cpu, f) for f in flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    apex_only = FusedKernels(transformer_engine=False, fused_wgrad=True, fused_rope=False)
    monkeypatch.setattr(mcfg, "fused_kernels", lambda: apex_only)
    gpu = mcfg.transformer_config(rope, tp=1)
    assert gpu.bias_activation_fusion and gpu.gradient_accumulation_fusion
    assert gpu.bias_dropout_fusion and gpu.masked_softmax_fusion and not gpu.apply_rope_fusion
    # packed SFT: the fused causal softmax kernel would ignore the block-diagonal mask
    packed = mcfg.transformer_config(rope, tp=1, packed=True)
    assert not packed.masked_softmax_fusion and packed.bias_dropout_fusion
    everything = FusedKernels(transformer_engine=True, fused_wgrad=True, fused_rope=True)
    assert mcfg.fusions(rope, True, everything)["apply_rope_fusion"]
    assert not mcfg.fusions(gelu, True, everything)["apply_rope_fusion"]  # no rotary embedding
    assert not mcfg.fusions(gelu, True, everything)["bias_activation_fusion"]  # GeLU, no bias
    bare = FusedKernels(transformer_engine=False, fused_wgrad=False, fused_rope=False)
    assert not mcfg.fusions(rope, True, bare)["gradient_accumulation_fusion"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs them")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"moe_grouped_gemm": True, "transformer_impl": "transformer_engine"},
         "--moe-grouped-gemm needs a GPU"),
        ({"moe_token_dispatcher_type": "flex"}, "--moe-token-dispatcher-type flex needs GPUs"),
    ],
)  # fmt: skip
def test_gpu_only_moe_paths_are_refused_on_the_cpu(flags: dict, message: str) -> None:
    from salt_megatron.models.moe import MoEUnavailable

    model = ModelConfig(num_experts=4, **flags)
    with pytest.raises(MoEUnavailable, match=message):
        layer_spec(model, mcfg.transformer_config(model, tp=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs it")
def test_the_teachers_gpu_only_moe_flag_is_named() -> None:
    from salt_megatron.config import TeacherModelConfig
    from salt_megatron.models.moe import MoEUnavailable, check_moe_device

    teacher = TeacherModelConfig(num_experts=4, moe_token_dispatcher_type="flex")
    with pytest.raises(MoEUnavailable, match="--teacher-moe-token-dispatcher-type flex"):
        check_moe_device(teacher)
