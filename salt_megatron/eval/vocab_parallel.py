"""Vocabulary-parallel reductions for evaluation: target log-probabilities and greedy ids.

Each tensor-parallel rank holds a slice of the output layer's columns: ``logits_nv`` is
``[n, Vl]`` whose first column is global column ``vocab_start``. Columns at or past
``true_vocab`` (megatron's padding of the embedding to a multiple of 128 x TP) are excluded:
they are outside the softmax and never chosen, so the results equal a dense log-softmax / argmax
over the tokenizer's vocabulary (what a Hugging Face export without the padded rows computes).
No rank gathers the vocabulary: two all-reduces of ``[n]`` vectors per reduction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _masked_float(logits_nv: torch.Tensor, vocab_start: int, true_vocab: int) -> torch.Tensor:
    """``logits_nv`` in float32 with the padded columns set to ``-inf`` (a copy)."""
    x_nv = logits_nv.float().clone()
    first_pad = true_vocab - vocab_start
    if first_pad < x_nv.shape[-1]:
        x_nv[:, max(first_pad, 0) :] = float("-inf")
    return x_nv


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def target_logprobs(
    logits_nv: torch.Tensor,
    targets_n: torch.Tensor,
    vocab_start: int,
    true_vocab: int,
    tp_group: Any = None,
) -> torch.Tensor:
    """``log softmax(logits)[target]`` per row: ``[n]`` float32 (nats, <= 0).

    ``targets_n``: int64 global token ids, each ``< true_vocab``. Collective over ``tp_group``
    (None: the slice is the whole vocabulary).
    """
    x_nv = _masked_float(logits_nv, vocab_start, true_vocab)
    max_n = _all_reduce(x_nv.max(dim=-1).values, dist.ReduceOp.MAX, tp_group)
    sumexp_n = _all_reduce(
        torch.exp(x_nv - max_n[:, None]).sum(dim=-1), dist.ReduceOp.SUM, tp_group
    )
    local_n = targets_n - vocab_start
    inside_n = (local_n >= 0) & (local_n < x_nv.shape[-1])
    picked_n = x_nv.gather(-1, local_n.clamp(0, x_nv.shape[-1] - 1)[:, None]).squeeze(-1)
    target_n = _all_reduce(
        torch.where(inside_n, picked_n, torch.zeros_like(picked_n)), dist.ReduceOp.SUM, tp_group
    )
    return target_n - (max_n + torch.log(sumexp_n))


def greedy_ids(
    logits_nv: torch.Tensor, vocab_start: int, true_vocab: int, tp_group: Any = None
) -> torch.Tensor:
    """The argmax token id per row over the true vocabulary: ``[n]`` int64.

    Ties go to the lowest global id, as ``torch.argmax`` over the whole row does: the largest
    value is all-reduced (MAX), then the lowest id holding it (MIN).
    """
    x_nv = _masked_float(logits_nv, vocab_start, true_vocab)
    local_n = x_nv.argmax(dim=-1)
    value_n = x_nv.gather(-1, local_n[:, None]).squeeze(-1)
    best_n = _all_reduce(value_n.clone(), dist.ReduceOp.MAX, tp_group)
    none = torch.iinfo(torch.int64).max
    ids_n = torch.where(value_n == best_n, local_n + vocab_start, torch.full_like(local_n, none))
    return _all_reduce(ids_n, dist.ReduceOp.MIN, tp_group)
