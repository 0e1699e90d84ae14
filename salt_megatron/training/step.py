"""The forward step handed to megatron-core's pipeline schedules, and its loss function.

Loss contract (``calculate_per_token_loss``): each micro-batch returns the *sum* of its per-token
losses and its count of valid tokens; megatron all-reduces the counts over the last stage's
data-parallel group and divides the gradients by the global count, so the step's loss is the mean
over every valid token of the global batch, independent of the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from megatron.core.utils import get_attr_wrapped_model

from salt_megatron.data.batches import Batch
from salt_megatron.runtime import device

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def to_device(batch: Batch) -> Batch:
    """Move a micro-batch to this rank's device."""
    dev = device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def masked_token_loss(
    loss_mask_bs: torch.Tensor, losses_bs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Reduce per-token losses ``[b, s]`` to (sum over valid tokens, valid count, report).

    ``report["lm loss"]`` is ``[sum, count]`` (float32), summed over micro-batches and DP ranks by
    the trainer for logging.
    """
    mask = loss_mask_bs.reshape(-1).float()
    loss_sum = (losses_bs.reshape(-1).float() * mask).sum()
    count = mask.sum()
    report = torch.stack([loss_sum.detach(), count])
    return loss_sum, count.to(torch.int), {"lm loss": report}


def lm_forward_step(
    data_iterator: Iterator[Batch] | None, model: torch.nn.Module
) -> tuple[torch.Tensor, LossFunc]:
    """Plain next-token forward: per-token cross-entropy computed by the GPT model itself.

    First stages feed tokens, the last stage passes labels and gets ``[b, s]`` losses back; middle
    stages read no data (their input comes from the previous stage).
    """
    pre = get_attr_wrapped_model(model, "pre_process")
    post = get_attr_wrapped_model(model, "post_process")
    batch = to_device(next(data_iterator)) if data_iterator is not None else None
    tokens = batch["tokens"] if batch is not None and pre else None
    position_ids = batch["position_ids"] if batch is not None and pre else None
    labels = batch["labels"] if batch is not None and post else None
    output = model(tokens, position_ids, None, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None and post else torch.empty(0)
    return output, partial(masked_token_loss, loss_mask)


def sum_reports(reports: list[dict[str, Any]], key: str) -> torch.Tensor:
    """Sum ``[sum, count]`` reports over micro-batches (zeros when this stage has none)."""
    total = torch.zeros(2, dtype=torch.float32, device=device())
    for report in reports:
        if key in report:
            total += report[key].to(total.device)
    return total
