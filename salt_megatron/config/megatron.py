"""The one place that translates our config tree into megatron-core's configs.

``TransformerConfig`` (model shape + parallel layout + precision), ``DistributedDataParallelConfig``
and ``OptimizerConfig``. Nothing else in the package constructs these.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from salt_megatron.config.schema import ModelConfig, ParallelConfig, SaltConfig, TrainingConfig
from salt_megatron.runtime.kernels import FusedKernels, fused_kernels


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Pad the vocabulary to a multiple of ``divisible_by * tp_size`` (Megatron's rule)."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def ffn_hidden_size(model: ModelConfig) -> int:
    """MLP width: explicit, else 4h (GELU) or 8h/3 rounded up to a multiple of 64 (SwiGLU)."""
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.swiglu:
        return int(math.ceil(8 * model.hidden_size / 3 / 64) * 64)
    return 4 * model.hidden_size


def fusions(model: ModelConfig, on_gpu: bool, kernels: FusedKernels) -> dict[str, bool]:
    """megatron-core's fusion flags: each on where the GPU stack has its kernel.

    * ``bias_activation_fusion`` (megatron's jit-fused SwiGLU / bias-GeLU): any GPU; megatron
      refuses it for a GeLU MLP without biases.
    * ``bias_dropout_fusion``, ``masked_softmax_fusion``: any GPU (megatron falls back to the
      unfused softmax when its kernel is missing).
    * ``gradient_accumulation_fusion``: apex's ``fused_weight_gradient_mlp_cuda`` (megatron's
      own linear layers use it under every layer spec; without it megatron raises).
    * ``apply_rope_fusion``: rotary embeddings and TE's fused RoPE kernel.
    * ``persist_layer_norm``: apex's persistent LayerNorm, which neither layer spec here uses.

    All off on the CPU.
    """
    gelu_without_bias = not model.swiglu and not model.add_bias_linear
    return {
        "bias_activation_fusion": on_gpu and not gelu_without_bias,
        "bias_dropout_fusion": on_gpu,
        "masked_softmax_fusion": on_gpu,
        "gradient_accumulation_fusion": on_gpu and kernels.fused_wgrad,
        "apply_rope_fusion": (
            on_gpu and kernels.fused_rope and model.position_embedding_type == "rope"
        ),
        "persist_layer_norm": False,
    }


def shape_fields(model: ModelConfig) -> dict[str, Any]:
    """``TransformerConfig``'s fields for the model's shape, activation, norm and init."""
    return {
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups,
        "kv_channels": model.head_dim,
        "ffn_hidden_size": ffn_hidden_size(model),
        "hidden_dropout": model.hidden_dropout,
        "attention_dropout": model.attention_dropout,
        "init_method_std": model.init_method_std,
        "normalization": model.normalization,
        "layernorm_epsilon": model.norm_epsilon,
        "gated_linear_unit": model.swiglu,
        "activation_func": F.silu if model.swiglu else F.gelu,
        "add_bias_linear": model.add_bias_linear,
        "add_qkv_bias": model.add_qkv_bias,
        "qk_layernorm": model.qk_layernorm,
    }


def moe_fields(model: ModelConfig, ep: int = 1, etp: int | None = None) -> dict[str, Any]:
    """``TransformerConfig``'s mixture-of-experts fields (none for a dense model).

    ``ep``/``etp``: expert-parallel and expert tensor-parallel sizes (``etp`` None: the TP size,
    megatron's default). The loss is per token (:func:`transformer_config`), so megatron scales
    the load-balancing loss by each micro-batch's token count itself (see
    :mod:`salt_megatron.models.moe`). Fused permutation and router kernels (TE) stay off.
    """
    if not model.is_moe:
        return {}
    pattern = model.moe_layer_pattern()
    freq = model.moe_layer_freq[0] if len(model.moe_layer_freq) == 1 else pattern
    return {
        "num_moe_experts": model.num_experts,
        "moe_router_topk": model.moe_router_topk,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size or ffn_hidden_size(model),
        "moe_layer_freq": freq,
        "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
        "moe_router_load_balancing_type": model.moe_router_load_balancing_type,
        "moe_aux_loss_coeff": model.moe_aux_loss_coeff,
        "moe_router_pre_softmax": model.moe_router_pre_softmax,
        "moe_expert_capacity_factor": model.moe_expert_capacity_factor,
        "moe_token_drop_policy": model.moe_token_drop_policy,
        "moe_token_dispatcher_type": model.moe_token_dispatcher_type,
        "moe_grouped_gemm": model.moe_grouped_gemm,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp,
    }


def transformer_config(
    model: ModelConfig,
    *,
    tp: int,
    pp: int = 1,
    vpp: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    sequence_parallel: bool = False,
    bf16: bool = False,
    fp8_format: str | None = None,
    fp8_recipe: str = "delayed",
    fp8_param: bool = False,
    tp_only_amax_red: bool = False,
    host_init: bool | None = None,
    recompute: dict[str, Any] | None = None,
    packed: bool = False,
) -> TransformerConfig:
    """A megatron-core ``TransformerConfig`` for one model under a (TP, PP, VPP) layout.

    Fusions follow :func:`fusions` (all off without a GPU). The loss is summed per token and
    normalised by the global count of valid tokens (``calculate_per_token_loss``).
    FP8 (``fp8_format``, Transformer Engine layers only): megatron wraps each layer's forward in
    TE's FP8 autocast (``fp8_utils.get_fp8_context``); ``fp8_param`` also builds the layers under
    TE's FP8 model-init context (FP8-only weights); ``tp_only_amax_red`` reduces FP8 amaxes
    over the (global, student) TP group instead of TP x DP.
    ``host_init``: initialise weights on the CPU (``use_cpu_initialization``); default: only
    without a GPU. Tools that build a whole model in one process (export) pass True.
    ``recompute``: the activation recomputation fields (:func:`recompute_fields`).
    ``packed``: the model is fed block-diagonal attention masks (packed SFT sequences):
    megatron's fused softmax is off, because for causal attention its kernel
    (``ScaledUpperTriangMaskedSoftmax``) applies its own causal mask and ignores the given one;
    the unfused softmax uses the given mask.
    ``ep``/``etp``: the expert layout of an MoE model (:func:`moe_fields`).
    """
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if bf16 else torch.float32
    fused = fusions(model, on_gpu, fused_kernels())
    if packed:
        fused["masked_softmax_fusion"] = False
    return TransformerConfig(
        **shape_fields(model),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        calculate_per_token_loss=True,
        # gloo pairs p2p sends/receives in posting order: batched p2p is wrong at PP=2 with VPP.
        batch_p2p_comm=on_gpu,
        # megatron's default syncs the whole device after every batched p2p transfer, a
        # workaround for PyTorch releases before the ones setup.cfg admits (torch >= 2.4).
        batch_p2p_sync=False,
        deallocate_pipeline_outputs=True,
        **fused,
        use_cpu_initialization=not on_gpu if host_init is None else host_init,
        fp8=fp8_format,
        fp8_recipe=fp8_recipe,
        fp8_param=fp8_param and fp8_format is not None,
        tp_only_amax_red=tp_only_amax_red,
        **(recompute or {}),
        **moe_fields(model, ep, etp),
    )


def recompute_fields(tr: TrainingConfig) -> dict[str, Any]:
    """``TransformerConfig``'s activation-recomputation fields, as Megatron-LM sets them."""
    return {
        "recompute_granularity": tr.recompute_granularity,
        "recompute_method": tr.recompute_method,
        "recompute_num_layers": tr.recompute_num_layers,
        "recompute_modules": list(tr.recompute_modules) if tr.recompute_modules else None,
    }


