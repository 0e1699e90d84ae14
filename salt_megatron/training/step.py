"""The plain forward step handed to megatron-core's pipeline schedules, and report sums.

The loss contract (per-micro-batch sums and valid-token counts) is
:mod:`salt_megatron.loss.contract`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from salt_megatron.data.batches import Batch
from salt_megatron.loss.contract import METRICS, LossFunc, reduce_token_losses
from salt_megatron.models.stage import read_batch, stage_inputs
from salt_megatron.runtime import device

__all__ = ["METRICS", "lm_forward_step", "sum_reports"]


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
