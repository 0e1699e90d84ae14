"""Vocab-parallel SALT loss against sparse teacher targets: ``(1 - w) CE + w c KD_sparse``.

Targets of a token (the offline store's, :mod:`salt_megatron.data.teacher_targets`): up to K
global vocabulary ids ``id_k`` (-1 marks an empty slot; ids are distinct and below the true
vocabulary size V), the teacher's log-probabilities ``log q_k`` at temperature T, and the
residual mass ``r`` (the teacher's probability outside the kept ids). With ``n`` kept ids and
``Q = sum_k q_k`` the target distribution over the vocabulary is::

    residual="drop":     a_k = q_k / Q on the kept ids, 0 elsewhere (the kept mass renormalised)
    residual="uniform":  a_k = q_k on the kept ids, u = r / (V - n) on every other id below V
    W = sum_k a_k + u (V - n)                       (1 up to rounding; 0 for a token without ids)

    p = softmax(s / T) over all student columns (padding included, as in the dense loss)
    KD   = -sum_v target_v log p_v = W log Zs - (1/T) sum_v target_v (s_v - M)
    loss = mask ((1 - w) CE [y != ignore] + w c KD),  c = T^2 if t2_scaling else 1
    d loss / d s_v = mask ((1 - w) [y valid] (softmax(s)_v - [v == y]) + w c / T (W p_v - target_v))

(``Zs = sum_v exp((s_v - M)/T)``, ``M = max_v s_v``). With k = V ids and the residual 0 both
modes equal the dense :func:`salt_megatron.loss.kd_cross_entropy`.

Work per logit: one sweep of the student shard, as megatron's cross-entropy does: upcast, max,
one exponential (a second one only for T not in {1, 2}), sums; no teacher logits at all. Without
TP the same sweep writes the gradient; with TP it leaves ``exp(s - m_local)`` in the gradient
buffer and a second sweep rescales it (no exponential; a square root at T = 2). The sparse terms
are ``O(tokens x K)`` gathers and scatters on the shard that owns each id.

Collectives (TP): ``all_reduce(MAX)`` of the row maxima, then one ``all_reduce(SUM)`` of
``[Zs, Z1 (T != 1), s_y, sum_k a_k (s_k - M), sum_{v < V, v not kept} (s_v - M) (uniform),
top-1 bits (stats)]`` per token; the backward has none. The PyTorch ops run on any device; no
host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import torch
import torch.distributed as dist

from salt_megatron.loss.common import (
    GradInForward,
    KDStats,
    TokenWeights,
    check_call,
    chunk_elems,
    token_weights,
    with_leading_shape,
)
from salt_megatron.loss.gate import KDGate, gate_tokens, sparse_teacher_logq

Residual = Literal["uniform", "drop"]


@dataclass(frozen=True)
class _Config:
    kd_weight: float
    temperature: float
    kd_scale: float
    group: Any
    rank: int
    world: int
    vocab_start: int
    vocab_size: int
    ignore_index: int
    residual: Residual
    need_stats: bool
    inplace_grad: bool
    chunk_elems: int
    gate: KDGate | None


class _Targets(NamedTuple):
    """The target distribution of ``[N]`` tokens on this shard (see the module docstring)."""

    col_nk: torch.Tensor  # int64 local column of each kept id on this shard, -1 elsewhere
    a_nk: torch.Tensor  # float32 target mass a_k of each kept id (0 for empty slots)
    u_n: torch.Tensor  # float32 mass of every other id below V (0 with residual="drop")
    total_n: torch.Tensor  # float32 W
    top_n: torch.Tensor  # int64 the teacher's top-1 id (slot 0), -1 for none


def _targets(
    ids_nk: torch.Tensor, logq_nk: torch.Tensor, resid_n: torch.Tensor, cfg: _Config, width: int
) -> _Targets:
    ids_nk = ids_nk.long()
    present_nk = ids_nk >= 0
    q_nk = torch.where(present_nk, logq_nk.float().exp(), 0.0)
    mass_n = q_nk.sum(-1)
    if cfg.residual == "drop":
        a_nk = q_nk / mass_n.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
        u_n = torch.zeros_like(mass_n)
        total_n = a_nk.sum(-1)
    else:
        rest_n = cfg.vocab_size - present_nk.sum(-1)
        u_n = torch.where(rest_n > 0, resid_n.float() / rest_n.clamp(min=1), 0.0)
        a_nk, total_n = q_nk, mass_n + u_n * rest_n
    col_nk = ids_nk - cfg.vocab_start
    owned_nk = present_nk & (col_nk >= 0) & (col_nk < width)
    return _Targets(torch.where(owned_nk, col_nk, -1), a_nk, u_n, total_n, ids_nk[:, 0])


class _Sums(NamedTuple):
    """Per-row results of the local sweep (``[N]`` float32; ``arg`` int64 or None)."""

    smax: torch.Tensor  # m: this shard's row maximum
    zs: torch.Tensor  # sum_v exp((s - m) / T)
    z1: torch.Tensor  # sum_v exp(s - m)
    rest: torch.Tensor  # sum_{v < V on this shard} (s_v - m)  (uniform only, else 0)
    arg: torch.Tensor | None  # first local argmax


Hook = Callable[[slice, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _sweep(s_nv: torch.Tensor, cfg: _Config, n_true: int, hook: Hook) -> _Sums:
    """One chunked sweep of the shard: maxima, partition sums and ``hook(rows, es, e1, out)``.

    ``es``/``e1`` are float32 scratch ``exp((s - m)/T)`` and ``exp(s - m)`` of the chunk (the
    same tensor at T = 1); ``out[:, rows]`` already holds the chunk's ``m, zs, z1, rest``.
    """
    n_rows, width = s_nv.shape
    temp, inv_t = cfg.temperature, 1.0 / cfg.temperature
    out_kn = torch.zeros(4, n_rows, dtype=torch.float32, device=s_nv.device)
    arg_n = torch.empty(n_rows, dtype=torch.int64, device=s_nv.device) if cfg.need_stats else None
    step = max(1, min(n_rows, cfg.chunk_elems // max(width, 1)))
    bufs = torch.empty(2, step, width, dtype=torch.float32, device=s_nv.device)
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        x_cv = bufs[0, : rows.stop - r0]
        x_cv.copy_(s_nv[rows])
        if arg_n is None:
            m_c1 = x_cv.amax(dim=-1, keepdim=True)
        else:
            m_c, arg_n[rows] = x_cv.max(dim=-1)
            m_c1 = m_c.unsqueeze(-1)
        x_cv.sub_(m_c1)
        if cfg.residual == "uniform":
            out_kn[3, rows] = x_cv[:, :n_true].sum(dim=-1)
        if temp == 1.0:
            es_cv = e1_cv = x_cv.exp_()
        else:
            es_cv = torch.mul(x_cv, inv_t, out=bufs[1, : x_cv.shape[0]]).exp_()
            e1_cv = torch.mul(es_cv, es_cv, out=x_cv) if temp == 2.0 else x_cv.exp_()
        out_kn[0, rows] = m_c1.squeeze(-1)
        out_kn[1, rows] = es_cv.sum(dim=-1)
        out_kn[2, rows] = e1_cv.sum(dim=-1) if temp != 1.0 else out_kn[1, rows]
        hook(rows, es_cv, e1_cv, out_kn)
    return _Sums(out_kn[0], out_kn[1], out_kn[2], out_kn[3], arg_n)


def _combine(
    es_cv: torch.Tensor,
    e1_cv: torch.Tensor,
    coef_3c: torch.Tensor,
    scatter: tuple[torch.Tensor, torch.Tensor],
    n_uniform: int,
    g_cv: torch.Tensor,
) -> None:
    """``g = cs es + c1 e1 - cu [v < n_uniform] + scatter``; ``coef_3c = [cs, c1, cu]``;
    ``scatter = (cols [n, K+1], values [n, K+1])`` added at the columns (-1: none). Overwrites
    the scratch; ``g_cv`` may alias the logits chunk already read into scratch."""
    cs_c1, c1_c1, cu_c1 = (c.unsqueeze(-1) for c in coef_3c)
    if e1_cv is es_cv:
        acc_cv = es_cv.mul_(cs_c1 + c1_c1)
    else:
        acc_cv = es_cv.mul_(cs_c1).addcmul_(e1_cv, c1_c1)
    if n_uniform > 0:
        acc_cv[:, :n_uniform].sub_(cu_c1)
    cols_cj, vals_cj = scatter
    acc_cv.scatter_add_(1, cols_cj.clamp(min=0), vals_cj * (cols_cj >= 0))
    g_cv.copy_(acc_cv)


def _rescale(
    e1_nv: torch.Tensor,
    coef_3n: torch.Tensor,
    scatter: tuple[torch.Tensor, torch.Tensor],
    cfg: _Config,
    n_true: int,
) -> None:
    """The TP gradient sweep: ``e1_nv`` holds ``exp(s - m_local)``; overwrite it with the
    gradient (``coef_3n`` already carries the rescaling to the global maximum)."""
    n_rows, width = e1_nv.shape
    step = max(1, min(n_rows, cfg.chunk_elems // max(width, 1)))
    bufs = torch.empty(2, step, width, dtype=torch.float32, device=e1_nv.device)
    temp = cfg.temperature
    n_uni = n_true if cfg.residual == "uniform" else 0
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        e1_cv = bufs[0, : rows.stop - r0]
        e1_cv.copy_(e1_nv[rows])
        es_cv = e1_cv
        if temp == 2.0:
            es_cv = torch.sqrt(e1_cv, out=bufs[1, : e1_cv.shape[0]])
        elif temp != 1.0:
            es_cv = torch.pow(e1_cv, 1.0 / temp, out=bufs[1, : e1_cv.shape[0]])
        cols, vals = scatter
        _combine(es_cv, e1_cv, coef_3n[:, rows], (cols[rows], vals[rows]), n_uni, e1_nv[rows])


def _merge(
    sums: _Sums,
    tgt: _Targets,
    s_nk: torch.Tensor,
    sy_n: torch.Tensor,
    cfg: _Config,
    n_true: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The two collectives. Returns the global maximum ``M`` ``[N]``, the global sums
    ``[Zs, Z1, s_y, A, R]`` (``[5, N]``, ``A = sum_k a_k (s_k - M)``,
    ``R = sum_{v < V not kept} (s_v - M)``) and the top-1 agreement (float 0/1) or None."""
    big_n = sums.smax.clone()
    if cfg.world > 1:
        dist.all_reduce(big_n, op=dist.ReduceOp.MAX, group=cfg.group)  # collective 1 of 2
    ds_n = sums.smax - big_n  # <= 0
    owned_nk = tgt.col_nk >= 0
    xk_nk = torch.where(owned_nk, s_nk - big_n.unsqueeze(-1), 0.0)
    parts = [
        sums.zs * torch.exp(ds_n / cfg.temperature),
        sums.z1 * torch.exp(ds_n),
        sy_n,
        (tgt.a_nk * xk_nk).sum(-1),
        sums.rest + n_true * ds_n - xk_nk.sum(-1),
    ]
    if cfg.need_stats:
        assert sums.arg is not None
        bit = float(2**cfg.rank)
        first_n = torch.eq(sums.smax, big_n)
        both_n = first_n & torch.eq(sums.arg + cfg.vocab_start, tgt.top_n)
        parts += [first_n.float() * bit, both_n.float() * bit]
    sum_kn = torch.stack(parts)
    if cfg.world > 1:
        dist.all_reduce(sum_kn, op=dist.ReduceOp.SUM, group=cfg.group)  # collective 2 of 2
    agree_n = None
    if cfg.need_stats:
        first_bits_n = sum_kn[5].round().long()
        low_n = first_bits_n & -first_bits_n  # the rank of the first global argmax
        agree_n = ((sum_kn[6].round().long() & low_n) != 0).float()
    return big_n, sum_kn[:5], agree_n


