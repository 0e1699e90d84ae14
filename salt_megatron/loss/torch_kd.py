"""PyTorch implementation of the local sweeps of the vocab-parallel KD loss (the CPU path).

Every sweep walks the ``[N, Vl]`` logits shards in row chunks of about ``chunk_elems`` elements.
A chunk is upcast once into preallocated float32 scratch rows (``copy_``: never the whole shard)
and every term is then computed with in-place, same-dtype ops on that scratch: mixed-dtype
broadcasting ops (bf16 logits minus a float32 column) take a slow element-by-element path on
CPU, and fresh temporaries per op cost an allocation (an ``mmap`` for large chunks) each. At
most three float32 scratch buffers of the chunk's size exist during a sweep.

Exponentials per logit element (the dominant cost; ``exp`` runs at ~1.5 ns/element on an AVX2
core, 2.5x a multiply): each sweep computes ``exp((s - m)/T)`` and ``exp((t - m_t)/T)``, plus
``exp(s - m)`` for the CE term when ``T != 1`` (at ``T == 1`` the CE and KD student softmax
coincide; at ``T == 2`` it is the square of ``exp((s - m)/2)``, a multiply). So 2 exponentials
per element at ``T = 1`` or ``T = 2``, else 3, computed once per call:

* without tensor parallelism :func:`fused_stats_grad` does statistics and gradient in one sweep;
* with it, :func:`stats_keep_exps` writes the sweep's exponentials (relative to the shard's
  maxima) into the gradient buffer and the teacher's buffer, and after the collectives
  :func:`grad_from_exps` rescales them in place to the global maxima and combines them, with no
  exponential (a square root at T = 2, a power at other T).

No communication here: :mod:`salt_megatron.loss.kd_cross_entropy` merges per-rank statistics.
"""

from __future__ import annotations

from collections.abc import Callable
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


class _Exps(NamedTuple):
    """Float32 ``[n, Vl]`` scratch views of one chunk after :func:`_chunk_exps`."""

    es: torch.Tensor  # exp((s - smax) / T)
    e1: torch.Tensor  # exp(s - smax); the same tensor as ``es`` when T == 1
    et: torch.Tensor  # exp((t - tmax) / T)


