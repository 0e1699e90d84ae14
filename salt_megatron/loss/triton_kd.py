"""Triton implementation of the two local sweeps of the vocab-parallel KD loss.

Same interface and math as :mod:`salt_megatron.loss.torch_kd` (the reference and CPU path):

* :func:`local_row_stats`: one program per row streams the student and teacher shard once in
  ``BLOCK`` columns, keeping running maxima and rescaling its partial sums by
  ``exp(m_old - m_new)`` whenever a maximum grows (the online softmax of Transformer Engine's
  Triton cross-entropy), extended to the teacher sum and the cross term
  ``sum e^{(t-mt)/T} (s-ms)/T``, whose shift by ``ms`` is updated additively.
* :func:`write_grad`: one program per row writes the gradient block by block (may alias ``s``).

The collectives stay in Python between the two kernels (see ``kd_cross_entropy``). All arithmetic
is float32 (bf16/fp16 loads are upcast in registers). On a CPU this runs under
``TRITON_INTERPRET=1`` (set before triton is imported), which the tests use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from salt_megatron.loss.torch_kd import LocalRowStats

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_stats_kernel(
    s_ptr,
    t_ptr,
    out_ptr,
    arg_ptr,
    n_rows,
    width,
    stride_row,
    inv_t,
    TEMP_IS_ONE: tl.constexpr,
    NEED_TOP1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[k, row] for k = smax, tmax, zs, zt, ats, z1 (float32); arg[0|1, row] first argmax."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_row
    t_row = t_ptr + row * stride_row
    ms = -1.0e30  # finite "-inf": keeps 0 * (m_old - m_new) finite on the first block
    mt = -1.0e30  # (a literal: jitted code may not read non-constexpr globals)
    zs = 0.0
    zt = 0.0
    ats = 0.0
    z1 = 0.0
    sarg = 0
    targ = 0
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < width
        bs = tl.load(s_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
        bt = tl.load(t_row + cols, mask=valid, other=-float("inf")).to(tl.float32)
        bs_max = tl.max(bs, axis=0)
        bt_max = tl.max(bt, axis=0)
        if NEED_TOP1:
            sarg = tl.where(bs_max > ms, start + tl.argmax(bs, axis=0), sarg)
            targ = tl.where(bt_max > mt, start + tl.argmax(bt, axis=0), targ)
        ms_new = tl.maximum(ms, bs_max)
        mt_new = tl.maximum(mt, bt_max)
        alpha_t = tl.exp((mt - mt_new) * inv_t)
        ats = alpha_t * (ats + zt * ((ms - ms_new) * inv_t))
        zt = zt * alpha_t
        zs = zs * tl.exp((ms - ms_new) * inv_t)
        et = tl.exp((bt - mt_new) * inv_t)
        xs = tl.where(valid, (bs - ms_new) * inv_t, 0.0)  # et == 0 on padding lanes
        zt += tl.sum(et, axis=0)
        ats += tl.sum(et * xs, axis=0)
        zs += tl.sum(tl.where(valid, tl.exp(xs), 0.0), axis=0)
        if not TEMP_IS_ONE:
            z1 = z1 * tl.exp(ms - ms_new) + tl.sum(tl.exp(bs - ms_new), axis=0)
        ms = ms_new
        mt = mt_new
    if TEMP_IS_ONE:
        z1 = zs
    tl.store(out_ptr + row, ms)
    tl.store(out_ptr + n_rows + row, mt)
    tl.store(out_ptr + 2 * n_rows + row, zs)
    tl.store(out_ptr + 3 * n_rows + row, zt)
    tl.store(out_ptr + 4 * n_rows + row, ats)
    tl.store(out_ptr + 5 * n_rows + row, z1)
    if NEED_TOP1:
        tl.store(arg_ptr + row, sarg.to(tl.int64))  # type: ignore[attr-defined]
        tl.store(arg_ptr + n_rows + row, targ.to(tl.int64))  # type: ignore[attr-defined]


@triton.jit
def _grad_kernel(
    s_ptr,
    t_ptr,
    g_ptr,
    coef_ptr,
    ylocal_ptr,
    n_rows,
    width,
    stride_row,
    inv_t,
    TEMP_IS_ONE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """g = cp e^{(s-smax)/T} + c1 e^{s-smax} - cq e^{(t-tmax)/T} - a_ce [v == ylocal]."""
    row = tl.program_id(0).to(tl.int64)
    smax = tl.load(coef_ptr + row)
    tmax = tl.load(coef_ptr + n_rows + row)
    cp = tl.load(coef_ptr + 2 * n_rows + row)
    c1 = tl.load(coef_ptr + 3 * n_rows + row)
    cq = tl.load(coef_ptr + 4 * n_rows + row)
    ace = tl.load(coef_ptr + 5 * n_rows + row)
    ylocal = tl.load(ylocal_ptr + row)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < width
        offs = row * stride_row + cols
        xs = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32) - smax
        bt = tl.load(t_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        g = (cp + c1) * tl.exp(xs) if TEMP_IS_ONE else cp * tl.exp(xs * inv_t) + c1 * tl.exp(xs)
        g = g - cq * tl.exp((bt - tmax) * inv_t)
        g = tl.where(cols == ylocal, g - ace, g)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=valid)


def _block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 4096 columns per step on a GPU; small blocks for the interpreter."""
    cap = 256 if _INTERPRET else 4096
    block = min(triton.next_power_of_2(width), cap)
    return block, 8 if block >= 2048 else 4


def local_row_stats(
    s_nv: torch.Tensor,
    t_nv: torch.Tensor,
    temperature: float,
    need_top1: bool,
    chunk_elems: int,
) -> LocalRowStats:
    """Per-row shard statistics of ``[N, Vl]`` contiguous logits (see ``torch_kd``).

    ``chunk_elems`` is unused (kept for the shared interface): one program handles one row.
    """
    del chunk_elems
    n_rows, width = s_nv.shape
    out_kn = torch.empty(6, n_rows, dtype=torch.float32, device=s_nv.device)
    args_kn = torch.zeros(2, n_rows, dtype=torch.int64, device=s_nv.device)
    block, warps = _block(width)
    if n_rows > 0:
        _row_stats_kernel[(n_rows,)](
            s_nv, t_nv, out_kn, args_kn, n_rows, width, s_nv.stride(0), 1.0 / temperature,
            TEMP_IS_ONE=temperature == 1.0, NEED_TOP1=need_top1, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return LocalRowStats(
        smax_n=out_kn[0],
        tmax_n=out_kn[1],
        zs_n=out_kn[2],
        zt_n=out_kn[3],
        ats_n=out_kn[4],
        z1_n=out_kn[5],
        sarg_n=args_kn[0] if need_top1 else None,
        targ_n=args_kn[1] if need_top1 else None,
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
    """Write ``d loss / d s`` into ``grad_nv`` (``[N, Vl]``, may be ``s_nv``); see ``torch_kd``."""
    del chunk_elems
    n_rows, width = s_nv.shape
    block, warps = _block(width)
    if n_rows > 0:
        _grad_kernel[(n_rows,)](
            s_nv, t_nv, grad_nv, coef_kn.contiguous(), ylocal_n.contiguous(), n_rows, width,
            s_nv.stride(0), 1.0 / temperature,
            TEMP_IS_ONE=temperature == 1.0, BLOCK=block, num_warps=warps,
        )  # fmt: skip
