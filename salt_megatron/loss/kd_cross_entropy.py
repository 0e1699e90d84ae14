"""Vocab-parallel SALT loss: ``(1 - w) * CE(s, y) + w * KD(s, t)`` per token, fused.

Definitions (per token; ``s``/``t`` student/teacher logits over the full vocabulary V)::

    p = softmax(s / T),  q = softmax(t / T)
    KD(s, t) = -sum_v q_v log p_v                (soft-target cross-entropy = KL(q||p) + H(q))
    CE(s, y) = logsumexp(s) - s_y                (always at T = 1)
    loss     = mask * ((1 - w) * CE * [y != ignore] + w * c * KD),   c = T^2 if t2_scaling else 1
    d loss / d s_v = mask * ((1 - w) [y != ignore] (softmax(s)_v - [v == y]) + w c / T (p_v - q_v))

Masking: ``loss_mask == 0`` zeroes loss, gradient and statistics of the token. An ignored label
(``ignore_index``) zeroes the CE term and its gradient only: the KD term needs no label and still
trains the token (pass a ``loss_mask`` to drop it entirely). No gradient flows to the teacher.

Parallelism: each rank of ``tp_group`` holds the contiguous vocabulary columns
``[rank * Vl, (rank + 1) * Vl)`` of both models. The forward runs one local sweep that computes
per-row maxima and partial sums relative to the *local* maxima, then exactly two collectives:

1. ``all_reduce(MAX)`` of ``[max s, max t]`` per row,
2. ``all_reduce(SUM)`` of the partial sums rescaled to the global maxima (``exp(m_local - M)``):
   ``[Z_s(T), Z_t(T), sum e^{(t-Mt)/T} (s-Ms)/T, s_y, Z_s(1) if T != 1, top-1 bits if stats]``.

Shards must be equally wide: :func:`check_shard_widths` checks it once, at set-up (a check per
call would read a device value on the host every micro-batch). The forward reads nothing back
to the host: no ``.item()``, no synchronisation.

After the second collective the forward writes the full gradient (for a unit upstream gradient)
chunk-wise into a buffer of the student's dtype, recomputing the exponentials from the logits
and the ``O(tokens)`` row statistics (no communication); without TP the statistics and the
gradient come from one fused sweep (:func:`salt_megatron.loss.torch_kd.fused_stats_grad`), so
nothing is computed twice. The backward only scales each row by the upstream gradient, in place
(no collective, no exponential; it may run once: ``retain_graph`` double backward is refused).
Memory consequence: the only logits-sized allocation is that gradient buffer (none with
``inplace_grad``, which writes it over the student logits *during forward*); the loss keeps no
reference to the logits after forward, so the caller may free the teacher shard right away.
Recomputing the gradient in backward instead would cost the exponentials twice without TP and
keep both shards alive until backward.

Top-1 agreement without gathering: bit ``2**rank`` is set in a SUM slot where the rank's local
max equals the global max (one slot per model, plus one where both hold and the local first
argmaxes coincide). The lowest set bit is the rank of the first global argmax (ties -> lowest
vocabulary index), so agreement = same lowest bit for both models and that bit set in the third
slot. Exact for groups of up to 24 ranks (float32 integers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, NamedTuple, overload

import torch
import torch.distributed as dist

from salt_megatron.loss import torch_kd
from salt_megatron.loss.torch_kd import scale_rows_

_MAX_STATS_RANKS = 24
_CPU_CHUNK_ELEMS = 1 << 18
_GPU_CHUNK_ELEMS = 1 << 26


class KDStats(NamedTuple):
    """Per-token float32 statistics (leading shape, multiplied by ``loss_mask``; no gradient).

    ``kd``: raw KD term (no weight, no T^2); ``ce``: CE term (0 for ignored labels);
    ``top1_agree``: 1.0 where the full-vocabulary first argmax of student and teacher agree.
    """

    kd: torch.Tensor
    ce: torch.Tensor
    top1_agree: torch.Tensor


@dataclass(frozen=True)
class _Config:
    kd_weight: float
    temperature: float
    kd_scale: float  # c = T^2 with t2_scaling, else 1
    group: Any
    rank: int
    world: int
    vocab_start: int
    ignore_index: int
    need_stats: bool
    inplace_grad: bool
    backend: ModuleType
    chunk_elems: int


def _select_backend(impl: str, device: torch.device) -> ModuleType:
    if impl == "torch":
        return torch_kd
    if impl not in ("auto", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto" and device.type != "cuda":
        return torch_kd
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "impl='triton' on CPU needs TRITON_INTERPRET=1 set before importing triton"
        )
    try:
        from salt_megatron.loss import triton_kd
    except ImportError:
        if impl == "triton":
            raise
        return torch_kd
    return triton_kd


def _merge_row_stats(
    local: torch_kd.LocalRowStats, sy_n: torch.Tensor, cfg: _Config, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge per-shard statistics with the two collectives.

    Returns ``max_2n`` (global ``[Ms, Mt]``), ``sum_kn`` (global ``[Zs, Zt, Ats, Sy, Z1]`` each
    ``[N]``, float32) and the ``[N]`` top-1 agreement (float 0/1) or None.
    """
    inv_t = 1.0 / cfg.temperature
    if cfg.world == 1:
        sums_kn = torch.stack([local.zs_n, local.zt_n, local.ats_n, sy_n, local.z1_n])
        agree_n = None
        if cfg.need_stats:
            agree_n = torch.eq(local.sarg_n, local.targ_n).float()  # type: ignore[arg-type]
        return torch.stack([local.smax_n, local.tmax_n]), sums_kn, agree_n
    n_rows = sy_n.numel()
    max_m = torch.cat([local.smax_n, local.tmax_n])
    dist.all_reduce(max_m, op=dist.ReduceOp.MAX, group=cfg.group)  # collective 1 of 2
    smax_n, tmax_n = max_m[:n_rows], max_m[n_rows : 2 * n_rows]
    dsmax_n = local.smax_n - smax_n
    alpha_s_n = torch.exp(dsmax_n * inv_t)
    alpha_t_n = torch.exp((local.tmax_n - tmax_n) * inv_t)
    parts = [
        local.zs_n * alpha_s_n,
        local.zt_n * alpha_t_n,
        alpha_t_n * (local.ats_n + local.zt_n * dsmax_n * inv_t),
        sy_n,
    ]
    if cfg.temperature != 1.0:
        parts.append(local.z1_n * torch.exp(dsmax_n))
    if cfg.need_stats:
        bit = float(2**cfg.rank)
        s_top_n = torch.eq(local.smax_n, smax_n)
        t_top_n = torch.eq(local.tmax_n, tmax_n)
        both_n = s_top_n & t_top_n & torch.eq(local.sarg_n, local.targ_n)  # type: ignore[arg-type]
        parts += [s_top_n.float() * bit, t_top_n.float() * bit, both_n.float() * bit]
    sum_kn = torch.stack(parts)
    dist.all_reduce(sum_kn, op=dist.ReduceOp.SUM, group=cfg.group)  # collective 2 of 2
    agree_n = None
    if cfg.need_stats:
        bits_3n = sum_kn[-3:].round().long()
        low_s_n = bits_3n[0] & -bits_3n[0]
        low_t_n = bits_3n[1] & -bits_3n[1]
        agree_n = ((low_s_n == low_t_n) & ((bits_3n[2] & low_s_n) != 0)).float()
        sum_kn = sum_kn[:-3]
    if cfg.temperature == 1.0:
        sum_kn = torch.cat([sum_kn, sum_kn[:1]])
    return torch.stack([smax_n, tmax_n]), sum_kn, agree_n


