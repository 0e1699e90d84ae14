"""SALT_DS: score training sequences with the teacher and keep the "challenging but learnable" ones.

Score of a sequence (SALT paper, section on data selection): the **median of its per-token
teacher losses over the tokens whose target is in the teacher's top-k** (k = 10). Tokens whose
target falls outside the top-k are "not learnable" for the teacher and are ignored; a high score
among the learnable ones means "challenging". A sequence with no learnable token scores NaN and is
never selected.

Everything here is vocab-parallel: logits are ``[..., V/tp]`` shards, the top-k membership and the
loss use small all-reduces / all-gathers on ``tp_group`` and never gather the vocabulary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def token_losses_and_topk(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, k: int = 10, tp_group: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss ``-log softmax(logits)[label]`` and whether the label is in the top-k.

    ``logits_bsv``: this rank's contiguous vocabulary shard ``[b, s, V/tp]`` (rank r holds
    columns ``[r*V/tp, (r+1)*V/tp)``). Returns float32 ``[b, s]`` losses and bool ``[b, s]``
    membership (ties at the k-th value count as members). Collectives: MAX, SUM, one all-gather
    of the local top-k values.
    """
    logits = logits_bsv.float()
    width = logits.shape[-1]
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    local = labels_bs - rank * width
    owned = (local >= 0) & (local < width)
    label_logit = torch.where(
        owned, logits.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1), 0.0
    )
    rowmax = _all_reduce(logits.amax(-1), dist.ReduceOp.MAX, tp_group)
    sums = torch.stack([(logits - rowmax.unsqueeze(-1)).exp().sum(-1), label_logit])
    sums = _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
    loss = rowmax + sums[0].log() - sums[1]
    top_local = logits.topk(min(k, width), dim=-1).values
    if world > 1:
        gathered = [torch.empty_like(top_local) for _ in range(world)]
        dist.all_gather(gathered, top_local.contiguous(), group=tp_group)
        top_local = torch.cat(gathered, dim=-1)
    kth = top_local.topk(k, dim=-1).values[..., -1]
    return loss, sums[1] >= kth


def sequence_scores(losses_bs: torch.Tensor, in_topk_bs: torch.Tensor) -> torch.Tensor:
    """Median loss over each sequence's learnable tokens: float64 ``[b]``, NaN where none.

    The median of an even count is the mean of the two middle values (numpy's convention).
    Computed where the inputs live (sort and gather; no host read).
    """
    values_bs = torch.where(in_topk_bs, losses_bs.double(), torch.inf).sort(dim=-1).values
    count_b = in_topk_bs.sum(-1)
    lower_b = ((count_b - 1).clamp(min=0) // 2).unsqueeze(-1)
    upper_b = (count_b // 2).clamp(max=values_bs.shape[-1] - 1).unsqueeze(-1)
    median_b = (values_bs.gather(-1, lower_b) + values_bs.gather(-1, upper_b)).squeeze(-1) / 2
    return torch.where(count_b > 0, median_b, torch.nan)


def select_band(
    scores: np.ndarray,
    low_quantile: float | None = None,
    high_quantile: float | None = None,
    top_fraction: float | None = None,
) -> np.ndarray:
    """Indices (sorted) of the sequences chosen from ``scores`` (NaN = never chosen).

    Either a quantile band ``[low_quantile, high_quantile]`` of the finite scores (inclusive, by
    numpy's linear quantiles), or the ``top_fraction`` highest scores (ties broken by index).
    """
    finite = np.flatnonzero(np.isfinite(scores))
    if finite.size == 0:
        raise ValueError("no sequence has a finite score (no learnable tokens anywhere)")
    if top_fraction is not None:
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        n = max(1, round(top_fraction * finite.size))
        order = finite[np.lexsort((finite, -scores[finite]))]
        return np.sort(order[:n])
    lo = 0.0 if low_quantile is None else low_quantile
    hi = 1.0 if high_quantile is None else high_quantile
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"need 0 <= low_quantile < high_quantile <= 1, got {lo}, {hi}")
    lo_v, hi_v = np.quantile(scores[finite], [lo, hi])
    keep = (scores[finite] >= lo_v) & (scores[finite] <= hi_v)
    return finite[keep]