class _SparseKD(GradInForward):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_nv: torch.Tensor,
        ids_nk: torch.Tensor,
        logq_nk: torch.Tensor,
        resid_n: torch.Tensor,
        labels_n: torch.Tensor,
        mask_n: torch.Tensor | None,
        cfg: _Config,
    ) -> tuple[torch.Tensor, ...]:
        width = s_nv.shape[1]
        n_true = min(width, max(0, cfg.vocab_size - cfg.vocab_start))  # local ids below V
        w, c, temp = cfg.kd_weight, cfg.kd_scale, cfg.temperature
        tok = token_weights(s_nv, labels_n, mask_n, cfg.vocab_start, cfg.ignore_index, w, c / temp)
        if cfg.gate is not None:  # local: the targets are on every rank
            logq = sparse_teacher_logq(ids_nk, logq_nk, resid_n, labels_n, cfg.vocab_size)
            tok = gate_tokens(tok, cfg.gate.on(*logq, tok.valid), w)
        tgt = _targets(ids_nk, logq_nk, resid_n, cfg, width)
        s_nk = s_nv.gather(1, tgt.col_nk.clamp(min=0)).float()
        akd_n1 = tok.akd.unsqueeze(-1)
        scatter = (
            torch.cat([tgt.col_nk, tok.ylocal.unsqueeze(-1)], dim=1),
            torch.cat([-akd_n1 * (tgt.a_nk - tgt.u_n.unsqueeze(-1)), -tok.ace.unsqueeze(-1)], 1),
        )
        grad_nv = s_nv if cfg.inplace_grad else torch.empty_like(s_nv)
        sums = _sweep(s_nv, cfg, n_true, _grad_hook(grad_nv, tok, tgt, scatter, cfg, n_true))
        big_n, sum_kn, agree_n = _merge(sums, tgt, s_nk, tok.sy, cfg, n_true)
        zs_n, z1_n, sy_n, a_n, rest_n = sum_kn
        if cfg.world > 1:
            ds_n = sums.smax - big_n
            coef_3n = torch.stack([
                tok.akd * tgt.total_n / zs_n * torch.exp(ds_n / temp),
                tok.ace / z1_n * torch.exp(ds_n), tok.akd * tgt.u_n,
            ])  # fmt: skip
            _rescale(grad_nv, coef_3n, scatter, cfg, n_true)
        kd_n = tgt.total_n * torch.log(zs_n) - (a_n + tgt.u_n * rest_n) / temp
        ce_n = torch.log(z1_n) + big_n - sy_n
        return GradInForward.finish(
            ctx, tok, grad_nv, kd_n, ce_n, agree_n, w, c, cfg.chunk_elems, n_inputs=7
        )


