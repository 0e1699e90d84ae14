"""megatron-core optimizer (Adam, optionally distributed) and its warm-up + decay LR schedule."""

from __future__ import annotations

import math

from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import nn

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import SaltConfig


def build_optimizer(cfg: SaltConfig, model: list[nn.Module]) -> MegatronOptimizer:
    """Adam(W) over the DDP-wrapped chunks; sharded over DP with --use-distributed-optimizer."""
    return get_megatron_optimizer(mcfg.optimizer_config(cfg), model)  # type: ignore[arg-type]


def build_scheduler(cfg: SaltConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Linear warm-up to --lr, then cosine/linear/constant/WSD decay to --min-lr, per step.

    The schedule counts optimizer steps, also across a batch-size ramp-up (Megatron-LM allows a
    ramp-up only with sample-based training, where the schedule counts samples): the LR reaches
    --min-lr at --lr-decay-iters whatever the batch sizes were.
    """
    opt = cfg.optim
    decay_iters = opt.lr_decay_iters or cfg.training.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, opt.lr_warmup_iters + 1),
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        wsd_decay_steps=opt.lr_wsd_decay_iters,
        lr_wsd_decay_style=opt.lr_wsd_decay_style,
    )


def guarded_step(optimizer: MegatronOptimizer, clip_grad: float) -> tuple[bool, float]:
    """One optimizer step that refuses a non-finite gradient norm.

    Like megatron's ``step()`` (prepare grads, global norm, clip, update), but the norm is checked
    before any weight changes. Returns ``(updated, grad_norm)``; on a non-finite norm the weights
    and optimizer state are untouched.
    """
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0.0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    return True, grad_norm
