"""GPT model provider on megatron-core: local layer spec on CPU, Transformer Engine when asked."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from salt_megatron import runtime
from salt_megatron.config.schema import ModelConfig
from salt_megatron.models.moe import check_moe_device, moe_mlp_spec, without_te_gemm


class TransformerEngineUnavailable(RuntimeError):
    """``--transformer-impl transformer_engine`` was asked for but TE cannot be imported."""


def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports in this environment."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


class LocalNorm:
    """Plain-torch LayerNorm/RMSNorm that also works under sequence parallelism.

    megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``; the math is the same, only
    the gradients of the (replicated) norm weights must be all-reduced over the TP group, which
    megatron does for parameters marked ``sequence_parallel``.
    """

    def __new__(  # type: ignore[misc]
        cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any
    ) -> torch.nn.Module:
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        # Where megatron's own layers put their weights: the current GPU unless initialising on
        # the CPU (the layers are then moved with the model).
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype, device=device)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        return norm


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer whose weights are drawn from a generator seeded by its global index.

    megatron initialises layers from whatever state the RNG is in, so the same seed gives
    different weights at different pipeline layouts. Seeding each layer from
    ``(init_seed, global layer number)`` makes the initial model the same at every TP/PP/VPP
    layout (with CPU initialisation, which draws full weights before slicing them for TP).
    """

    def __init__(self, config: TransformerConfig, *args: Any, init_seed: int = 0, **kwargs: Any):
        pg_collection = (
            kwargs.get("pg_collection") or ProcessGroupCollection.use_mpu_process_groups()
        )
        local_number = kwargs.get("layer_number", args[1] if len(args) > 1 else 1)
        offset = get_transformer_layer_offset(
            config, kwargs.get("vp_stage"), get_pg_rank(pg_collection.pp)
        )
        torch.manual_seed(init_seed * 100_003 + local_number + offset)
        super().__init__(config, *args, **kwargs)


def _local_block_spec(
    model: ModelConfig,
    config: TransformerConfig,
    vp_stage: int | None,
    pp_rank: int | None,
    init_seed: int,
) -> TransformerBlockSubmodules:
    layer = get_gpt_layer_local_spec(
        normalization=model.normalization, qk_layernorm=model.qk_layernorm
    )
    attention = layer.submodules.self_attention
    if model.qk_layernorm:
        qk_norms = {"q_layernorm": LocalNorm, "k_layernorm": LocalNorm}
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, **qk_norms)
        )
    subs = dataclasses.replace(
        layer.submodules,
        input_layernorm=LocalNorm,
        pre_mlp_layernorm=LocalNorm,
        self_attention=attention,
    )
    layer = ModuleSpec(
        module=SeededTransformerLayer,
        params={**layer.params, "init_seed": init_seed},
        submodules=subs,
    )
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if not model.is_moe:
        return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=LocalNorm)
    moe_layer = dataclasses.replace(
        layer, submodules=dataclasses.replace(layer.submodules, mlp=moe_mlp_spec())
    )
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    pattern = model.moe_layer_pattern()[offset : offset + n_layers]
    specs = [moe_layer if is_moe else layer for is_moe in pattern]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LocalNorm)


def layer_spec(
    model: ModelConfig,
    config: TransformerConfig,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    init_seed: int = 0,
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder spec for ``model.transformer_impl``; TE asked for and absent is an error.

    An MoE model under Transformer Engine takes megatron's own block spec (its MoE layers at
    --moe-layer-freq, TEGroupedMLP experts with --moe-grouped-gemm): unrun here, no GPU.
    """
    check_moe_device(model)
    if model.transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise TransformerEngineUnavailable(
                "--transformer-impl transformer_engine was asked for, but transformer_engine "
                "cannot be imported; install it (pip install 'salt-megatron[gpu]' or the NVIDIA "
                "PyTorch container) or use --transformer-impl local"
            )
        if model.is_moe:
            return get_gpt_decoder_block_spec(
                config, use_transformer_engine=True, normalization=model.normalization,
                vp_stage=vp_stage, pp_rank=pp_rank,
            )  # fmt: skip
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    if model.is_moe:
        without_te_gemm()
    return _local_block_spec(model, config, vp_stage, pp_rank, init_seed)


def build_gpt(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    padded_vocab_size: int,
    max_sequence_length: int,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    pp_rank: int | None = None,
    init_seed: int = 0,
    device: torch.device | None = None,
) -> GPTModel:
    """One GPT model chunk with vocab-parallel output logits ``[s, b, V/tp]``, on ``device``.

    ``pg_collection`` builds the model on explicit process groups (the teacher's); None uses
    megatron's global parallel state (the student's). Weights are seeded from ``init_seed``
    (embeddings) and per layer (see :class:`SeededTransformerLayer`): the same at any layout.

    Every parameter and buffer ends on ``device`` (default: this rank's, see
    :func:`salt_megatron.runtime.device`) in ``config.params_dtype``: megatron places its own
    layers, but plain ``torch.nn`` modules inside the model (the learned position embedding)
    are built on the host in float32. Megatron-LM fixes both with ``model.cuda()`` and its
    ``Float16Module``; this is the same cast without the wrapper (bf16 with learned absolute
    positions would otherwise feed float32 activations to the first bf16 linear layer).
    """
    torch.manual_seed(init_seed)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, config, vp_stage, pp_rank, init_seed),
        vocab_size=padded_vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        seq_len_interpolation_factor=model.rotary_seq_len_interpolation_factor,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    return gpt.to(device=device or runtime.device(), dtype=config.params_dtype)