def _grad_hook(
    grad_nv: torch.Tensor,
    tok: TokenWeights,
    tgt: _Targets,
    scatter: tuple[torch.Tensor, torch.Tensor],
    cfg: _Config,
    n_true: int,
) -> Hook:
    """Without TP: the gradient of each chunk from its exponentials (the row sums are final).
    With TP: keep ``exp(s - m_local)`` in the gradient buffer for :func:`_rescale`."""
    if cfg.world > 1:

        def keep(rows: slice, es: torch.Tensor, e1: torch.Tensor, out_kn: torch.Tensor) -> None:
            grad_nv[rows].copy_(e1)

        return keep

    n_uni = n_true if cfg.residual == "uniform" else 0

    def gradient(rows: slice, es: torch.Tensor, e1: torch.Tensor, out_kn: torch.Tensor) -> None:
        coef_3c = torch.stack([
            tok.akd[rows] * tgt.total_n[rows] / out_kn[1, rows], tok.ace[rows] / out_kn[2, rows],
            tok.akd[rows] * tgt.u_n[rows],
        ])  # fmt: skip
        cols, vals = scatter
        _combine(es, e1, coef_3c, (cols[rows], vals[rows]), n_uni, grad_nv[rows])

    return gradient


def _check_inputs(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_residual: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
) -> None:
    lead = student_logits.shape[:-1]
    if student_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"student logits must be float32, bfloat16 or float16, got "
                        f"{student_logits.dtype}")  # fmt: skip
    if target_ids.shape[:-1] != lead or target_logprobs.shape != target_ids.shape:
        raise ValueError(
            f"target ids {tuple(target_ids.shape)} and log-probabilities "
            f"{tuple(target_logprobs.shape)} must be [..., K] with the logits' leading shape "
            f"{tuple(lead)}"
        )
    if target_ids.shape[-1] < 1 or target_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target ids must be int32/int64 with K >= 1, got {target_ids.dtype} "
                         f"{tuple(target_ids.shape)}")  # fmt: skip
    for name, x in (("target_residual", target_residual), ("labels", labels)):
        if x.shape != lead:
            raise ValueError(f"{name} {tuple(x.shape)} must have the leading shape {tuple(lead)}")
    if loss_mask is not None and loss_mask.shape != lead:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape")


