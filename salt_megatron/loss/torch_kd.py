"""PyTorch implementation of the two local sweeps of the vocab-parallel KD loss.

Both sweeps walk the ``[N, Vl]`` logits shard in row chunks of about ``chunk_elems`` elements,
upcasting each chunk to float32 (never the whole shard): the chunk stays in cache while all its
terms are computed, so each sweep reads the student and teacher shards from memory once.
Per chunk at most three float32 temporaries of the chunk's size exist. No communication here:
:mod:`salt_megatron.loss.kd_cross_entropy` merges the per-rank statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LocalRowStats(NamedTuple):
    """Per-row statistics of one vocabulary shard; every tensor is ``[N]``.

    Sums are relative to this shard's own maxima (``smax_n``, ``tmax_n``, raw logit units) and
    in float32. ``sarg_n``/``targ_n`` are the first local argmax (int64, local column) or None.
    """

    smax_n: torch.Tensor  # max_v s
    tmax_n: torch.Tensor  # max_v t
    zs_n: torch.Tensor  # sum_v exp((s - smax) / T)
    zt_n: torch.Tensor  # sum_v exp((t - tmax) / T)
    ats_n: torch.Tensor  # sum_v exp((t - tmax) / T) * (s - smax) / T
    z1_n: torch.Tensor  # sum_v exp(s - smax)   (the T=1 partition sum of the CE term)
    sarg_n: torch.Tensor | None
    targ_n: torch.Tensor | None


def _chunk_rows(width: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(width, 1))


def local_row_stats(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    temperature: float,
    need_top1: bool,
    chunk_elems: int,
) -> LocalRowStats:
    """One chunked sweep over the shards ``s_nv``, ``t_nv`` (``[N, Vl]``, contiguous).

    Reductions are over the local vocabulary columns only; float32 arithmetic throughout.
    """
    n_rows, width = s_nv.shape
    inv_t = 1.0 / temperature
    out_kn = torch.empty(6, n_rows, dtype=torch.float32, device=s_nv.device)
    args_kn = torch.empty(2, n_rows, dtype=torch.int64, device=s_nv.device) if need_top1 else None
    step = _chunk_rows(width, chunk_elems)
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        s_cv, t_cv = s_nv[rows], t_nv[rows]
        if args_kn is not None:
            smax_c, args_kn[0, rows] = s_cv.max(dim=-1)
            tmax_c, args_kn[1, rows] = t_cv.max(dim=-1)
        else:
            smax_c, tmax_c = s_cv.amax(dim=-1), t_cv.amax(dim=-1)
        smax_c, tmax_c = smax_c.float(), tmax_c.float()
        xs_cv = torch.sub(s_cv, smax_c.unsqueeze(-1))
        et_cv = torch.sub(t_cv, tmax_c.unsqueeze(-1))
        if temperature != 1.0:
            xs_cv.mul_(inv_t)
            et_cv.mul_(inv_t)
        et_cv.exp_()
        out_kn[3, rows] = et_cv.sum(dim=-1)
        out_kn[4, rows] = et_cv.mul_(xs_cv).sum(dim=-1)  # cheaper than bmm on CPU
        if temperature != 1.0:
            torch.mul(xs_cv, temperature, out=et_cv)
            out_kn[5, rows] = et_cv.exp_().sum(dim=-1)
        out_kn[2, rows] = xs_cv.exp_().sum(dim=-1)
        out_kn[0, rows], out_kn[1, rows] = smax_c, tmax_c
    z1_n = out_kn[5] if temperature != 1.0 else out_kn[2]
    return LocalRowStats(
        smax_n=out_kn[0],
        tmax_n=out_kn[1],
        zs_n=out_kn[2],
        zt_n=out_kn[3],
        ats_n=out_kn[4],
        z1_n=z1_n,
        sarg_n=None if args_kn is None else args_kn[0],
        targ_n=None if args_kn is None else args_kn[1],
    )


def write_grad(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    grad_nv: torch.Tensor,
    coef_kn: torch.Tensor,
    ylocal_n: torch.Tensor,
    temperature: float,
    chunk_elems: int,
) -> None:
    """Write ``d loss / d s`` into ``grad_nv`` (``[N, Vl]``; may be ``s_nv`` itself).

    ``coef_kn`` is float32 ``[6, N]``: rows ``smax, tmax, cp, c1, cq, a_ce`` (global maxima and
    per-row coefficients with the upstream gradient folded in)::

        grad = cp * exp((s - smax)/T) + c1 * exp(s - smax) - cq * exp((t - tmax)/T)
               - a_ce * [v == ylocal]

    ``ylocal_n`` is the int64 local label column, or -1 where the label is not on this shard.
    A chunk is read completely before its gradient is written, so in-place is safe.
    """
    n_rows, width = s_nv.shape
    inv_t = 1.0 / temperature
    step = _chunk_rows(width, chunk_elems)
    direct = grad_nv.dtype == torch.float32
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        smax_c1, tmax_c1, cp_c1, c1_c1, cq_c1, ace_c1 = (c.unsqueeze(-1) for c in coef_kn[:, rows])
        s_cv, t_cv = s_nv[rows], t_nv[rows]
        q_cv = torch.sub(t_cv, tmax_c1)
        g_cv = torch.sub(s_cv, smax_c1, out=grad_nv[rows]) if direct else torch.sub(s_cv, smax_c1)
        if temperature == 1.0:
            g_cv.exp_().mul_(cp_c1 + c1_c1)
        else:
            p_cv = torch.mul(g_cv, inv_t).exp_().mul_(cp_c1)
            g_cv.exp_().mul_(c1_c1).add_(p_cv)
            q_cv.mul_(inv_t)
        g_cv.addcmul_(q_cv.exp_(), cq_c1, value=-1.0)
        ylocal_c = ylocal_n[rows]
        has_c1 = (ylocal_c >= 0).unsqueeze(-1)
        g_cv.scatter_add_(1, ylocal_c.clamp(min=0).unsqueeze(-1), -ace_c1 * has_c1)
        if not direct:
            grad_nv[rows].copy_(g_cv)
