"""What one pipeline stage feeds its model chunk: its micro-batch, on the device, and inputs.

First stages feed tokens and positions; the last stage needs labels and the loss mask; middle
stages read no data (their input comes from the previous stage), except for packed sequences,
whose attention mask every stage builds from the micro-batch's ``segment_ids``.
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


def packed_causal_mask(segment_ids_bs: torch.Tensor) -> torch.Tensor:
    """megatron's attention mask of packed sequences: ``[b, 1, s, s]`` bool, True = masked.

    Query ``i`` attends key ``j`` iff ``j <= i`` and both hold the same ``segment_ids_bs`` value
    (one example, or the padding): block-diagonal causal attention. Built on the ids' device,
    without host reads. megatron's local attention uses a given mask as is and builds its own
    causal one only when none is given.
    """
    s = segment_ids_bs.shape[-1]
    same_bss = segment_ids_bs[:, :, None] == segment_ids_bs[:, None, :]
    causal_ss = torch.ones(s, s, dtype=torch.bool, device=segment_ids_bs.device).tril()
    return ~(same_bss & causal_ss).unsqueeze(1)