@overload
def sparse_kd_cross_entropy(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_residual: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    tp_group: Any = None,
    *,
    residual: Residual = "uniform",
    vocab_size: int | None = None,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    return_stats: Literal[False] = False,
    inplace_grad: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    gate: KDGate | None = None,
) -> torch.Tensor: ...


@overload
def sparse_kd_cross_entropy(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_residual: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    tp_group: Any = None,
    *,
    residual: Residual = "uniform",
    vocab_size: int | None = None,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    return_stats: Literal[True],
    inplace_grad: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    gate: KDGate | None = None,
) -> tuple[torch.Tensor, KDStats]: ...


def sparse_kd_cross_entropy(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_residual: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    tp_group: Any = None,
    *,
    residual: Residual = "uniform",
    vocab_size: int | None = None,
    t2_scaling: bool = False,
    loss_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    inplace_grad: bool = False,
    vocab_start_index: int | None = None,
    ignore_index: int = -100,
    gate: KDGate | None = None,
) -> torch.Tensor | tuple[torch.Tensor, KDStats]:
    """Per-token SALT loss against sparse teacher targets (definitions in the module docstring).

    Args:
        student_logits: ``[..., Vl]`` float32/bf16/fp16 shard (this rank's vocabulary columns).
        target_ids: ``[..., K]`` int32/int64 global ids of the kept teacher tokens, distinct,
            below ``vocab_size``; -1 marks an empty slot. Slot 0 is the teacher's top-1 (for the
            top-1 agreement statistic).
        target_logprobs: ``[..., K]`` the teacher's log-probabilities at ``temperature`` of
            those ids (any float dtype; ignored in empty slots).
        target_residual: ``[...]`` the teacher's probability mass outside the kept ids.
        labels, kd_weight, temperature, tp_group, t2_scaling, loss_mask, inplace_grad,
            vocab_start_index, ignore_index, gate: as in
            :func:`~salt_megatron.loss.kd_cross_entropy` (the gate reads the stored targets:
            :func:`~salt_megatron.loss.gate.sparse_teacher_logq`, no collective).
        residual: ``"uniform"`` spreads the residual over the other ids below ``vocab_size``,
            ``"drop"`` renormalises the kept mass.
        vocab_size: the true vocabulary size V (columns at or past it are padding); default
            the full width ``Vl * tp``.
        return_stats: also return :class:`~salt_megatron.loss.KDStats` (agreement of the
            student's first argmax with ``target_ids[..., 0]``).

    Returns:
        float32 per-token loss ``[...]``, with ``return_stats`` ``(loss, KDStats)``. Forward:
        two all-reduces on ``tp_group`` (none without TP); backward: none.
    """
    _check_inputs(student_logits, target_ids, target_logprobs, target_residual, labels, loss_mask)
    if residual not in ("uniform", "drop"):
        raise ValueError(f"residual must be 'uniform' or 'drop', got {residual!r}")
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
        vocab_size=width * world if vocab_size is None else int(vocab_size),
        ignore_index=ignore_index,
        residual=residual,
        need_stats=return_stats,
        inplace_grad=inplace_grad,
        chunk_elems=chunk_elems(student_logits.device),
        gate=gate,
    )
    k = target_ids.shape[-1]
    outs = _SparseKD.apply(
        student_logits.contiguous().view(-1, width),
        target_ids.reshape(-1, k),
        target_logprobs.reshape(-1, k),
        target_residual.reshape(-1),
        labels.reshape(-1),
        None if loss_mask is None else loss_mask.reshape(-1).float(),
        cfg,
    )
    return with_leading_shape(outs, labels.shape, return_stats)
