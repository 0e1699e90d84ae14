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
   ``[Z_s(T), Z_t(T), sum e^{(t-Mt)/T} (s-Ms)/T, s_y, Z_s(1) if T != 1, t_y if a label-loss
   gate, top-1 bits if stats]``.

Token-level KD gate (``gate``, :mod:`salt_megatron.loss.gate`): per row, ``on`` in {0, 1} from the
teacher's top-1 probability ``1 / Z_t`` or its label loss ``log Z_t - (t_y - Mt) / T``, known
after the second collective; the loss becomes ``(1 - w on) CE + w c on KD`` and only the
per-row gradient weights change (without TP the fused sweep decides per row chunk).

Shards must be equally wide: :func:`check_shard_widths` checks it once, at set-up (a check per
call would read a device value on the host every micro-batch). The forward reads nothing back
to the host: no ``.item()``, no synchronisation.

The forward writes the full gradient (for a unit upstream gradient) chunk-wise into a buffer of
the student's dtype, computing every exponential once (no communication after the second
collective): without TP the statistics and the gradient come from one fused sweep
(:func:`salt_megatron.loss.torch_kd.fused_stats_grad`); with TP the statistics sweep leaves its
exponentials (relative to the shard's maxima) in the gradient buffer and in the teacher's buffer
(``teacher_scratch``; else a new one), and a second sweep rescales them in place to the global
maxima (:func:`salt_megatron.loss.torch_kd.grad_from_exps`). On GPUs the Triton backend
recomputes them instead (extra reads are cheaper there than extra writes). The backward only
scales each row by the upstream gradient, in place (no collective, no exponential; it may run
once: ``retain_graph`` double backward is refused). Memory consequence: the only logits-sized
allocation is that gradient buffer (none with ``inplace_grad``, which writes it over the student
logits *during forward*), plus one teacher-sized buffer with TP unless ``teacher_scratch``; the
loss keeps no reference to the logits after forward, so the caller may free the teacher shard
right away. Recomputing the gradient in backward instead would keep both shards alive until
backward.

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
from typing import Any, Literal, overload

import torch
import torch.distributed as dist

from salt_megatron.loss import torch_kd
from salt_megatron.loss.common import (
    GradInForward,
    KDStats,
    TokenWeights,
    check_call,
    chunk_elems,
    label_logit,
    token_weights,
    with_leading_shape,
)
from salt_megatron.loss.gate import KDGate, dense_teacher_logq, gate_tokens, gated_weights


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
    teacher_scratch: bool
    backend: ModuleType
    chunk_elems: int
    gate: KDGate | None


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
    local: torch_kd.LocalRowStats, sy_n: torch.Tensor, ty_n: torch.Tensor | None, cfg: _Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge per-shard statistics with the two collectives.

    Returns ``max_2n`` (global ``[Ms, Mt]``), ``sum_kn`` (global ``[Zs, Zt, Ats, Sy, Z1]``, and
    the teacher's label logit ``Ty`` as a sixth row when ``ty_n`` is given (the KD gate's);
    each ``[N]``, float32) and the ``[N]`` top-1 agreement (float 0/1) or None.
    """
    inv_t = 1.0 / cfg.temperature
    extra = [] if ty_n is None else [ty_n]
    if cfg.world == 1:
        sums_kn = torch.stack([local.zs_n, local.zt_n, local.ats_n, sy_n, local.z1_n, *extra])
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
    parts += extra  # the teacher's label logit rides in the same buffer
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
    if cfg.temperature == 1.0:  # Z1 = Zs
        sum_kn = torch.cat([sum_kn[:4], sum_kn[:1], sum_kn[4:]])
    return torch.stack([smax_n, tmax_n]), sum_kn, agree_n


def _gate(
    tok: TokenWeights, max_2n: torch.Tensor, sum_kn: torch.Tensor, cfg: _Config
) -> TokenWeights:
    """``tok`` with ``cfg.gate`` applied from the merged statistics (``tok`` without a gate)."""
    if cfg.gate is None:
        return tok
    ty_n = sum_kn[5] if cfg.gate.needs_label else None
    top1_n, label_n = dense_teacher_logq(max_2n[1], sum_kn[1], ty_n, cfg.temperature)
    return gate_tokens(tok, cfg.gate.on(top1_n, label_n, tok.valid), cfg.kd_weight)


def _fused_sweep(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    grad_nv: torch.Tensor,
    tok: TokenWeights,
    ty_n: torch.Tensor | None,
    cfg: _Config,
) -> tuple[torch_kd.LocalRowStats, TokenWeights]:
    """Without TP: statistics and gradient in one sweep (``fused_stats_grad``). A gate decides
    per row chunk, from the chunk's teacher statistics (final: the row is whole), before the
    chunk's gradient is written. Returns the statistics and the (gated) token weights."""
    temp, gate, w = cfg.temperature, cfg.gate, cfg.kd_weight
    fused = cfg.backend.fused_stats_grad
    args = (s_nv, t_nv, grad_nv, tok.ylocal, tok.ace, tok.akd, temp, cfg.need_stats)
    if gate is None:
        return fused(*args, cfg.chunk_elems), tok
    on_n = torch.empty_like(tok.keep)

    def weights(rows: slice, tmax_c: torch.Tensor, zt_c: torch.Tensor) -> torch_kd.Pair:
        ty_c = None if ty_n is None else ty_n[rows]
        on_c = gate.on(*dense_teacher_logq(tmax_c, zt_c, ty_c, temp), tok.valid[rows])
        on_n[rows] = on_c
        return gated_weights(tok.keep[rows], tok.akd[rows], on_c, w)

    local = fused(*args, cfg.chunk_elems, weights)
    return local, gate_tokens(tok, on_n, w)


