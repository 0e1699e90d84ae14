"""Pieces shared by the dense (:mod:`.kd_cross_entropy`) and sparse (:mod:`.sparse_kd`) losses.

Both compute ``(1 - w) CE + w c KD`` per token on vocab-parallel student logits, write the
gradient in forward, and scale it by the upstream gradient in backward; they share the label
and mask bookkeeping, the per-token statistics type and that backward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from salt_megatron.loss.torch_kd import scale_rows_

MAX_STATS_RANKS = 24
"""Largest TP group whose top-1 agreement bits (``2**rank``) are exact in a float32 sum."""
CPU_CHUNK_ELEMS = 1 << 18
"""Row-chunk elements per intra-op thread on CPU: each thread's share of a float32 scratch buffer
stays about 1 MiB (cache-resident), and a chunk has one parallel region per op, so more threads
mean larger chunks and fewer regions (each ends at a barrier that a busy core makes wait)."""
GPU_CHUNK_ELEMS = 1 << 26


class KDStats(NamedTuple):
    """Per-token float32 statistics (leading shape, multiplied by ``loss_mask``; no gradient).

    ``kd``: raw KD term (no weight, no T^2); ``ce``: CE term (0 for ignored labels);
    ``top1_agree``: 1.0 where the full-vocabulary first argmax of student and teacher agree;
    ``kd_on``: 1.0 where the KD term applies (everywhere without a KD gate, see
    :mod:`salt_megatron.loss.gate`).
    """

    kd: torch.Tensor
    ce: torch.Tensor
    top1_agree: torch.Tensor
    kd_on: torch.Tensor


class TokenWeights(NamedTuple):
    """Per-token label bookkeeping of one ``[N]`` row set (every tensor ``[N]``).

    ``valid``: label != ignore index; ``ylocal``: int64 local label column, -1 where the label
    is ignored or on another shard; ``sy``: float32 label logit on its shard, else 0;
    ``keep``/``kd_keep``: float weights of the CE / KD terms (mask and valid label / mask only);
    ``ace``/``akd``: the gradient weights ``(1 - w) keep`` and ``w c kd_keep / T``, or
    ``(1 - w on) keep`` and ``w c on kd_keep / T`` with a KD gate ``on`` (float 0/1, else None).
    """

    valid: torch.Tensor
    ylocal: torch.Tensor
    sy: torch.Tensor
    keep: torch.Tensor
    kd_keep: torch.Tensor
    ace: torch.Tensor
    akd: torch.Tensor
    on: torch.Tensor | None = None


def token_weights(
    s_nv: torch.Tensor,
    labels_n: torch.Tensor,
    mask_n: torch.Tensor | None,
    vocab_start: int,
    ignore_index: int,
    kd_weight: float,
    kd_coef: float,
) -> TokenWeights:
    """Labels and mask of ``[N]`` tokens on the shard ``s_nv`` (``[N, Vl]``, starting at
    global column ``vocab_start``); ``kd_coef`` is ``c / T``."""
    width = s_nv.shape[1]
    valid_n = labels_n != ignore_index
    ycol_n = labels_n - vocab_start
    ylocal_n = torch.where(valid_n & (ycol_n >= 0) & (ycol_n < width), ycol_n, -1)
    sy_n = label_logit(s_nv, ylocal_n)
    keep_n = valid_n.float() if mask_n is None else valid_n * mask_n
    kd_keep_n = torch.ones_like(sy_n) if mask_n is None else mask_n.float()
    return TokenWeights(
        valid=valid_n,
        ylocal=ylocal_n,
        sy=sy_n,
        keep=keep_n,
        kd_keep=kd_keep_n,
        ace=(1.0 - kd_weight) * keep_n,
        akd=(kd_weight * kd_coef) * kd_keep_n,
    )


def label_logit(x_nv: torch.Tensor, ylocal_n: torch.Tensor) -> torch.Tensor:
    """Float32 ``[N]``: ``x_nv`` (``[N, Vl]``) at the local label column, 0 where it is -1."""
    x_n = x_nv.gather(1, ylocal_n.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    return x_n * (ylocal_n >= 0)


def group_rank_world(tp_group: Any) -> tuple[int, int]:
    """``(rank, size)`` in ``tp_group``; ``(0, 1)`` for None."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def check_call(
    student_logits: torch.Tensor,
    kd_weight: float,
    temperature: float,
    inplace_grad: bool,
    return_stats: bool,
    tp_group: Any,
) -> tuple[int, int]:
    """The argument checks both losses share; returns ``(rank, size)`` of ``tp_group``."""
    if not 0.0 <= kd_weight <= 1.0 or temperature <= 0.0:
        raise ValueError(
            f"need 0 <= kd_weight <= 1 and temperature > 0, got {kd_weight}, {temperature}"
        )
    if inplace_grad and not student_logits.is_contiguous():
        raise ValueError("inplace_grad=True needs contiguous student logits")
    rank, world = group_rank_world(tp_group)
    if return_stats and world > MAX_STATS_RANKS:
        raise ValueError(f"return_stats supports TP groups of at most {MAX_STATS_RANKS} ranks")
    return rank, world


