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


#: Per-micro-batch sums reported by every loss function, then summed over micro-batches and
#: data-parallel ranks: total loss, LM (cross-entropy) term, KD term, teacher/student top-1
#: agreement, and the count of valid tokens they are normalised by.
METRICS = ("loss", "lm_loss", "kd_loss", "top1_agree", "tokens")


def reduce_token_losses(
    loss_mask: torch.Tensor,
    total: torch.Tensor,
    lm: torch.Tensor | None = None,
    kd: torch.Tensor | None = None,
    agree: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Reduce per-token losses to megatron's (sum, valid count, report) contract.

    All tensors share one token shape: ``[b, s]``, or ``[s, b]`` from the KD step (which
    transposes the mask to the loss's order); each sum runs over all tokens.

    Only ``total`` carries gradient. ``report["metrics"]`` holds the float32 sums in
    :data:`METRICS` order (``lm`` defaults to ``total``, the others to 0).
    """
    mask = loss_mask.reshape(-1).float()

    def masked_sum(x: torch.Tensor | None) -> torch.Tensor:
        if x is None:
            return mask.new_zeros(())
        return (x.reshape(-1).float() * mask).sum()

    loss_sum = masked_sum(total)
    count = mask.sum()
    lm_sum = loss_sum if lm is None else masked_sum(lm)
    report = torch.stack([loss_sum, lm_sum, masked_sum(kd), masked_sum(agree), count]).detach()
    return loss_sum, count.to(torch.int), {"metrics": report}


def read_batch(
    data_iterator: Iterator[Batch] | None, model: torch.nn.Module
) -> tuple[Batch | None, bool, bool]:
    """This stage's micro-batch (None for middle stages) and the chunk's (pre, post) flags."""
    pre = bool(get_attr_wrapped_model(model, "pre_process"))
    post = bool(get_attr_wrapped_model(model, "post_process"))
    batch = to_device(next(data_iterator)) if data_iterator is not None else None
    return batch, pre, post


def stage_inputs(batch: Batch | None, pre: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Tokens and position ids for a first stage; None for later stages."""
    if batch is None or not pre:
        return None, None
    return batch["tokens"], batch["position_ids"]


def lm_forward_step(
    data_iterator: Iterator[Batch] | None,
    model: torch.nn.Module,
    reduce: Callable[..., Any] = reduce_token_losses,
) -> tuple[torch.Tensor, LossFunc]:
    """Plain next-token forward: per-token cross-entropy computed by the GPT model itself.

    First stages feed tokens, the last stage passes labels and gets ``[b, s]`` losses back; middle
    stages read no data (their input comes from the previous stage). ``reduce(loss_mask, losses)``
    turns the losses into megatron's loss-function contract (bind it with ``functools.partial``).
    """
    batch, pre, post = read_batch(data_iterator, model)
    tokens, position_ids = stage_inputs(batch, pre)
    labels = batch["labels"] if batch is not None and post else None
    output = model(tokens, position_ids, None, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None and post else torch.empty(0)
    return output, partial(reduce, loss_mask)


def sum_reports(reports: list[dict[str, Any]]) -> torch.Tensor:
    """Sum the :data:`METRICS` reports over micro-batches (zeros on stages without a loss)."""
    total = torch.zeros(len(METRICS), dtype=torch.float32, device=device())
    for report in reports:
        if "metrics" in report:
            total += report["metrics"].to(total.device)
    return total