def _local_stats_and_grad(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    grad_nv: torch.Tensor,
    tok: TokenWeights,
    ty_n: torch.Tensor | None,
    cfg: _Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, TokenWeights]:
    """Row statistics (both collectives) and the gradient written into ``grad_nv`` (``[N, Vl]``).

    ``tok``: the tokens' weights (:func:`~salt_megatron.loss.common.token_weights`); ``ty_n``:
    the teacher's label logit on this shard (0 elsewhere), for a gate that needs it. Returns
    :func:`_merge_row_stats`'s ``(max_2n, sum_kn, agree_n)`` and ``tok`` with the gate applied.
    Without TP the backend may do it in one fused sweep (:func:`_fused_sweep`); with TP the
    PyTorch backend keeps the statistics sweep's exponentials and rescales them
    (``stats_keep_exps``, ``grad_from_exps``), the Triton backend recomputes them
    (``write_grad``: on a GPU the extra reads cost less than the extra writes would). A gate
    only changes the per-row weights ``ace``/``akd`` of the gradient.
    """
    temp, chunk, backend = cfg.temperature, cfg.chunk_elems, cfg.backend
    if cfg.world == 1 and hasattr(backend, "fused_stats_grad"):
        local, tok = _fused_sweep(s_nv, t_nv, grad_nv, tok, ty_n, cfg)
        return *_merge_row_stats(local, tok.sy, ty_n, cfg), tok
    if hasattr(backend, "stats_keep_exps"):
        et_nv = t_nv if cfg.teacher_scratch else torch.empty_like(t_nv)
        local = backend.stats_keep_exps(s_nv, t_nv, grad_nv, et_nv, temp, cfg.need_stats, chunk)
        max_2n, sum_kn, agree_n = _merge_row_stats(local, tok.sy, ty_n, cfg)
        tok = _gate(tok, max_2n, sum_kn, cfg)
        zs_n, zt_n, z1_n, ace_n, akd_n = sum_kn[0], sum_kn[1], sum_kn[4], tok.ace, tok.akd
        ds_n = local.smax_n - max_2n[0]  # <= 0: the shard's maxima against the global ones
        dt_n = local.tmax_n - max_2n[1]
        coef_kn = torch.stack([
            ace_n / z1_n * torch.exp(ds_n), akd_n / zs_n * torch.exp(ds_n / temp),
            akd_n / zt_n * torch.exp(dt_n / temp), ace_n,
        ])  # fmt: skip
        backend.grad_from_exps(grad_nv, et_nv, coef_kn, tok.ylocal, temp, chunk)
        return max_2n, sum_kn, agree_n, tok
    local = backend.local_row_stats(s_nv, t_nv, temp, cfg.need_stats, chunk)
    max_2n, sum_kn, agree_n = _merge_row_stats(local, tok.sy, ty_n, cfg)
    tok = _gate(tok, max_2n, sum_kn, cfg)
    zs_n, zt_n, z1_n, ace_n, akd_n = sum_kn[0], sum_kn[1], sum_kn[4], tok.ace, tok.akd
    coef_kn = torch.stack([max_2n[0], max_2n[1], akd_n / zs_n, ace_n / z1_n, akd_n / zt_n, ace_n])
    backend.write_grad(s_nv, t_nv, grad_nv, coef_kn, tok.ylocal, temp, chunk)
    return max_2n, sum_kn, agree_n, tok