def with_leading_shape(
    outs: tuple[torch.Tensor, ...], leading: torch.Size, return_stats: bool
) -> torch.Tensor | tuple[torch.Tensor, KDStats]:
    """The losses' return value from the autograd function's flat ``[N]`` outputs."""
    loss = outs[0].view(leading)
    if not return_stats:
        return loss
    return loss, KDStats(*(x.view(leading) for x in outs[1:]))


def chunk_elems(device: torch.device) -> int:
    """Elements per row chunk of the PyTorch sweeps on ``device``."""
    if device.type != "cpu":
        return GPU_CHUNK_ELEMS
    return CPU_CHUNK_ELEMS * max(1, min(torch.get_num_threads(), 8))


class GradInForward(torch.autograd.Function):
    """Base of the losses whose forward writes the gradient for a unit upstream gradient.

    The forward ends with :meth:`finish`, which saves that gradient; the backward scales its
    rows by the upstream gradient in place, once.
    """

    @staticmethod
    def finish(
        ctx: Any,
        tok: TokenWeights,
        grad_nv: torch.Tensor,
        kd_n: torch.Tensor,
        ce_n: torch.Tensor,
        agree_n: torch.Tensor | None,
        kd_weight: float,
        kd_scale: float,
        chunk_elems: int,
        n_inputs: int,
    ) -> tuple[torch.Tensor, ...]:
        """The forward's outputs: the per-token loss from the raw KD and CE terms (``ce_n``
        unmasked; ignored labels are zeroed here; a gate ``tok.on`` makes the weight ``w on``),
        and the masked :class:`KDStats` fields when ``agree_n`` is given. ``n_inputs``: the
        number of the forward's inputs."""
        ce_n = torch.where(tok.valid, ce_n, 0.0)
        w: float | torch.Tensor = kd_weight if tok.on is None else kd_weight * tok.on
        loss_n = (1.0 - w) * ce_n * tok.keep + (w * kd_scale) * kd_n * tok.kd_keep
        ctx.save_for_backward(grad_nv)
        ctx.chunk_elems, ctx.n_inputs = chunk_elems, n_inputs
        if agree_n is None:
            return (loss_n,)
        on_n = tok.kd_keep * (1.0 if tok.on is None else tok.on)
        stats = (kd_n * tok.kd_keep, ce_n * tok.kd_keep, agree_n * tok.kd_keep, on_n)
        ctx.mark_non_differentiable(*stats)
        return (loss_n, *stats)

    @staticmethod
    def backward(ctx: Any, grad_loss_n: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "KD loss: backward ran twice; the gradient saved in forward is scaled "
                "in place by the first backward (retain_graph is not supported)"
            )
        ctx.consumed = True
        (grad_nv,) = ctx.saved_tensors
        scale_rows_(grad_nv, grad_loss_n, ctx.chunk_elems)
        return (grad_nv,) + (None,) * (ctx.n_inputs - 1)