def student_transformer_config(cfg: SaltConfig) -> TransformerConfig:
    """The student's ``TransformerConfig`` under the run's parallel layout."""
    par: ParallelConfig = cfg.parallel
    return transformer_config(
        cfg.model,
        tp=par.tensor_model_parallel_size,
        pp=par.pipeline_model_parallel_size,
        vpp=par.virtual_pipeline_model_parallel_size,
        ep=par.expert_model_parallel_size,
        etp=par.expert_tensor_parallel_size,
        sequence_parallel=par.sequence_parallel,
        bf16=cfg.training.bf16,
        fp8_format=cfg.training.fp8_format,
        fp8_recipe=cfg.training.fp8_recipe,
        recompute=recompute_fields(cfg.training),
        packed=cfg.sft.sft,
    )


def teacher_fp8_recipe(recipe: str) -> str:
    """The FP8 recipe of the frozen teacher's FP8-only weights, given the run's ``--fp8-recipe``.

    Under ``delayed`` scaling a weight is quantised with the scale its amax *history* gave, which
    starts at 1.0 and is only updated by forward passes under autocast: loading a bf16
    checkpoint into FP8-only weights quantises them at scale 1.0, where E4M3's smallest step
    (2**-9) flushes most of a small weight's values (std ~3e-3) to zero, and the teacher never
    re-quantises (it takes no optimizer step). Every other recipe computes scales from the
    tensor itself, so ``delayed`` becomes ``tensorwise`` (per-tensor current scaling, TE >= 2.2)
    for the teacher; the student keeps its recipe.
    """
    return "tensorwise" if recipe == "delayed" else recipe


def teacher_transformer_config(cfg: SaltConfig, model: ModelConfig) -> TransformerConfig:
    """The frozen teacher's config: its own TP, PP = 1, no dropout, FP8-only weights under FP8.

    An MoE teacher keeps every expert on each rank (EP 1), split over its TP group like its dense
    layers (expert TP = teacher TP): its forward is frozen inference, so its router adds no
    load-balancing loss (megatron computes it only in training mode, with gradients).

    FP8 weights use :func:`teacher_fp8_recipe`. Amax reductions (of activations, under current
    scaling only where a tensor is split across ranks) stay inside the teacher's TP group.
    """
    return transformer_config(
        model,
        tp=cfg.parallel.teacher_tensor_model_parallel_size,
        bf16=cfg.training.bf16,
        fp8_format=cfg.training.fp8_format,
        fp8_recipe=teacher_fp8_recipe(cfg.training.fp8_recipe),
        fp8_param=True,
        tp_only_amax_red=True,
    )


def ddp_config(cfg: SaltConfig) -> DistributedDataParallelConfig:
    """megatron-core's DDP config: bucketed float32 (or bf16) gradient reduction, optional overlap
    of the reduction with backward and of the distributed optimizer's all-gather with forward."""
    par = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=not par.grad_reduce_in_bf16,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        align_param_gather=par.align_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        bucket_size=par.ddp_bucket_size,
        check_for_nan_in_grad=False,
    )


def optimizer_config(cfg: SaltConfig) -> OptimizerConfig:
    """megatron-core's optimizer config: Adam(W) with our hyper-parameters."""
    opt = cfg.optim
    return OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=cfg.training.bf16,
        params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