class _KDCrossEntropy(GradInForward):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_nv: torch.Tensor,
        t_nv: torch.Tensor,
        labels_n: torch.Tensor,
        mask_n: torch.Tensor | None,
        cfg: _Config,
    ) -> tuple[torch.Tensor, ...]:
        w, c = cfg.kd_weight, cfg.kd_scale
        tok = token_weights(
            s_nv, labels_n, mask_n, cfg.vocab_start, cfg.ignore_index, w, c / cfg.temperature
        )
        needs_ty = cfg.gate is not None and cfg.gate.needs_label
        ty_n = label_logit(t_nv, tok.ylocal) if needs_ty else None  # before t_nv is scratch
        grad_nv = s_nv if cfg.inplace_grad else torch.empty_like(s_nv)
        max_2n, sum_kn, agree_n, tok = _local_stats_and_grad(s_nv, t_nv, grad_nv, tok, ty_n, cfg)
        zs_n, zt_n, ats_n, sy_n, z1_n = sum_kn[:5]
        kd_n = torch.log(zs_n) - ats_n / zt_n
        ce_n = torch.log(z1_n) + max_2n[0] - sy_n
        return GradInForward.finish(
            ctx, tok, grad_nv, kd_n, ce_n, agree_n, w, c, cfg.chunk_elems, n_inputs=5
        )


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
    teacher_scratch: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    gate: KDGate | None = None,
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
    teacher_scratch: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    gate: KDGate | None = None,
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
    teacher_scratch: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    gate: KDGate | None = None,
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
        teacher_scratch: the teacher logits are a temporary the loss may overwrite (with TP the
            PyTorch path keeps the teacher's exponentials there instead of in a new buffer of
            the shard's size); their values are undefined after the call.
        vocab_start_index: first global column of this shard; default ``rank * Vl``.
        impl: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"`` (on CPU
            only under ``TRITON_INTERPRET=1``, for tests).
        gate: a token-level KD gate (:class:`~salt_megatron.loss.gate.KDGate`): the KD term
            applies only where the teacher passes it, other tokens get CE with weight 1. No
            extra collective (a label-loss gate adds one row to the SUM all-reduce).

    Returns:
        float32 per-token loss ``[...]`` (no reduction over tokens); with ``return_stats``,
        ``(loss, KDStats)``. Forward: two all-reduces on ``tp_group`` (none without TP);
        backward: none (a per-row in-place scale of the gradient saved in forward).
        Non-contiguous logits are copied to contiguous memory first.
    """
    _check_inputs(student_logits, teacher_logits, labels, loss_mask)
    rank, world = check_call(
        student_logits, kd_weight, temperature, inplace_grad, return_stats, tp_group
    )
    width = student_logits.shape[-1]
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
        teacher_scratch=teacher_scratch,
        backend=_select_backend(impl, student_logits.device),
        chunk_elems=chunk_elems(student_logits.device),
        gate=gate,
    )
    s_nv = student_logits.contiguous().view(-1, width)
    t_nv = teacher_logits.detach().contiguous().view(-1, width)
    mask_n = None if loss_mask is None else loss_mask.reshape(-1).float()
    outs = _KDCrossEntropy.apply(s_nv, t_nv, labels.reshape(-1), mask_n, cfg)
    return with_leading_shape(outs, labels.shape, return_stats)
