"""The plain forward step handed to megatron-core's pipeline schedules, and report sums.

The loss contract (per-micro-batch sums and valid-token counts) is
:mod:`salt_megatron.loss.contract`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from salt_megatron.data.batches import SEGMENT_KEY, Batch
from salt_megatron.loss.contract import METRICS, LossFunc, reduce_token_losses
from salt_megatron.models.stage import packed_causal_mask, read_batch, stage_inputs
from salt_megatron.runtime import device

__all__ = ["METRICS", "lm_forward_step", "sft_forward_step", "sum_reports"]


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


def sft_forward_step(
    data_iterator: Iterator[Batch] | None,
    model: torch.nn.Module,
    reduce: Callable[..., Any] = reduce_token_losses,
) -> tuple[torch.Tensor, LossFunc]:
    """Packed SFT forward: :func:`lm_forward_step` with a block-diagonal causal attention mask.

    Every stage reads the micro-batch (its attention needs the mask, built on the device from
    ``segment_ids`` by :func:`~salt_megatron.models.stage.packed_causal_mask`); first stages also
    feed tokens and per-example positions, the last stage labels and the loss mask (1 on response
    tokens only), reduced by ``reduce`` as in :func:`lm_forward_step`.
    """
    batch, pre, post = read_batch(data_iterator, model)
    if batch is None:
        raise RuntimeError("packed SFT needs the micro-batch on every pipeline stage (its mask)")
    tokens, position_ids = stage_inputs(batch, pre)
    mask_b1ss = packed_causal_mask(batch[SEGMENT_KEY])
    labels = batch["labels"] if post else None
    output = model(tokens, position_ids, mask_b1ss, labels=labels)
    loss_mask = batch["loss_mask"] if post else torch.empty(0)
    return output, partial(reduce, loss_mask)


def sum_reports(reports: list[dict[str, Any]]) -> torch.Tensor:
    """Sum the :data:`METRICS` reports over micro-batches (zeros on stages without a loss)."""
    total = torch.zeros(len(METRICS), dtype=torch.float32, device=device())
    for report in reports:
        if "metrics" in report:
            total += report["metrics"].to(total.device)
    return total