def _scratch(n_rows: int, width: int, chunk_elems: int, like: torch.Tensor) -> torch.Tensor:
    """``[3, rows_per_chunk, Vl]`` float32 scratch (rows_per_chunk >= 1, <= N)."""
    step = max(1, min(n_rows, chunk_elems // max(width, 1)))
    return torch.empty(3, step, width, dtype=torch.float32, device=like.device)


def _chunk_exps(
    s_cv: torch.Tensor,
    t_cv: torch.Tensor,
    bufs: torch.Tensor,
    smax_c1: torch.Tensor,
    tmax_c1: torch.Tensor,
    temperature: float,
    need_dot: bool = True,
) -> tuple[_Exps, torch.Tensor | None]:
    """Exponentials of one chunk relative to the ``[n, 1]`` float32 shifts ``smax``/``tmax``.

    Returns the exponentials and, if ``need_dot``, ``ats_n = sum_v exp((t - tmax)/T) (s - smax)/T``
    (``[n]``). ``s_cv``/``t_cv`` must already be upcast into ``bufs[0]``/``bufs[1]`` (``[n, Vl]``
    views); they are overwritten (``bufs[2]`` too when ``T != 1``).
    """
    xs_cv, xt_cv = s_cv.sub_(smax_c1), t_cv.sub_(tmax_c1)
    inv_t = 1.0 / temperature
    if temperature != 1.0:
        xt_cv.mul_(inv_t)
    et_cv = xt_cv.exp_()
    spare_cv = bufs[2, : xs_cv.shape[0]]
    ats_n = None
    if need_dot:  # into the spare buffer: bmm or (a * b).sum(-1) with a temporary are slower
        ats_n = torch.mul(et_cv, xs_cv, out=spare_cv).sum(dim=-1)
        if temperature != 1.0:
            ats_n.mul_(inv_t)
    if temperature == 1.0:
        es_cv = xs_cv.exp_()
        return _Exps(es_cv, es_cv, et_cv), ats_n
    es_cv = torch.mul(xs_cv, inv_t, out=spare_cv).exp_()
    if temperature == 2.0:  # exp(x) = exp(x/2)^2: a multiply instead of an exponential
        return _Exps(es_cv, torch.mul(es_cv, es_cv, out=xs_cv), et_cv), ats_n
    return _Exps(es_cv, xs_cv.exp_(), et_cv), ats_n


def _upcast(src_cv: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    out_cv = buf[: src_cv.shape[0]]
    out_cv.copy_(src_cv)
    return out_cv


def _chunk_maxima(
    s_cv: torch.Tensor, t_cv: torch.Tensor, args_kn: torch.Tensor | None, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima ``[n, 1]`` of float32 chunks; writes the first argmaxes into ``args_kn``."""
    if args_kn is None:
        return s_cv.amax(dim=-1, keepdim=True), t_cv.amax(dim=-1, keepdim=True)
    smax_c, args_kn[0, rows] = s_cv.max(dim=-1)
    tmax_c, args_kn[1, rows] = t_cv.max(dim=-1)
    return smax_c.unsqueeze(-1), tmax_c.unsqueeze(-1)


def _row_stats(
    out_kn: torch.Tensor, args_kn: torch.Tensor | None, temperature: float
) -> LocalRowStats:
    return LocalRowStats(
        smax_n=out_kn[0],
        tmax_n=out_kn[1],
        zs_n=out_kn[2],
        zt_n=out_kn[3],
        ats_n=out_kn[4],
        z1_n=out_kn[5] if temperature != 1.0 else out_kn[2],
        sarg_n=None if args_kn is None else args_kn[0],
        targ_n=None if args_kn is None else args_kn[1],
    )


ChunkHook = Callable[[slice, _Exps, torch.Tensor], None]
"""Called by :func:`_stats_sweep` for each chunk: ``(rows, exps, out_kn)`` with the chunk's
exponentials still in scratch and ``out_kn[:, rows]`` final for these rows."""


def _stats_sweep(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    temperature: float,
    need_top1: bool,
    chunk_elems: int,
    hook: ChunkHook | None = None,
) -> LocalRowStats:
    """Statistics sweep; ``hook`` gets every chunk's exponentials before the scratch is reused.

    The output rows of ``out_kn`` are ``smax, tmax, zs, zt, ats, z1`` (see :class:`LocalRowStats`).
    """
    n_rows, width = s_nv.shape
    out_kn = torch.empty(6, n_rows, dtype=torch.float32, device=s_nv.device)
    args_kn = torch.empty(2, n_rows, dtype=torch.int64, device=s_nv.device) if need_top1 else None
    bufs = _scratch(n_rows, width, chunk_elems, s_nv)
    step = bufs.shape[1]
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        s_cv, t_cv = _upcast(s_nv[rows], bufs[0]), _upcast(t_nv[rows], bufs[1])
        smax_c1, tmax_c1 = _chunk_maxima(s_cv, t_cv, args_kn, rows)
        exps, ats_c = _chunk_exps(s_cv, t_cv, bufs, smax_c1, tmax_c1, temperature)
        assert ats_c is not None
        out_kn[4, rows] = ats_c
        out_kn[0, rows], out_kn[1, rows] = smax_c1.squeeze(-1), tmax_c1.squeeze(-1)
        out_kn[3, rows] = exps.et.sum(dim=-1)
        if temperature != 1.0:
            out_kn[5, rows] = exps.e1.sum(dim=-1)
        out_kn[2, rows] = exps.es.sum(dim=-1)
        if hook is not None:
            hook(rows, exps, out_kn)
    return _row_stats(out_kn, args_kn, temperature)


def _combine(
    exps: _Exps, coef_4c: torch.Tensor, ylocal_c: torch.Tensor, g_cv: torch.Tensor
) -> None:
    """``g = cp es + c1 e1 - cq et - ace [v == y]``; ``coef_4c = [cp, c1, cq, ace]`` (``[4, n]``).

    Overwrites the scratch ``exps``; ``g_cv`` (``[n, Vl]``, any float dtype) may alias the
    logits (the chunk was read into scratch before).
    """
    cp_c1, c1_c1, cq_c1, ace_c1 = (c.unsqueeze(-1) for c in coef_4c)
    if exps.e1 is exps.es:
        acc_cv = exps.es.mul_(cp_c1 + c1_c1)
    else:
        acc_cv = exps.es.mul_(cp_c1).addcmul_(exps.e1, c1_c1)
    acc_cv.addcmul_(exps.et, cq_c1, value=-1.0)
    has_c1 = (ylocal_c >= 0).unsqueeze(-1)
    acc_cv.scatter_add_(1, ylocal_c.clamp(min=0).unsqueeze(-1), -ace_c1 * has_c1)
    g_cv.copy_(acc_cv)


Pair = tuple[torch.Tensor, torch.Tensor]
RowWeights = Callable[[slice, torch.Tensor, torch.Tensor], Pair]
"""``(rows, tmax_c, zt_c) -> (ace_c, akd_c)``: the CE / KD gradient weights of a chunk's rows
from their final teacher maxima and partition sums (a token-level KD gate decides on them)."""


def fused_stats_grad(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    grad_nv: torch.Tensor,
    ylocal_n: torch.Tensor,
    ace_n: torch.Tensor,
    akd_n: torch.Tensor,
    temperature: float,
    need_top1: bool,
    chunk_elems: int,
    weights: RowWeights | None = None,
) -> LocalRowStats:
    """Statistics and gradient in one sweep when the shard is the whole vocabulary (no TP).

    Writes ``grad = akd (es/Zs - et/Zt) + ace (e1/Z1 - [v == y])`` into ``grad_nv`` (``[N, V]``,
    may be ``s_nv``); ``ace_n``/``akd_n`` are the float32 ``[N]`` CE and KD gradient weights
    (``(1-w) mask [y valid]`` and ``w c mask / T``); ``ylocal_n`` is int64, -1 for no label.
    Returns the row statistics (:class:`LocalRowStats`), which are then global. The row is
    complete in its chunk, so its sums are final before the chunk leaves scratch and its
    exponentials give the gradient directly. ``weights``, if given, replaces ``ace_n``/``akd_n``
    per chunk (:data:`RowWeights`).
    """

    def gradient(rows: slice, exps: _Exps, out_kn: torch.Tensor) -> None:
        z1_c = out_kn[5 if temperature != 1.0 else 2, rows]
        ace_c, akd_c = ace_n[rows], akd_n[rows]
        if weights is not None:
            ace_c, akd_c = weights(rows, out_kn[1, rows], out_kn[3, rows])
        coef_4c = torch.stack(
            [akd_c / out_kn[2, rows], ace_c / z1_c, akd_c / out_kn[3, rows], ace_c]
        )  # fmt: skip
        _combine(exps, coef_4c, ylocal_n[rows], grad_nv[rows])

    return _stats_sweep(s_nv, t_nv, temperature, need_top1, chunk_elems, gradient)


def stats_keep_exps(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    es_nv: torch.Tensor,
    et_nv: torch.Tensor,
    temperature: float,
    need_top1: bool,
    chunk_elems: int,
) -> LocalRowStats:
    """Shard statistics (one sweep), keeping the sweep's exponentials for :func:`grad_from_exps`.

    Writes ``exp(s - smax)`` into ``es_nv`` and ``exp((t - tmax) / T)`` into ``et_nv``
    (``[N, Vl]`` each, relative to this shard's maxima, rounded once to the buffer's dtype:
    float32 buffers keep them exactly). ``es_nv`` may alias ``s_nv`` and ``et_nv`` may alias
    ``t_nv``: a chunk is read into scratch before it is written. The student's T = 1
    exponential is kept because ``exp((s - smax)/T) = es**(1/T)`` loses nothing for T >= 1
    (it is the larger of the two and rounds with a relative error divided by T).
    """

    def keep(rows: slice, exps: _Exps, out_kn: torch.Tensor) -> None:
        es_nv[rows].copy_(exps.e1)
        et_nv[rows].copy_(exps.et)

    return _stats_sweep(s_nv, t_nv, temperature, need_top1, chunk_elems, keep)


def grad_from_exps(
    es_nv: torch.Tensor,
    et_nv: torch.Tensor,
    coef_kn: torch.Tensor,
    ylocal_n: torch.Tensor,
    temperature: float,
    chunk_elems: int,
) -> None:
    """Turn :func:`stats_keep_exps`'s exponentials into ``d loss / d s``, in place in ``es_nv``.

    ``coef_kn`` is float32 ``[4, N]``: rows ``c1, cs, cq, a_ce`` (per-row coefficients that
    already hold the rescaling from the shard's maxima to the global ones)::

        grad = c1 * es + cs * es**(1/T) - cq * et - a_ce * [v == ylocal]

    No exponential: one sweep of upcasts, multiply-adds and one rounding to ``es_nv``'s dtype
    (``es**(1/T)`` is ``es`` itself at T = 1 and a square root at T = 2).
    """
    n_rows, width = es_nv.shape
    bufs = _scratch(n_rows, width, chunk_elems, es_nv)
    step = bufs.shape[1]
    inv_t = 1.0 / temperature
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        e1_cv, et_cv = _upcast(es_nv[rows], bufs[0]), _upcast(et_nv[rows], bufs[1])
        es_cv = e1_cv
        if temperature == 2.0:
            es_cv = torch.sqrt(e1_cv, out=bufs[2, : e1_cv.shape[0]])
        elif temperature != 1.0:
            es_cv = torch.pow(e1_cv, inv_t, out=bufs[2, : e1_cv.shape[0]])
        exps = _Exps(es=es_cv, e1=e1_cv, et=et_cv)
        c1_c, cs_c, cq_c, ace_c = coef_kn[:, rows]
        _combine(exps, torch.stack([cs_c, c1_c, cq_c, ace_c]), ylocal_n[rows], es_nv[rows])


def scale_rows_(grad_nv: torch.Tensor, scale_n: torch.Tensor, chunk_elems: int) -> None:
    """``grad_nv[i] *= scale_n[i]`` in place (``[N, Vl]`` any float dtype; ``[N]`` float32).

    Float32 arithmetic with one rounding to the gradient's dtype. A uniform scale (``loss.sum()``,
    ``loss.mean()``) is one scalar multiply, skipped for 1.0; otherwise low-precision gradients
    go through float32 scratch chunks (mixed-dtype broadcasting multiplies are slow on CPU).
    """
    scale_n = scale_n.float()
    if grad_nv.device.type != "cpu" or scale_n.numel() == 0:  # one kernel; no host read
        grad_nv.mul_(scale_n.unsqueeze(-1))
        return
    first = scale_n[0]
    if bool(torch.eq(scale_n, first).all()):
        value = float(first.item())
        if value != 1.0:
            grad_nv.mul_(value)
        return
    if grad_nv.dtype == torch.float32:
        grad_nv.mul_(scale_n.unsqueeze(-1))
        return
    n_rows, width = grad_nv.shape
    buf = _scratch(n_rows, width, chunk_elems, grad_nv)[0]
    step = buf.shape[0]
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        g_cv = _upcast(grad_nv[rows], buf)
        grad_nv[rows].copy_(g_cv.mul_(scale_n[rows].unsqueeze(-1)))
