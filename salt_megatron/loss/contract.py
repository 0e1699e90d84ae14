"""megatron-core's loss-function contract: per-micro-batch (sum, valid-token count, report).

With ``calculate_per_token_loss`` each micro-batch returns the *sum* of its per-token losses and
its count of valid tokens; megatron all-reduces the counts over the last stage's data-parallel
group and divides the gradients by the global count, so the step's loss is the mean over every
valid token of the global batch, independent of the layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]

#: Per-micro-batch sums reported by every loss function, then summed over micro-batches and
#: data-parallel ranks: total loss, LM (cross-entropy) term, KD term, teacher/student top-1
#: agreement, tokens the KD term applied to (all of them without a KD gate), and the count of
#: valid tokens they are normalised by (always last).
METRICS = ("loss", "lm_loss", "kd_loss", "top1_agree", "kd_gate_on", "tokens")


def reduce_token_losses(
    loss_mask: torch.Tensor,
    total: torch.Tensor,
    lm: torch.Tensor | None = None,
    kd: torch.Tensor | None = None,
    agree: torch.Tensor | None = None,
    kd_on: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Reduce per-token losses to megatron's (sum, valid count, report) contract.

    All tensors share one token shape: ``[b, s]``, or ``[s, b]`` from the KD step (which
    transposes the mask to the loss's order); each sum runs over all tokens. No host reads.

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
    sums = [loss_sum, lm_sum, masked_sum(kd), masked_sum(agree), masked_sum(kd_on), count]
    report = torch.stack(sums).detach()
    return loss_sum, count.to(torch.int), {"metrics": report}