def _local_stats_and_grad(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    grad_nv: torch.Tensor,
    ylocal_n: torch.Tensor,
    ace_n: torch.Tensor,
    akd_n: torch.Tensor,
    sy_n: torch.Tensor,
    cfg: _Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row statistics (both collectives) and the gradient written into ``grad_nv`` (``[N, Vl]``).

    ``ace_n``/``akd_n``: float32 ``[N]`` CE / KD gradient weights (``(1-w) keep``,
    ``w c keep_kd / T``). Returns :func:`_merge_row_stats`'s ``(max_2n, sum_kn, agree_n)``.
    Without TP the backend may do it in one fused sweep (``fused_stats_grad``).
    """
    width = s_nv.shape[1]
    temp, chunk = cfg.temperature, cfg.chunk_elems
    fused = getattr(cfg.backend, "fused_stats_grad", None)
    if cfg.world == 1 and fused is not None:
        local = fused(s_nv, t_nv, grad_nv, ylocal_n, ace_n, akd_n, temp, cfg.need_stats, chunk)
        return _merge_row_stats(local, sy_n, cfg, width)
    local = cfg.backend.local_row_stats(s_nv, t_nv, temp, cfg.need_stats, chunk)
    max_2n, sum_kn, agree_n = _merge_row_stats(local, sy_n, cfg, width)
    zs_n, zt_n, _, _, z1_n = sum_kn
    coef_kn = torch.stack([max_2n[0], max_2n[1], akd_n / zs_n, ace_n / z1_n, akd_n / zt_n, ace_n])
    cfg.backend.write_grad(s_nv, t_nv, grad_nv, coef_kn, ylocal_n, temp, chunk)
    return max_2n, sum_kn, agree_n


class _KDCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_nv: torch.Tensor,
        t_nv: torch.Tensor,
        labels_n: torch.Tensor,
        mask_n: torch.Tensor | None,
        cfg: _Config,
    ) -> tuple[torch.Tensor, ...]:
        width = s_nv.shape[1]
        valid_n = labels_n != cfg.ignore_index
        ycol_n = labels_n - cfg.vocab_start
        ylocal_n = torch.where(valid_n & (ycol_n >= 0) & (ycol_n < width), ycol_n, -1)
        sy_n = s_nv.gather(1, ylocal_n.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
        sy_n = sy_n * (ylocal_n >= 0)
        w, c = cfg.kd_weight, cfg.kd_scale
        keep_n = valid_n.float() if mask_n is None else valid_n * mask_n
        kd_keep_n = torch.ones_like(sy_n) if mask_n is None else mask_n.float()
        ace_n = (1.0 - w) * keep_n
        akd_n = (w * c / cfg.temperature) * kd_keep_n
        grad_nv = s_nv if cfg.inplace_grad else torch.empty_like(s_nv)
        max_2n, sum_kn, agree_n = _local_stats_and_grad(
            s_nv, t_nv, grad_nv, ylocal_n, ace_n, akd_n, sy_n, cfg
        )
        zs_n, zt_n, ats_n, sy_n, z1_n = sum_kn
        kd_n = torch.log(zs_n) - ats_n / zt_n
        ce_n = torch.where(valid_n, torch.log(z1_n) + max_2n[0] - sy_n, 0.0)
        loss_n = (1.0 - w) * ce_n * keep_n + (w * c) * kd_n * kd_keep_n
        ctx.save_for_backward(grad_nv)
        ctx.cfg = cfg
        ctx.consumed = False
        if not cfg.need_stats:
            return (loss_n,)
        assert agree_n is not None
        stats = (kd_n * kd_keep_n, ce_n * kd_keep_n, agree_n * kd_keep_n)
        ctx.mark_non_differentiable(*stats)
        return (loss_n, *stats)

    @staticmethod
    def backward(ctx: Any, grad_loss_n: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "kd_cross_entropy: backward ran twice; the gradient saved in forward is scaled "
                "in place by the first backward (retain_graph is not supported)"
            )
        ctx.consumed = True
        (grad_nv,) = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        scale_rows_(grad_nv, grad_loss_n, cfg.chunk_elems)
        return grad_nv, None, None, None, None


def _check_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits shards must have the same shape"
        )
    for name, x in (("student", student_logits), ("teacher", teacher_logits)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} logits must be float32, bfloat16 or float16, got {x.dtype}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the leading logits shape")
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape")


def check_shard_widths(width: int, tp_group: Any, device: torch.device) -> None:
    """Raise ``ValueError`` unless every rank of ``tp_group`` holds ``width`` vocabulary columns.

    Collective over ``tp_group`` (on ``device``, the group's backend device) with a host read:
    call it once when the layout is set up, not per micro-batch. No-op without TP.
    """
    if tp_group is None or dist.get_world_size(group=tp_group) == 1:
        return
    widths = torch.tensor([width, -width], dtype=torch.float64, device=device)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=tp_group)
    high, low = widths.tolist()
    if high != -low:
        raise ValueError(
            f"kd_cross_entropy: vocabulary shards differ in width across the TP group "
            f"(max {high:.0f}, min {-low:.0f}); pad the vocabulary"
        )


def _group_rank_world(tp_group: Any) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


@overload
def kd_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    tp_group: Any = None,
    *,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    return_stats: Literal[False] = False,
    inplace_grad: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor: ...


@overload
def kd_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    tp_group: Any = None,
    *,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    return_stats: Literal[True],
    inplace_grad: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, KDStats]: ...


def kd_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    tp_group: Any = None,
    *,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    inplace_grad: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, KDStats]:
    """Per-token SALT loss on vocab-parallel logits shards (definitions in the module docstring).

    Args:
        student_logits: ``[..., Vl]`` float32/bf16/fp16 shard (this rank's vocabulary columns).
        teacher_logits: ``[..., Vl]`` same shape; treated as constant (no gradient).
        labels: ``[...]`` int64 global vocabulary ids; ``ignore_index`` zeroes the CE term only.
        kd_weight: ``w`` in [0, 1].
        temperature: ``T > 0`` of the KD term (the CE term always uses T = 1).
        tp_group: the tensor-parallel group holding the vocabulary shards; None = no TP.
        t2_scaling: multiply the KD term (loss and gradient) by ``T**2``.
        loss_mask: ``[...]`` 0/1 floats: 0 zeroes loss, gradient and statistics of a token.
        return_stats: also return :class:`KDStats` (per-token, computed in forward).
        inplace_grad: the forward writes the gradient over the student logits buffer (after
            reading them for the loss and statistics) and the backward scales and returns it:
            the logits are destroyed when this call returns; read anything else you need from
            them (metrics) before calling. Needs contiguous logits.
        vocab_start_index: first global column of this shard; default ``rank * Vl``.
        impl: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"`` (on CPU
            only under ``TRITON_INTERPRET=1``, for tests).

    Returns:
        float32 per-token loss ``[...]`` (no reduction over tokens); with ``return_stats``,
        ``(loss, KDStats)``. Forward: two all-reduces on ``tp_group`` (none without TP);
        backward: none (a per-row in-place scale of the gradient saved in forward).
        Non-contiguous logits are copied to contiguous memory first.
    """
    _check_inputs(student_logits, teacher_logits, labels, loss_mask)
    if not 0.0 <= kd_weight <= 1.0 or temperature <= 0.0:
        raise ValueError(
            f"need 0 <= kd_weight <= 1 and temperature > 0, got {kd_weight}, {temperature}"
        )
    if inplace_grad and not student_logits.is_contiguous():
        raise ValueError("inplace_grad=True needs contiguous student logits")
    rank, world = _group_rank_world(tp_group)
    if return_stats and world > _MAX_STATS_RANKS:
        raise ValueError(f"return_stats supports TP groups of at most {_MAX_STATS_RANKS} ranks")
    width = student_logits.shape[-1]
    leading = labels.shape
    cfg = _Config(
        kd_weight=float(kd_weight),
        temperature=float(temperature),
        kd_scale=float(temperature) ** 2 if t2_scaling else 1.0,
        group=tp_group,
        rank=rank,
        world=world,
        vocab_start=rank * width if vocab_start_index is None else int(vocab_start_index),
        ignore_index=ignore_index,
        need_stats=return_stats,
        inplace_grad=inplace_grad,
        backend=_select_backend(impl, student_logits.device),
        chunk_elems=_CPU_CHUNK_ELEMS if student_logits.device.type == "cpu" else _GPU_CHUNK_ELEMS,
    )
    s_nv = student_logits.contiguous().view(-1, width)
    t_nv = teacher_logits.detach().contiguous().view(-1, width)
    mask_n = None if loss_mask is None else loss_mask.reshape(-1).float()
    outs = _KDCrossEntropy.apply(s_nv, t_nv, labels.reshape(-1), mask_n, cfg)
    loss = outs[0].view(leading)
    if not return_stats:
        return loss
    return loss, KDStats(*(x.view(leading) for x in outs[1:]))
