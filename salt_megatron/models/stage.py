"""What one pipeline stage feeds its model chunk: its micro-batch, on the device, and inputs.

First stages feed tokens and positions; the last stage needs labels and the loss mask; middle
stages read no data (their input comes from the previous stage).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core.utils import get_attr_wrapped_model

from salt_megatron.data.batches import Batch, to_device
from salt_megatron.runtime import device


def read_batch(
    data_iterator: Iterator[Batch] | None, model: torch.nn.Module
) -> tuple[Batch | None, bool, bool]:
    """This stage's micro-batch on this rank's device (None for middle stages) and the chunk's
    ``(pre_process, post_process)`` flags."""
    pre = bool(get_attr_wrapped_model(model, "pre_process"))
    post = bool(get_attr_wrapped_model(model, "post_process"))
    batch = to_device(next(data_iterator), device()) if data_iterator is not None else None
    return batch, pre, post


def stage_inputs(batch: Batch | None, pre: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Tokens and position ids for a first stage; None for later stages."""
    if batch is None or not pre:
        return None, None
    return batch["tokens"], batch["position_ids"]
